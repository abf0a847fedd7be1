"""Debian's Postfix in two more roles: the recipients' MX (into a Maildir) and the guide's
local relay authenticating to an upstream with SASL.

:func:`mx_server` is a private Postfix that accepts mail for its virtual mailbox domains
(``example.net`` by default) on ``127.0.0.1:PORT`` and delivers every known recipient
into a Maildir under its own directory, with ``smtpd_tls_security_level = may`` and a
throw-away certificate so that senders' opportunistic TLS is exercised (and recorded in
the ``Received:`` header). Unknown recipients get 550 5.1.1 at RCPT; mail for any other
domain is refused (relay denied). It does no DNS lookups and sends nothing anywhere.

:func:`sasl_relay` is Postfix as the guide's local relay in front of a relay server:
``relayhost = [127.0.0.1]:PORT``, ``smtp_sasl_password_maps``, ``smtp_tls_security_level
= encrypt``; it trusts 127.0.0.0/8, as the docker container trusts its private network.

Both are :class:`peers.postfix.PostfixInstance` objects (``start``/``stop``/``log``),
built on that module's configuration helpers; nothing of the system's Postfix is used.

Run by hand::

    PYTHONPATH=tests python -m peers.postfix_mx mx --domain example.net --mailbox someone
"""

from __future__ import annotations

import argparse
import contextlib
import email
import email.message
import email.policy
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from peers import free_port, require_tool
from peers.postfix import (
    PostfixInstance,
    _make_root,
    _postfix_env,
    _write_config,
    plain_relay,
    running,
)

# The unprivileged owner of the delivered Maildirs (virtual(8) refuses root and the
# postfix user is reserved for Postfix itself).
MAIL_USER = "nobody"

# Mail for anything but the virtual mailbox domains has nowhere to go: no DNS, no relayhost.
_NO_ROUTE = "error:5.1.2 this test MX delivers only to its own domains"


@dataclass(frozen=True)
class Delivered:
    """One message as Postfix's virtual(8) wrote it into a Maildir."""

    path: Path
    data: bytes  # as on disk: LF line endings, Return-Path/Delivered-To prepended

    @property
    def crlf(self) -> bytes:
        """The message with CRLF line endings, as verifiers and SMTP expect."""
        return self.data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")

    @property
    def message(self) -> email.message.EmailMessage:
        msg = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        return msg

    def headers(self, name: str) -> list[str]:
        return [str(v) for v in self.message.get_all(name, [])]


@dataclass
class PostfixMX:
    """A running (or not yet started) Postfix MX and where it delivers."""

    instance: PostfixInstance
    domains: tuple[str, ...]
    mailboxes: tuple[str, ...]

    @property
    def port(self) -> int:
        return self.instance.port("smtp")

    @property
    def maildir_base(self) -> Path:
        return self.instance.root / "mail"

    def maildir(self, address: str) -> Path:
        local, _, domain = address.lower().rpartition("@")
        return self.maildir_base / domain / local

    def log(self) -> str:
        return self.instance.log()

    def delivered(self, address: str) -> list[Delivered]:
        """Messages in ``address``'s Maildir ``new/``, oldest first."""
        new = self.maildir(address) / "new"
        if not new.is_dir():
            return []
        paths = sorted(new.iterdir(), key=lambda p: (p.stat().st_mtime, p.name))
        return [Delivered(p, p.read_bytes()) for p in paths if p.is_file()]

    def wait_for(self, address: str, count: int = 1, timeout: float = 60.0) -> list[Delivered]:
        """Wait until ``address`` has ``count`` messages; raise with the mail log if not."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.delivered(address)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"postfix MX: {len(found)} of {count} message(s) for {address} after "
                    f"{timeout}s; mail log:\n{self.log()}"
                )
            time.sleep(0.1)


def _issue_mx_certificate(root: Path, hostname: str) -> tuple[Path, Path]:
    import trustme

    tls = root / "tls"
    tls.mkdir(mode=0o755)
    ca = trustme.CA()
    cert = ca.issue_cert(hostname, "localhost", "127.0.0.1")
    chain = tls / "chain.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key = tls / "key.pem"
    cert.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    return chain, key


def mx_server(
    domains: Iterable[str] = ("example.net",),
    mailboxes: Iterable[str] = ("someone",),
    *,
    port: int | None = None,
    hostname: str = "mx.example.net",
    extra: Mapping[str, str] | None = None,
) -> PostfixMX:
    """Postfix as the MX of ``domains``, with Maildirs for ``mailboxes`` in each. Not started.

    Listener ``smtp`` on ``127.0.0.1:port`` (a free port unless given): the port a
    sender's MX courier connects to (``HATO_OUTBOUND_PORT``).
    """
    require_tool("postfix", hint="apt-get install postfix")
    domains = tuple(d.lower() for d in domains)
    mailboxes = tuple(m.lower() for m in mailboxes)
    account = pwd.getpwnam(MAIL_USER)
    root = _make_root()
    try:
        port = port or free_port()
        mail = root / "mail"
        mail.mkdir(mode=0o755)
        os.chown(mail, account.pw_uid, account.pw_gid)
        chain, key = _issue_mx_certificate(root, hostname)
        settings = {
            "myhostname": hostname,
            "mydomain": hostname.partition(".")[2] or hostname,
            "myorigin": "$myhostname",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            "relayhost": "",
            "relay_domains": "",
            "default_transport": _NO_ROUTE,
            "relay_transport": _NO_ROUTE,
            "virtual_mailbox_domains": ", ".join(domains),
            "virtual_mailbox_base": str(mail),
            # texthash: read as text when the daemon starts, no postmap needed.
            "virtual_mailbox_maps": f"texthash:{root / 'conf' / 'vmailbox'}",
            "virtual_uid_maps": f"static:{account.pw_uid}",
            "virtual_gid_maps": f"static:{account.pw_gid}",
            "virtual_minimum_uid": str(min(account.pw_uid, 100)),
            "virtual_alias_maps": "",
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_recipient_restrictions": "reject_unauth_destination",
            "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": str(chain),
            "smtpd_tls_key_file": str(key),
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_received_header": "yes",
            "smtpd_sasl_auth_enable": "no",
            "smtp_dns_support_level": "disabled",
            "disable_dns_lookups": "yes",
            # Header addresses stay as the sender wrote them (a real MX sees remote clients,
            # whose headers Postfix does not rewrite); DKIM must verify on what arrived.
            "local_header_rewrite_clients": "",
            "append_dot_mydomain": "no",
            "smtpd_helo_required": "no",
            "smtputf8_enable": "yes",
        }
        settings.update(extra or {})
        _write_config(root, ("127.0.0.1", 9), settings, f"127.0.0.1:{port} inet n - n - - smtpd\n")
        (root / "conf" / "vmailbox").write_text(
            "".join(f"{m}@{d} {d}/{m}/\n" for d in domains for m in mailboxes)
        )
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    instance = PostfixInstance(root=root, listeners={"smtp": port}, onward=("127.0.0.1", 9))
    return PostfixMX(instance, domains, mailboxes)


def postconf(instance: PostfixInstance, settings: Mapping[str, str]) -> None:
    """Set ``main.cf`` parameters of a not yet started instance (``postconf -e``)."""
    subprocess.run(
        [
            require_tool("postconf"),
            "-c",
            str(instance.config_dir),
            "-e",
            *(f"{key}={value}" for key, value in settings.items()),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
        env=_postfix_env(instance.config_dir),
    )


def sasl_relay(
    upstream: tuple[str, int],
    username: str,
    password: str,
    *,
    tls_level: str = "encrypt",
) -> PostfixInstance:
    """Postfix as the guide's local relay: ``relayhost = [upstream]``, SASL and TLS. Not started.

    Listener ``smtp`` (plain, trusting 127.0.0.0/8). The credentials live in a
    ``texthash:`` password map readable by root only, keyed by the relayhost as Postfix
    looks it up (``[127.0.0.1]:PORT``).
    """
    require_tool("postfix", hint="apt-get install postfix")
    instance = plain_relay(upstream)
    relayhost = f"[{upstream[0]}]:{upstream[1]}"
    passwords = instance.config_dir / "sasl_passwd"
    passwords.write_text(f"{relayhost} {username}:{password}\n")
    passwords.chmod(0o600)
    postconf(
        instance,
        {
            "smtp_sasl_auth_enable": "yes",
            "smtp_sasl_password_maps": f"texthash:{passwords}",
            "smtp_sasl_security_options": "noanonymous",
            "smtp_sasl_tls_security_options": "noanonymous",
            "smtp_tls_security_level": tls_level,
            "smtp_tls_loglevel": "1",
        },
    )
    return instance


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m peers.postfix_mx")
    parser.add_argument("kind", choices=["mx"])
    parser.add_argument("--domain", action="append", default=[])
    parser.add_argument("--mailbox", action="append", default=[])
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)
    mx = mx_server(args.domain or ["example.net"], args.mailbox or ["someone"], port=args.port)

    def _interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    with running(mx.instance):
        print(f"root={mx.instance.root}", flush=True)
        print(f"smtp=127.0.0.1:{mx.port} maildirs={mx.maildir_base}", flush=True)
        print("ready; Ctrl-C or SIGTERM stops", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while mx.instance._proc is not None and mx.instance._proc.poll() is None:
                time.sleep(0.5)
    return 0


@contextlib.contextmanager
def running_mx(mx: PostfixMX) -> Iterator[PostfixMX]:
    """Start the MX, yield it, then stop it and remove its directory."""
    with running(mx.instance):
        yield mx


if __name__ == "__main__":
    os.environ.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    sys.exit(_cli(sys.argv[1:]))
