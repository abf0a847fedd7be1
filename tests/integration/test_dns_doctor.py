"""``hato dns check`` as a doctor, against the test DNS and a loopback HTTPS server with a
test-CA certificate serving the MTA-STS policy; ``hato dns records`` for MTA-STS,
TLS-RPT and TLSA; ``hato dns mta-sts-policy`` and the web route that serves it."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trustme
from starlette.applications import Starlette
from starlette.testclient import TestClient

from hato.config import load_settings
from hato.dkim import DKIMRecord, generate_key
from hato.maillog import MailLog
from hato.queue.memory import MemoryQueue
from hato.records import certificate_spki_sha256, mta_sts_record
from hato.web import mta_sts
from hato.web.context import WebContext
from peers.dns import TestDNS
from peers.hato import HatoFactory, operator_setup

SRC = str(Path(__file__).resolve().parents[2] / "src")
DOMAIN = "example.test"
HOST = "mail.example.test"
IP4 = "192.0.2.25"


def hato(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HATO_", "RELAYHOST"))}
    full_env["PYTHONPATH"] = SRC + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "hato", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


class _Policy(http.server.BaseHTTPRequestHandler):
    body: ClassVar[bytes] = b""
    hosts: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.hosts.append(self.headers.get("Host", ""))
        if self.path != "/.well-known/mta-sts.txt":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class PolicyServer:
    def __init__(self, ca: trustme.CA, name: str) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(name).configure_cert(ctx)
        self.handler = type("Policy", (_Policy,), {"body": b"", "hosts": []})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self.handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}
        )
        self.thread.start()

    def serve(self, text: str) -> None:
        self.handler.body = text.encode()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def ca(tmp_path: Path) -> tuple[trustme.CA, Path]:
    authority = trustme.CA()
    path = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, path


@pytest.fixture
def policy_server(ca: tuple[trustme.CA, Path]) -> Iterator[PolicyServer]:
    server = PolicyServer(ca[0], f"mta-sts.{DOMAIN}")
    yield server
    server.stop()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def key(data_dir: Path) -> DKIMRecord:
    return generate_key(DOMAIN, "s1", "rsa", directory=data_dir / "dkim", bits=1024)


@pytest.fixture
def cert_file(tmp_path: Path, ca: tuple[trustme.CA, Path]) -> Path:
    path = tmp_path / "fullchain.pem"
    ca[0].issue_cert(HOST).private_key_and_cert_chain_pem.write_to_path(str(path))
    return path


def publish_base(dns: TestDNS, key: DKIMRecord) -> None:
    dns.mx(DOMAIN, (10, HOST))
    dns.a(HOST, IP4)
    dns.txt(DOMAIN, f"v=spf1 ip4:{IP4} -all")
    dns.txt(key.name, key.txt)
    dns.txt(f"_dmarc.{DOMAIN}", f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{DOMAIN}")
    dns.ptr(IP4, HOST)


def doctor(
    dns: TestDNS, data_dir: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full = {"HATO_HOSTNAME": HOST, "HATO_DATA_DIR": str(data_dir), **(env or {})}
    return hato(
        "dns", "check", DOMAIN, "--ip", IP4, "--dns-server", dns.server, "--timeout", "5",
        *extra, env=full,
    )  # fmt: skip


def findings(result: subprocess.CompletedProcess[str]) -> dict[tuple[str, str], dict[str, str]]:
    report = json.loads(result.stdout)
    return {(f["kind"], f["name"]): f for f in report["findings"]}


def openssl_spki_sha256(cert: Path) -> str:
    """The same digest as an operator computes it with OpenSSL (the usual recipe)."""
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed"
    pub = subprocess.run(
        [openssl, "x509", "-in", str(cert), "-noout", "-pubkey"],
        capture_output=True,
        check=True,
    ).stdout
    der = subprocess.run(
        [openssl, "pkey", "-pubin", "-outform", "DER"], input=pub, capture_output=True, check=True
    ).stdout
    digest = subprocess.run(
        [openssl, "dgst", "-sha256", "-hex"], input=der, capture_output=True, check=True
    ).stdout
    return digest.decode().split()[-1]


def test_records_print_mta_sts_tlsrpt_and_tlsa(
    data_dir: Path, key: DKIMRecord, cert_file: Path
) -> None:
    env = {
        "HATO_HOSTNAME": HOST,
        "HATO_DATA_DIR": str(data_dir),
        "HATO_TLS_CERT_FILE": str(cert_file),
        "HATO_TLSRPT_RUA": f"tlsrpt@{DOMAIN}",
    }
    result = hato("dns", "records", DOMAIN, "--ip", IP4, env=env)
    assert result.returncode == 0, result.stderr
    # (text mode reads CRLF as LF)
    policy = hato("dns", "mta-sts-policy", env=env).stdout.replace("\n", "\r\n")
    assert policy == f"version: STSv1\r\nmode: testing\r\nmx: {HOST}\r\nmax_age: 604800\r\n"
    lines = result.stdout.splitlines()
    sts_line = f'_mta-sts.{DOMAIN}. IN TXT "{mta_sts_record(policy)}"'
    assert sts_line in lines, result.stdout
    assert f'_smtp._tls.{DOMAIN}. IN TXT "v=TLSRPTv1; rua=mailto:tlsrpt@{DOMAIN}"' in lines
    digest = openssl_spki_sha256(cert_file)
    assert f"_25._tcp.{HOST}. IN TLSA 3 1 1 {digest}" in lines
    assert "--reuse-key" in result.stdout
    # enforce changes the policy, and so the id.
    enforced = hato("dns", "records", DOMAIN, env={**env, "HATO_MTA_STS_MODE": "enforce"})
    assert sts_line not in enforced.stdout.splitlines()


def test_policy_served_by_the_web_route(tmp_path: Path) -> None:
    settings = load_settings(
        data_dir=tmp_path, hostname=HOST, mta_sts_mode="enforce", mta_sts_max_age=86400
    )
    ctx = WebContext(settings, MemoryQueue(), MailLog(enabled=False), lambda: 0.0, "serve", "n")
    with TestClient(Starlette(routes=mta_sts.routes(ctx))) as client:
        response = client.get("/.well-known/mta-sts.txt")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == f"version: STSv1\r\nmode: enforce\r\nmx: {HOST}\r\nmax_age: 86400\r\n"


def test_doctor_all_published_and_right(
    data_dir: Path,
    key: DKIMRecord,
    cert_file: Path,
    ca: tuple[trustme.CA, Path],
    policy_server: PolicyServer,
) -> None:
    policy = f"version: STSv1\r\nmode: enforce\r\nmx: {HOST}\r\nmax_age: 604800\r\n"
    policy_server.serve(policy)
    with TestDNS() as dns:
        publish_base(dns, key)
        dns.txt(f"_mta-sts.{DOMAIN}", mta_sts_record(policy))
        dns.a(f"mta-sts.{DOMAIN}", "127.0.0.1")
        dns.txt(f"_smtp._tls.{DOMAIN}", f"v=TLSRPTv1; rua=mailto:tlsrpt@{DOMAIN}")
        digest = certificate_spki_sha256(cert_file.read_bytes())
        dns.tlsa(f"_25._tcp.{HOST}", 3, 1, 1, digest)
        env = {"HATO_TLS_CERT_FILE": str(cert_file)}
        args = ("--mta-sts-port", str(policy_server.port), "--ca-file", str(ca[1]))
        text = doctor(dns, data_dir, *args, env=env)
        assert text.returncode == 0, text.stdout + text.stderr
        assert "all 10 record(s) ok" in text.stdout
        assert "not published" not in text.stdout
        result = doctor(dns, data_dir, *args, "--json", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    found = findings(result)
    assert {f["status"] for f in found.values()} == {"ok"}, result.stdout
    assert found[("MTA-STS", f"mta-sts.{DOMAIN}")]["detail"] == f"policy mode enforce, mx {HOST}"
    assert "reports to mailto:tlsrpt@" in found[("TLS-RPT", f"_smtp._tls.{DOMAIN}")]["detail"]
    assert "matches the current certificate" in found[("TLSA", f"_25._tcp.{HOST}")]["detail"]
    assert (
        "aligned with From example.test: DKIM d=example.test"
        in (found[("DMARC", f"_dmarc.{DOMAIN}")]["detail"])
    )
    assert "HELO" in found[("PTR", "25.2.0.192.in-addr.arpa")]["detail"]
    assert set(policy_server.handler.hosts) == {f"mta-sts.{DOMAIN}"}
    assert json.loads(result.stdout)["ok"] is True


def test_doctor_finds_what_is_wrong_and_says_the_fix(
    data_dir: Path,
    key: DKIMRecord,
    cert_file: Path,
    ca: tuple[trustme.CA, Path],
    policy_server: PolicyServer,
) -> None:
    # A policy that does not name our MX, served; a TLSA of another key; a broken TLS-RPT.
    policy_server.serve("version: STSv1\r\nmode: enforce\r\nmx: *.elsewhere.test\r\nmax_age: 1\r\n")
    with TestDNS() as dns:
        publish_base(dns, key)
        dns.remove(DOMAIN, "TXT")
        includes = " ".join(f"include:s{n}.{DOMAIN}" for n in range(6))
        dns.txt(DOMAIN, f"v=spf1 ip4:{IP4} {includes} -all")
        for n in range(6):
            dns.txt(f"s{n}.{DOMAIN}", "v=spf1 a mx -all")
        dns.remove(f"_dmarc.{DOMAIN}")
        dns.txt(f"_dmarc.{DOMAIN}", "v=DMARC1; p=reject; aspf=s")
        dns.txt(f"_mta-sts.{DOMAIN}", "v=STSv1; id=20240101")
        dns.a(f"mta-sts.{DOMAIN}", "127.0.0.1")
        dns.txt(f"_smtp._tls.{DOMAIN}", "v=TLSRPTv1; rua=http://insecure.test/")
        dns.tlsa(f"_25._tcp.{HOST}", 3, 1, 1, "00" * 32)
        args = ("--mta-sts-port", str(policy_server.port), "--ca-file", str(ca[1]), "--json")
        result = doctor(
            dns,
            data_dir,
            *args,
            "--envelope-domain",
            "bounces.other.test",
            env={"HATO_TLS_CERT_FILE": str(cert_file)},
        )
        # Without our CA the policy's certificate is not trusted: a fetch failure.
        untrusted = doctor(dns, data_dir, "--mta-sts-port", str(policy_server.port), "--json")
    assert result.returncode == 1
    found = findings(result)
    spf = found[("SPF", DOMAIN)]
    assert spf["status"] == "different" and "needs more than 10 DNS lookups" in spf["detail"], spf
    assert "flatten" in spf["fix"]
    sts = found[("MTA-STS", f"mta-sts.{DOMAIN}")]
    assert sts["status"] == "different"
    assert f"MX {HOST} not matched by mx: *.elsewhere.test" in sts["detail"]
    assert "hato dns mta-sts-policy" in sts["fix"]
    assert found[("TLS-RPT", f"_smtp._tls.{DOMAIN}")]["status"] == "different"
    tlsa = found[("TLSA", f"_25._tcp.{HOST}")]
    assert tlsa["status"] == "different"
    digest = certificate_spki_sha256(cert_file.read_bytes())
    assert f"add _25._tcp.{HOST}. IN TLSA 3 1 1 {digest}" in tlsa["fix"]
    dmarc = found[("DMARC", f"_dmarc.{DOMAIN}")]
    assert dmarc["status"] == "ok"  # DKIM aligns even though SPF (strict, other domain) does not
    assert "not SPF: envelope bounces.other.test is not aligned" in dmarc["detail"]
    fetch = findings(untrusted)[("MTA-STS", f"mta-sts.{DOMAIN}")]
    assert fetch["status"] == "different" and "policy fetch failed" in fetch["detail"], fetch


def test_doctor_dmarc_alignment_without_dkim_and_helo_mismatch(data_dir: Path) -> None:
    with TestDNS() as dns:
        dns.mx(DOMAIN, (10, HOST))
        dns.a(HOST, IP4)
        dns.txt(DOMAIN, f"v=spf1 ip4:{IP4} -all")
        dns.txt(f"_dmarc.{DOMAIN}", "v=DMARC1; p=reject")
        dns.ptr(IP4, "vps-1.provider.test")
        result = doctor(dns, data_dir, "--envelope-domain", "other.test", "--json")
        plain = doctor(dns, data_dir, "--envelope-domain", "other.test")
    found = findings(result)
    dmarc = found[("DMARC", f"_dmarc.{DOMAIN}")]
    assert dmarc["status"] == "different"
    assert "neither DKIM" in dmarc["detail"] and "hato dkim keygen" in dmarc["fix"]
    ptr = found[("PTR", "25.2.0.192.in-addr.arpa")]
    assert "this server says HELO mail.example.test" in ptr["detail"]
    assert "set HATO_HOSTNAME to vps-1.provider.test" in ptr["fix"]
    assert found[("MTA-STS", f"_mta-sts.{DOMAIN}")]["status"] == "optional"
    assert "; not published (optional): MTA-STS, TLS-RPT, TLSA" in plain.stdout
    assert plain.returncode == 1


def test_doctor_compares_tlsa_with_the_live_certificate(
    tmp_path: Path, data_dir: Path, hato_serve: HatoFactory
) -> None:
    serve_dir = tmp_path / "serve"
    env = operator_setup(serve_dir, {})
    serve = hato_serve({**env, "HATO_HOSTNAME": HOST}, data_dir=serve_dir)
    digest = certificate_spki_sha256(Path(env["HATO_TLS_CERT_FILE"]).read_bytes())
    live = f"{serve.host}:{serve.port}"
    with TestDNS() as dns:
        dns.tlsa(f"_25._tcp.{HOST}", 3, 1, 1, digest)
        good = doctor(dns, data_dir, "--live", live, "--json")
        dns.remove(f"_25._tcp.{HOST}")
        dns.tlsa(f"_25._tcp.{HOST}", 3, 1, 1, "11" * 32)
        bad = doctor(dns, data_dir, "--live", live, "--json")
        nothing = doctor(dns, data_dir, "--live", "127.0.0.1:1", "--json")
    tlsa = findings(good)[("TLSA", f"_25._tcp.{HOST}")]
    assert tlsa["status"] == "ok", tlsa
    assert tlsa["detail"] == f"3 1 1 {digest} matches the certificate at {live}"
    mismatch = findings(bad)[("TLSA", f"_25._tcp.{HOST}")]
    assert mismatch["status"] == "different"
    assert mismatch["fix"] == f"add _25._tcp.{HOST}. IN TLSA 3 1 1 {digest}"
    refused = findings(nothing)[("TLSA", f"_25._tcp.{HOST}")]
    assert refused["status"] == "error" and "no certificate from 127.0.0.1:1" in refused["detail"]
