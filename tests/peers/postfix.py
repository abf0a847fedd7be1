"""Private Postfix instances for tests: the guide's relay server and a plain relay.

Each instance lives in its own temporary directory (configuration, queue, data, TLS
files, sasldb, mail log), listens only on 127.0.0.1 at free ports, runs ``master`` in the
foreground as a child process and relays everything it accepts to one loopback host
given as ``[127.0.0.1]:port``: no DNS is ever queried. The system's own Postfix
(``/etc/postfix``) is neither read nor touched.

Run by hand, to try a peer with swaks::

    PYTHONPATH=tests python -m peers.postfix relay-server --onward 127.0.0.1:2526
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from peers import free_port, require_tool

if TYPE_CHECKING:
    from peers.sinks import RecordingSink

SASL_USER = "postfix"
SASL_REALM = "dbmx.net"
SASL_LOGIN = f"{SASL_USER}@{SASL_REALM}"

# Postfix's standard services, chroot off (column 5 = n) so that absolute paths into the
# temp directory (sasldb, certificates, log) work from every daemon.
_BASE_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixError(RuntimeError):
    """A private Postfix instance could not be set up, started or stopped."""


@dataclass
class PostfixInstance:
    """One private Postfix: its directory, its listeners and its mail log."""

    root: Path
    listeners: dict[str, int]
    onward: tuple[str, int]
    host: str = "127.0.0.1"
    ca_file: Path | None = None
    password: str | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def config_dir(self) -> Path:
        return self.root / "conf"

    @property
    def maillog_path(self) -> Path:
        return self.root / "maillog"

    def port(self, name: str) -> int:
        return self.listeners[name]

    def log(self) -> str:
        """Postfix's mail log so far (empty if nothing was logged yet)."""
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``postfix -c CONF ARGS`` (for example ``flush``) against this instance."""
        return subprocess.run(
            [require_tool("postfix"), "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=check,
            env=_postfix_env(self.config_dir),
        )

    def start(self, timeout: float = 30.0) -> None:
        """Start ``master`` in the foreground and wait until every listener answers 220."""
        # start-fg runs Postfix's own configuration check first and logs what it finds.
        self._proc = subprocess.Popen(
            [require_tool("postfix"), "-c", str(self.config_dir), "start-fg"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env=_postfix_env(self.config_dir),
        )
        deadline = time.monotonic() + timeout
        for name, port in self.listeners.items():
            while True:
                if self._proc.poll() is not None:
                    raise PostfixError(
                        f"postfix exited ({self._proc.returncode}) before {name} was ready:\n"
                        + self.log()
                    )
                if _answers_220(self.host, port):
                    break
                if time.monotonic() > deadline:
                    raise PostfixError(f"postfix {name} on port {port} not ready:\n{self.log()}")
                time.sleep(0.05)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop ``master`` and its children; kill them if they do not go in time."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            self.postfix("stop", check=False)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.postfix("abort", check=False)
                proc.kill()
                proc.wait(timeout=timeout)

    def flush(self) -> None:
        """Ask the queue manager to retry deferred mail now (``postfix flush``)."""
        self.postfix("flush", check=False)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class GuideRelay:
    """The guide's relay server (Postfix) and the sink it delivers to."""

    postfix: PostfixInstance
    sink: RecordingSink
    password: str
    login: str = SASL_LOGIN

    @property
    def submission_port(self) -> int:
        return self.postfix.port("submission")

    @property
    def relayhost(self) -> str:
        return f"[127.0.0.1]:{self.submission_port}"

    @property
    def ca_file(self) -> Path:
        assert self.postfix.ca_file is not None
        return self.postfix.ca_file


def _postfix_env(config_dir: Path) -> dict[str, str]:
    # Only what Postfix needs: no proxy or resolver settings leak in from the caller.
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "MAIL_CONFIG": str(config_dir),
        "LANG": "C",
    }


def _answers_220(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            sock.settimeout(2.0)
            banner = sock.recv(512)
            with contextlib.suppress(OSError):
                sock.sendall(b"QUIT\r\n")
            return banner.startswith(b"220")
    except OSError:
        return False


def _make_root() -> Path:
    # Not pytest's tmp_path: that one is mode 0700, and Postfix daemons that dropped to
    # the postfix user must still reach the sasldb and the queue below this directory.
    root = Path(tempfile.mkdtemp(prefix="hato-postfix-"))
    root.chmod(0o755)
    return root


def _main_cf(root: Path, onward: tuple[str, int], extra: Mapping[str, str]) -> str:
    settings: dict[str, str] = {
        "compatibility_level": "3.6",
        "queue_directory": str(root / "queue"),
        "data_directory": str(root / "data"),
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "myhostname": "relay.dbmx.net",
        "mydomain": "dbmx.net",
        "myorigin": "$mydomain",
        # The guide lists $mydomain here; we relay it instead, so that mail (and DSNs) to
        # dbmx.net addresses reach the recording sink rather than a local mailbox.
        "mydestination": "localhost",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "relayhost": f"[{onward[0]}]:{onward[1]}",
        # No DNS: the only next hop is a bracketed IP literal, looked up natively.
        "smtp_dns_support_level": "disabled",
        "smtp_host_lookup": "native",
        "lmtp_host_lookup": "native",
        "smtpd_peername_lookup": "no",
        "import_environment": "MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C",
        "alias_maps": "",
        "alias_database": "",
        "local_recipient_maps": "",
        "relay_domains": "",
        "maillog_file": str(root / "maillog"),
        # Postfix refuses a log file outside these prefixes (default: /var, /dev/stdout).
        "maillog_file_prefixes": str(root),
        "smtp_tls_security_level": "none",
        "message_size_limit": "10485760",
        "mailbox_size_limit": "0",
        "recipient_delimiter": "+",
        "biff": "no",
        "append_dot_mydomain": "no",
        "smtpd_banner": "$myhostname ESMTP",
        # Tests restart the onward sink; Postfix should notice within seconds, not minutes.
        "queue_run_delay": "1s",
        "minimal_backoff_time": "1s",
        "maximal_backoff_time": "2s",
        "in_flow_delay": "0",
    }
    settings.update(extra)
    return "".join(f"{key} = {value}\n" for key, value in settings.items())


def _write_config(
    root: Path, onward: tuple[str, int], main_extra: Mapping[str, str], listeners: str
) -> None:
    conf = root / "conf"
    conf.mkdir(mode=0o755)
    (root / "queue").mkdir(mode=0o755)
    data = root / "data"
    data.mkdir(mode=0o700)
    shutil.chown(data, "postfix", "postfix")
    (conf / "main.cf").write_text(_main_cf(root, onward, main_extra))
    (conf / "master.cf").write_text(listeners + _BASE_SERVICES)


def _issue_certificate(root: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for dbmx.net, localhost and 127.0.0.1."""
    import trustme

    tls = root / "tls"
    tls.mkdir(mode=0o755)
    ca = trustme.CA()
    cert = ca.issue_cert("relay.dbmx.net", "dbmx.net", "localhost", "127.0.0.1")
    ca_file = tls / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    chain = tls / "chain.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key = tls / "key.pem"
    cert.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    return ca_file, chain, key


def _create_sasldb(root: Path, password: str) -> Path:
    """The guide's one SASL account, made with saslpasswd2 into a private sasldb."""
    sasldb = root / "sasldb2"
    subprocess.run(
        [require_tool("saslpasswd2"), "-p", "-c", "-f", str(sasldb), "-u", SASL_REALM, SASL_USER],
        input=password.encode(),
        check=True,
        capture_output=True,
        timeout=30,
    )
    # smtpd opens the sasldb after dropping to the postfix user.
    shutil.chown(sasldb, "root", "postfix")
    sasldb.chmod(0o640)
    sasl_conf = root / "conf" / "sasl"
    sasl_conf.mkdir(mode=0o755)
    (sasl_conf / "smtpd.conf").write_text(
        "pwcheck_method: auxprop\n"
        "auxprop_plugin: sasldb\n"
        f"sasldb_path: {sasldb}\n"
        "mech_list: PLAIN LOGIN\n"
    )
    return sasldb


def relay_server(onward: tuple[str, int], *, password: str = "guide-secret") -> PostfixInstance:
    """The guide's relay server: submission with TLS required and SASL, relaying onward.

    Listeners: ``submission`` (TLS required, AUTH required, no trusted networks) and
    ``smtp`` (the guide's port 25: plain, trusts 127.0.0.0/8). Not started yet.
    """
    require_tool("postfix", hint="apt-get install postfix")
    require_tool("saslpasswd2", hint="apt-get install sasl2-bin")
    root = _make_root()
    try:
        submission, smtp = free_port(), free_port()
        while smtp == submission:
            smtp = free_port()
        listeners = (
            f"127.0.0.1:{smtp} inet n - n - - smtpd\n"
            f"127.0.0.1:{submission} inet n - n - - smtpd\n"
            "  -o syslog_name=postfix/submission\n"
            "  -o smtpd_tls_security_level=encrypt\n"
            "  -o smtpd_tls_auth_only=yes\n"
            "  -o smtpd_sasl_auth_enable=yes\n"
            # Unlike the guide (which keeps permit_mynetworks), loopback is not trusted
            # here, so that AUTH is really needed on the port Hato relays to.
            "  -o smtpd_client_restrictions=permit_sasl_authenticated,reject\n"
            "  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject\n"
            "  -o smtpd_recipient_restrictions=permit_sasl_authenticated,reject_unauth_destination\n"
        )
        ca_file, chain, key = _issue_certificate(root)
        _write_config(
            root,
            onward,
            {
                "smtpd_sasl_auth_enable": "no",
                "smtpd_sasl_type": "cyrus",
                "smtpd_sasl_path": "smtpd",
                "cyrus_sasl_config_path": str(root / "conf" / "sasl"),
                "smtpd_sasl_security_options": "noanonymous",
                "smtpd_sasl_local_domain": "$mydomain",
                "broken_sasl_auth_clients": "yes",
                "smtpd_tls_cert_file": str(chain),
                "smtpd_tls_key_file": str(key),
                "smtpd_tls_security_level": "may",
                "smtpd_tls_loglevel": "1",
                "smtpd_recipient_restrictions": (
                    "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination"
                ),
            },
            listeners,
        )
        _create_sasldb(root, password)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return PostfixInstance(
        root=root,
        listeners={"submission": submission, "smtp": smtp},
        onward=onward,
        ca_file=ca_file,
        password=password,
    )


def plain_relay(
    onward: tuple[str, int], *, port: int | None = None, main: Mapping[str, str] | None = None
) -> PostfixInstance:
    """Postfix as a local relay: smtpd trusting 127.0.0.0/8, relaying to ``onward``.

    ``main``: more ``main.cf`` settings (e.g. ``smtpd_discard_ehlo_keywords``). Listener:
    ``smtp``. Not started yet.
    """
    require_tool("postfix", hint="apt-get install postfix")
    root = _make_root()
    try:
        port = port or free_port()
        _write_config(root, onward, main or {}, f"127.0.0.1:{port} inet n - n - - smtpd\n")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return PostfixInstance(root=root, listeners={"smtp": port}, onward=onward)


@contextlib.contextmanager
def running(instance: PostfixInstance) -> Iterator[PostfixInstance]:
    """Start an instance, yield it, and stop it and remove its directory afterwards."""
    try:
        instance.start()
        yield instance
    finally:
        instance.cleanup()


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m peers.postfix")
    parser.add_argument("kind", choices=["relay-server", "plain-relay"])
    parser.add_argument("--onward", required=True, help="HOST:PORT of the next hop")
    parser.add_argument("--password", default="guide-secret")
    args = parser.parse_args(argv)
    host, _, port = args.onward.rpartition(":")
    onward = (host, int(port))
    instance = (
        relay_server(onward, password=args.password)
        if args.kind == "relay-server"
        else plain_relay(onward)
    )

    def _interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    with running(instance):
        print(f"root={instance.root}", flush=True)
        for name, lport in instance.listeners.items():
            print(f"{name}=127.0.0.1:{lport}", flush=True)
        if instance.ca_file:
            print(f"ca={instance.ca_file} user={SASL_LOGIN} password={args.password}", flush=True)
        print("ready; Ctrl-C or SIGTERM stops", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while instance._proc is not None and instance._proc.poll() is None:
                time.sleep(0.5)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    sys.exit(_cli(sys.argv[1:]))
