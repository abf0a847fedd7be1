"""Fixtures for the relay-server end-to-end tests: the test DNS zone, Postfix as the MX,
and ``hato serve`` set up as the guide's relay server and as its local relay.

The world of these tests, all on loopback and answered by :class:`peers.dns.TestDNS`:

* ``example.net`` — the recipients' domain: ``MX 10 mx.example.net``, ``mx.example.net A
  127.0.0.1``; the MX is Debian's Postfix (:mod:`peers.postfix_mx`) delivering into a
  Maildir, on the port Hato's MX courier uses (``HATO_OUTBOUND_PORT``).
* ``dbmx.net`` — the guide's domain, served by the Hato relay server: SPF ``v=spf1
  ip4:127.0.0.1 -all`` (the relay server's address as the MX sees it), one TXT record per
  DKIM selector (``s1`` RSA, ``s2`` Ed25519, made by ``hato dkim keygen``), ``_dmarc``.

The relay server is prepared the way ``docs/operations.md`` tells an operator to:
``hato tls self-signed``, ``hato user add postfix@dbmx.net --password-stdin``, ``hato
dkim keygen`` twice, then ``hato serve`` with ``HATO_ROUTE=mx``. Loopback is not a
trusted network for it (``HATO_MYNETWORKS=192.0.2.0/24``), so relaying needs AUTH as on
a VPS facing the internet.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from hato.dkim import DKIMRecord, dkim_txt_records
from peers import free_port
from peers.dns import TestDNS
from peers.hato import HatoFactory, HatoServe, hato_env, run_hato
from peers.postfix_mx import PostfixMX, mx_server

DOMAIN = "dbmx.net"
RELAY_HOSTNAME = "relay.dbmx.net"
USER = "postfix@dbmx.net"
PASSWORD = "guide-Secret-42"
RECIPIENT_DOMAIN = "example.net"
RECIPIENT = "someone@example.net"
SPF = "v=spf1 ip4:127.0.0.1 -all"
DMARC = "v=DMARC1; p=reject; adkim=s; aspf=s; rua=mailto:postmaster@dbmx.net"
# Documentation space: loopback clients are untrusted, as the internet is to a VPS.
UNTRUSTED_MYNETWORKS = "192.0.2.0/24"


@pytest.fixture
def dns_server() -> Iterator[TestDNS]:
    """The test DNS with the base zone (MX, SPF, DMARC); DKIM keys are added by the relay."""
    with TestDNS() as server:
        server.mx(RECIPIENT_DOMAIN, (10, f"mx.{RECIPIENT_DOMAIN}"))
        server.a(f"mx.{RECIPIENT_DOMAIN}", "127.0.0.1")
        server.txt(DOMAIN, SPF)
        server.a(RELAY_HOSTNAME, "127.0.0.1")
        server.ptr("127.0.0.1", RELAY_HOSTNAME)
        server.txt(f"_dmarc.{DOMAIN}", DMARC)
        yield server


ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


def attach_log(request: pytest.FixtureRequest, name: str, read: Callable[[], str]) -> None:
    """The root conftest's ``attach_log`` (show ``read()`` in the report of a failed test).

    Both conftest modules are called ``conftest``, so ``from conftest import attach_log``
    in a test module gets whichever was imported last; this one hands on to the root's.
    """
    for plugin in request.config.pluginmanager.get_plugins():
        if getattr(plugin, "__file__", None) == str(ROOT_CONFTEST):
            plugin.attach_log(request, name, read)
            return
    raise AssertionError(f"{ROOT_CONFTEST} is not loaded")


@pytest.fixture
def postfix_mx(request: pytest.FixtureRequest) -> Iterator[PostfixMX]:
    """Debian's Postfix as ``example.net``'s MX, started, delivering into Maildirs."""
    mx = mx_server((RECIPIENT_DOMAIN,), ("someone", "other"))
    attach_log(request, "postfix (MX for example.net)", mx.log)
    try:
        mx.instance.start()
        yield mx
    finally:
        mx.instance.cleanup()


def add_user(data_dir: Path, name: str, password: str) -> None:
    """``hato user add NAME --password-stdin``, the password on stdin."""
    proc = subprocess.run(
        [sys.executable, "-m", "hato", "user", "add", name, "--password-stdin"],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        env=hato_env(data_dir),
        cwd=data_dir,
    )
    assert proc.returncode == 0, f"hato user add failed:\n{proc.stdout}\n{proc.stderr}"


def self_signed(data_dir: Path, *hostnames: str) -> dict[str, str]:
    """``hato tls self-signed``; returns the ``HATO_TLS_*`` lines it prints."""
    args = ["tls", "self-signed"]
    for name in hostnames:
        args += ["--hostname", name]
    out = run_hato(args, data_dir=data_dir).stdout
    env = dict(line.split("=", 1) for line in out.splitlines() if line.startswith("HATO_TLS_"))
    assert set(env) == {"HATO_TLS_CERT_FILE", "HATO_TLS_KEY_FILE"}, out
    return env


def dkim_keygen(data_dir: Path, selector: str, algorithm: str) -> str:
    """``hato dkim keygen``; returns what it printed (the TXT record to publish)."""
    args = ["dkim", "keygen", "--domain", DOMAIN, "--selector", selector]
    args += ["--algorithm", algorithm]
    return run_hato(args, data_dir=data_dir).stdout


@dataclass
class RelayServer:
    """``hato serve`` as the guide's relay server, and what its clients need to know."""

    serve: HatoServe
    data_dir: Path
    ca_file: Path  # its self-signed certificate: what a client pins
    dkim_records: list[DKIMRecord]
    user: str = USER
    password: str = PASSWORD

    def port(self, role: str) -> int:
        return self.serve.listeners[role][1]

    @property
    def submission(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port("submission"))

    def maildir(self, address: str) -> Path:
        """Where Hato delivers ``address`` of our own domain: DATA_DIR/mail/DOMAIN/LOCAL."""
        local, _, domain = address.lower().rpartition("@")
        return self.data_dir / "mail" / domain / local


RelayFactory = Callable[..., RelayServer]


@pytest.fixture
def relay_server_factory(
    hato_serve: HatoFactory, tmp_path: Path, dns_server: TestDNS
) -> RelayFactory:
    """Prepare and start a Hato relay server: ``relay_server_factory(outbound_port, **env)``.

    Publishes its DKIM keys in ``dns_server``. ``env`` overrides or adds settings;
    ``aliases`` is written to ``DATA_DIR/aliases`` first; ``allow_private_mx=False`` leaves
    ``HATO_ALLOW_PRIVATE_MX`` unset (its default: MX hosts in loopback space refused).
    """
    count = 0

    def make(
        outbound_port: int,
        *,
        name: str | None = None,
        aliases: str | None = None,
        allow_private_mx: bool = True,
        **env: str,
    ) -> RelayServer:
        nonlocal count
        count += 1
        data = tmp_path / (name or f"relay-server-{count}")
        data.mkdir(parents=True)
        if aliases is not None:
            (data / "aliases").write_text(aliases)  # DATA_DIR/aliases: read when present
        settings = self_signed(data, RELAY_HOSTNAME, "127.0.0.1", "localhost")
        add_user(data, USER, PASSWORD)
        dkim_keygen(data, "s1", "rsa")
        dkim_keygen(data, "s2", "ed25519")
        records = dkim_txt_records(data / "dkim")
        for record in records:
            dns_server.txt(record.name, record.txt)
        ports = {role: free_port() for role in ("smtp", "submission", "submissions")}
        settings.update(
            HATO_LISTEN=",".join(f"{role}=127.0.0.1:{port}" for role, port in ports.items()),
            HATO_DOMAINS=DOMAIN,
            HATO_HOSTNAME=RELAY_HOSTNAME,
            HATO_ROUTE="mx",
            HATO_DNS_SERVERS=dns_server.server,
            HATO_OUTBOUND_PORT=str(outbound_port),
            HATO_MYNETWORKS=UNTRUSTED_MYNETWORKS,
            HATO_FSYNC="false",
        )
        if allow_private_mx:  # the test-only setting; left out, the default applies
            settings["HATO_ALLOW_PRIVATE_MX"] = "true"
        settings.update(env)
        serve = hato_serve(env=settings, data_dir=data)
        return RelayServer(serve, data, Path(settings["HATO_TLS_CERT_FILE"]), records)

    return make


@pytest.fixture
def relay_server(relay_server_factory: RelayFactory, postfix_mx: PostfixMX) -> RelayServer:
    """The Hato relay server delivering to the Postfix MX."""
    return relay_server_factory(postfix_mx.port)


@pytest.fixture
def local_relay_factory(hato_serve: HatoFactory, tmp_path: Path) -> Callable[..., HatoServe]:
    """``hato serve`` as the guide's local relay (the boky/postfix container's settings)."""

    def make(relay: RelayServer, **env: str) -> HatoServe:
        settings: Mapping[str, str] = {
            "HATO_LISTEN": f"smtp=127.0.0.1:{free_port()}",
            "HATO_HOSTNAME": "smtp.app.internal",
            "RELAYHOST": f"[127.0.0.1]:{relay.port('submission')}",
            "RELAYHOST_USERNAME": relay.user,
            "RELAYHOST_PASSWORD": relay.password,
            "ALLOWED_SENDER_DOMAINS": DOMAIN,
            "HATO_RELAY_TLS": "encrypt",
            "HATO_RELAY_TLS_CA_FILE": str(relay.ca_file),
            "HATO_FSYNC": "false",
            **env,
        }
        return hato_serve(env=settings, data_dir=tmp_path / "local-relay")

    return make
