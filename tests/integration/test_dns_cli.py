"""``hato dns records`` and ``hato dns check`` as a user runs them, against the test DNS."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hato.dkim import DKIMRecord, generate_key
from peers.dns import TestDNS

SRC = str(Path(__file__).resolve().parents[2] / "src")
DOMAIN = "example.test"
HOST = "mail.example.test"
IP4, IP6 = "192.0.2.25", "2001:db8::25"


def hato(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HATO_", "RELAYHOST"))}
    full_env["PYTHONPATH"] = SRC + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "hato", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def keys(data_dir: Path) -> tuple[DKIMRecord, DKIMRecord]:
    rsa = generate_key(DOMAIN, "rsa2024", "rsa", directory=data_dir / "dkim")
    ed = generate_key(DOMAIN, "ed2024", "ed25519", directory=data_dir / "dkim")
    return rsa, ed


@pytest.fixture
def test_dns() -> Iterator[TestDNS]:
    with TestDNS() as server:
        yield server


def publish_all(dns: TestDNS, keys: tuple[DKIMRecord, DKIMRecord]) -> None:
    dns.mx(DOMAIN, (10, HOST))
    dns.a(HOST, IP4)
    dns.aaaa(HOST, IP6)
    dns.txt(DOMAIN, f"v=spf1 ip4:{IP4} ip6:{IP6} -all", "google-site-verification=abc")
    for record in keys:
        dns.txt(record.name, record.txt)
    dns.txt(f"_dmarc.{DOMAIN}", f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{DOMAIN}")
    dns.ptr(IP4, HOST)
    dns.ptr(IP6, HOST)


def statuses(output: str) -> dict[tuple[str, str], str]:
    """``(kind, name) → status`` from check's output."""
    out = {}
    for line in output.splitlines():
        parts = line.split()
        if parts and parts[0] in ("ok", "missing", "different", "error"):
            out[(parts[1], parts[2].rstrip(":"))] = parts[0]
    return out


# records


def test_records_prints_every_record(data_dir: Path, keys: tuple[DKIMRecord, DKIMRecord]) -> None:
    rsa, ed = keys
    result = hato(
        "dns", "records", DOMAIN, "--ip", IP4, "--ip", IP6, "--hostname", HOST,
        "--data-dir", str(data_dir),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for expected in (
        f"{DOMAIN}. IN MX 10 {HOST}.",
        f"{HOST}. IN A {IP4}",
        f"{HOST}. IN AAAA {IP6}",
        f'{DOMAIN}. IN TXT "v=spf1 ip4:{IP4} ip6:{IP6} -all"',
        rsa.zone_line(),
        ed.zone_line(),
        f'_dmarc.{DOMAIN}. IN TXT "v=DMARC1; p=quarantine; rua=mailto:postmaster@{DOMAIN}"',
        f"25.2.0.192.in-addr.arpa. IN PTR {HOST}.",
    ):
        assert expected in lines, expected
    assert any(line.endswith(f"ip6.arpa. IN PTR {HOST}.") for line in lines)
    # The plain-words part names each record for a registrar's form.
    text = result.stdout
    assert "In plain words:" in text
    assert f'a TXT record named "rsa2024._domainkey.{DOMAIN}"' in text
    assert f'ask your hosting provider to set the name of {IP4} to "{HOST}"' in text


def test_records_with_one_selector(data_dir: Path, keys: tuple[DKIMRecord, DKIMRecord]) -> None:
    rsa, ed = keys
    result = hato(
        "dns", "records", DOMAIN, "--ip", IP4, "--selector", "ed2024", "--hostname", HOST,
        "--data-dir", str(data_dir),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert ed.zone_line() in result.stdout
    assert rsa.name not in result.stdout


def test_records_without_ip_uses_mx_in_spf(data_dir: Path) -> None:
    result = hato(
        "dns", "records", DOMAIN, "--data-dir", str(data_dir), env={"HATO_HOSTNAME": HOST}
    )
    assert result.returncode == 0, result.stderr
    assert f'{DOMAIN}. IN TXT "v=spf1 mx -all"' in result.stdout.splitlines()
    assert "hato dkim keygen --domain example.test" in result.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--selector", "nosuch", "--hostname", HOST], "no DKIM key for selector 'nosuch'"),
        (["--ip", "999.1.1.1", "--hostname", HOST], "is not an IP address"),
        (["--hostname", "localhost"], "not fully qualified"),
    ],
)
def test_records_errors_are_one_line(data_dir: Path, args: list[str], fragment: str) -> None:
    result = hato("dns", "records", DOMAIN, "--data-dir", str(data_dir), *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("hato: ") and fragment in line, line


# check


def check(
    test_dns: TestDNS, data_dir: Path, *extra: str, via_env: bool = False
) -> subprocess.CompletedProcess[str]:
    env = {"HATO_HOSTNAME": HOST}
    args = ["dns", "check", DOMAIN, "--data-dir", str(data_dir), "--timeout", "3", *extra]
    if via_env:
        env["HATO_DNS_SERVERS"] = test_dns.server
    else:
        args += ["--dns-server", test_dns.server]
    return hato(*args, env=env)


def test_check_all_ok(
    test_dns: TestDNS, data_dir: Path, keys: tuple[DKIMRecord, DKIMRecord]
) -> None:
    publish_all(test_dns, keys)
    result = check(test_dns, data_dir, "--ip", IP4, "--ip", IP6)
    assert result.returncode == 0, result.stdout + result.stderr
    found = statuses(result.stdout)
    assert set(found.values()) == {"ok"}, result.stdout
    assert ("MX", DOMAIN) in found and ("SPF", DOMAIN) in found
    assert ("DKIM", f"rsa2024._domainkey.{DOMAIN}") in found
    assert ("DKIM", f"ed2024._domainkey.{DOMAIN}") in found
    assert ("AAAA", HOST) in found and ("DMARC", f"_dmarc.{DOMAIN}") in found
    assert sum(kind == "PTR" for kind, _ in found) == 2
    assert "all 9 record(s) ok" in result.stdout
    # The long RSA record does not fit a 512-byte UDP answer: it came over TCP.
    assert (f"rsa2024._domainkey.{DOMAIN}", "TXT") in test_dns.queries


def test_check_resolver_from_the_environment_and_ips_from_dns(
    test_dns: TestDNS, data_dir: Path, keys: tuple[DKIMRecord, DKIMRecord]
) -> None:
    publish_all(test_dns, keys)
    result = check(test_dns, data_dir, via_env=True)  # no --ip: the host's A/AAAA
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"via {test_dns.server}" in result.stdout
    assert "all 9 record(s) ok" in result.stdout


def test_check_reports_missing_and_different(
    test_dns: TestDNS, data_dir: Path, keys: tuple[DKIMRecord, DKIMRecord]
) -> None:
    rsa, ed = keys
    test_dns.mx(DOMAIN, (10, "mx.elsewhere.test"))
    test_dns.a(HOST, "192.0.2.99")
    test_dns.txt(DOMAIN, "v=spf1 ip4:198.51.100.0/24 -all")
    test_dns.txt(rsa.name, "v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAold")
    # ed2024 not published, no DMARC
    test_dns.ptr(IP4, "vps-1234.provider.test")
    result = check(test_dns, data_dir, "--ip", IP4)
    assert result.returncode == 1
    found = statuses(result.stdout)
    assert found == {
        ("MX", DOMAIN): "different",
        ("A", HOST): "different",
        ("SPF", DOMAIN): "different",
        ("DKIM", rsa.name): "different",
        ("DKIM", ed.name): "missing",
        ("DMARC", f"_dmarc.{DOMAIN}"): "missing",
        ("PTR", "25.2.0.192.in-addr.arpa"): "different",
    }, result.stdout
    out = result.stdout
    assert f"fix: set {DOMAIN}. IN MX 10 {HOST}." in out
    assert f'fix: set {DOMAIN}. IN TXT "v=spf1 ip4:{IP4} -all"' in out
    assert f"fix: add {ed.zone_line()}" in out
    assert f"fix: ask the provider of {IP4} to set its reverse DNS to {HOST}" in out
    assert "7 of 7 record(s) need attention" in result.stderr


def test_check_nothing_published(test_dns: TestDNS, data_dir: Path) -> None:
    test_dns.exists(DOMAIN)
    result = check(test_dns, data_dir, "--ip", IP4)
    assert result.returncode == 1
    found = statuses(result.stdout)
    assert found[("MX", DOMAIN)] == "missing"
    assert found[("SPF", DOMAIN)] == "missing"
    assert found[("DKIM", DOMAIN)] == "missing"  # no key at all: make one
    assert "hato dkim keygen --domain example.test" in result.stdout


def test_check_dns_failure_is_an_error(
    test_dns: TestDNS, data_dir: Path, keys: tuple[DKIMRecord, DKIMRecord]
) -> None:
    publish_all(test_dns, keys)
    test_dns.servfail(f"_dmarc.{DOMAIN}")
    result = check(test_dns, data_dir, "--ip", IP4)
    assert result.returncode == 1
    assert statuses(result.stdout)[("DMARC", f"_dmarc.{DOMAIN}")] == "error"
    assert "4.4.3" in result.stdout


def test_check_bad_dns_server_is_one_line(data_dir: Path) -> None:
    result = hato(
        "dns", "check", DOMAIN, "--data-dir", str(data_dir), "--dns-server", "dns.example:53",
        env={"HATO_HOSTNAME": HOST},
    )  # fmt: skip
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "HATO_DNS_SERVERS" in line and "not an IP address" in line
