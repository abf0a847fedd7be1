"""The guide's whole chain with Hato in both roles, checked by independent verifiers.

    smtplib ──> Hato local relay ──(STARTTLS + AUTH postfix@dbmx.net)──> Hato relay server
        ──(MX lookup in the test DNS, opportunistic TLS)──> Debian's Postfix (example.net's MX)
        ──> Maildir

On the message as Postfix wrote it into the Maildir: the RSA signature is checked by
Mail::DKIM (libmail-dkim-perl), the Ed25519 one by dkimpy, SPF for the relay server's
address by pyspf, each against the test DNS only. The delivered headers and the verdicts
are printed (``pytest -s``) and written to ``chain-report.txt`` in the test's tmp dir.
"""

from __future__ import annotations

import email.utils
import smtplib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from peers.dns import TestDNS
from peers.hato import HatoServe
from peers.postfix_mx import PostfixMX
from peers.verify import (
    check_spf,
    from_domain,
    header_section,
    mail_dkim_available,
    mail_dkim_version,
    txt_lookup,
    verify_dkimpy,
    verify_mail_dkim,
)

if TYPE_CHECKING:  # both conftest modules are named conftest: import types only
    from conftest import RelayServer

DOMAIN = "dbmx.net"
RELAY_HOSTNAME = "relay.dbmx.net"
RECIPIENT = "someone@example.net"
SENDER = f"noreply@{DOMAIN}"


def compose(subject: str, message_id: str) -> bytes:
    return (
        f"From: Fakebook <{SENDER}>\r\n"
        f"To: {RECIPIENT}\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {email.utils.formatdate(localtime=False)}\r\n"
        f"Message-ID: <{message_id}@{DOMAIN}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Welcome! Confirm your address with the link below.\r\n"
        "https://app.example/confirm?token=abc123\r\n"
        "\r\n"
        ".a line starting with a dot, and 8-bit text: \u3053\u3093\u306b\u3061\u306f\r\n"
    ).encode()


def test_hato_local_relay_to_hato_relay_server_to_postfix_mx(
    relay_server: RelayServer,
    local_relay_factory: Callable[..., HatoServe],
    postfix_mx: PostfixMX,
    dns_server: TestDNS,
    tmp_path: Path,
) -> None:
    mail_dkim_available()
    local = local_relay_factory(relay_server)

    message = compose("Confirm your address", "chain-1")
    with smtplib.SMTP(local.host, local.port, timeout=30) as client:
        client.ehlo("web.app.internal")
        refused = client.sendmail(SENDER, [RECIPIENT], message, ["BODY=8BITMIME"])
    assert refused == {}

    [delivered] = postfix_mx.wait_for(RECIPIENT, timeout=60)
    data = delivered.crlf
    head = header_section(data)
    server = ("127.0.0.1", dns_server.port)

    rsa_results = verify_mail_dkim(data, server)
    dkimpy_results = verify_dkimpy(data, server)
    return_path = delivered.message["Return-Path"]
    envelope_sender = email.utils.parseaddr(str(return_path))[1]
    spf = check_spf("127.0.0.1", envelope_sender, RELAY_HOSTNAME, server)
    dmarc = [t.decode() for t in txt_lookup(server, f"_dmarc.{DOMAIN}")]

    report = "\n".join(
        [
            "=== the chain: smtplib -> Hato local relay -> Hato relay server "
            "(submission, STARTTLS, AUTH) -> Postfix MX -> Maildir ===",
            f"delivered file: {delivered.path}",
            "--- header section as delivered ---",
            head,
            "--- verifiers (all against the test DNS) ---",
            f"Mail::DKIM {mail_dkim_version()} (libmail-dkim-perl):",
            *(f"  {r}" for r in rsa_results),
            "dkimpy:",
            *(f"  {r}" for r in dkimpy_results),
            "pyspf:",
            f"  {spf}",
            f"DMARC record _dmarc.{DOMAIN}: {dmarc}",
            f"From domain: {from_domain(data)}",
        ]
    )
    print("\n" + report)
    (tmp_path / "chain-report.txt").write_text(report + "\n")

    # The route: both Hato hops, TLS on each, then Postfix's virtual delivery.
    received = delivered.headers("Received")
    assert len(received) >= 3, received
    by_postfix, by_relay_server = received[0], received[1]
    assert "by mx.example.net (Postfix)" in by_postfix and "ESMTPS" in by_postfix, by_postfix
    assert "using TLS" in by_postfix, by_postfix  # opportunistic STARTTLS to the MX
    assert RELAY_HOSTNAME in by_relay_server and "ESMTPSA" in by_relay_server, by_relay_server
    assert envelope_sender == SENDER
    assert delivered.message["Message-ID"] == f"<chain-1@{DOMAIN}>"
    assert "\u3053\u3093\u306b\u3061\u306f" in delivered.message.get_content()

    # Two signatures by the relay server, for the From domain.
    signatures = delivered.headers("DKIM-Signature")
    assert len(signatures) == 2, signatures
    assert {(r.domain, r.selector, r.algorithm) for r in dkimpy_results} == {
        (DOMAIN, "s1", "rsa-sha256"),
        (DOMAIN, "s2", "ed25519-sha256"),
    }

    # RSA: Mail::DKIM says pass (its Debian 12 version knows no Ed25519).
    [rsa] = [r for r in rsa_results if r.algorithm == "rsa-sha256"]
    assert rsa.passed and (rsa.domain, rsa.selector) == (DOMAIN, "s1"), rsa_results
    # Ed25519 (and RSA once more): dkimpy says pass.
    [ed25519] = [r for r in dkimpy_results if r.algorithm == "ed25519-sha256"]
    assert ed25519.passed, dkimpy_results
    assert all(r.passed for r in dkimpy_results), dkimpy_results
    # SPF for the relay server's address, and DMARC alignment of both.
    assert spf.passed, spf
    assert len(dmarc) == 1 and dmarc[0].startswith("v=DMARC1; p=reject"), dmarc
    assert from_domain(data) == DOMAIN == rsa.domain == envelope_sender.rpartition("@")[2]

    # Each hop says what it did in its operator log.
    assert f"sasl_username={relay_server.user}" in relay_server.serve.log
    assert "status=sent" in local.log and "status=sent" in relay_server.serve.log
    assert relay_server.password not in local.log + relay_server.serve.log


def test_the_verifiers_can_say_no(dns_server: TestDNS, tmp_path: Path) -> None:
    """A control for the chain test: the same verifiers fail a tampered message, a key
    missing from DNS and a foreign address, so their "pass" above means something."""
    from hato.dkim import dkim_txt_records, generate_key, load_signers

    generate_key(DOMAIN, "s1", "rsa", directory=tmp_path)
    generate_key(DOMAIN, "s2", "ed25519", directory=tmp_path)
    for record in dkim_txt_records(tmp_path):
        dns_server.txt(record.name, record.txt)
    signed = load_signers(tmp_path).sign(compose("control", "control-1"))
    server = ("127.0.0.1", dns_server.port)

    assert [r.result for r in verify_mail_dkim(signed, server) if r.selector == "s1"] == ["pass"]
    assert [r.passed for r in verify_dkimpy(signed, server)] == [True, True]

    # The token, not "token=abc123": signing wrote the 8-bit body as quoted-printable.
    tampered = signed.replace(b"abc123", b"evil99")
    assert [r.result for r in verify_mail_dkim(tampered, server) if r.selector == "s1"] == ["fail"]
    assert [r.passed for r in verify_dkimpy(tampered, server)] == [False, False]

    dns_server.remove("s2._domainkey.dbmx.net")
    assert {r.selector: r.passed for r in verify_dkimpy(signed, server)} == {
        "s1": True,
        "s2": False,
    }

    assert check_spf("127.0.0.2", SENDER, RELAY_HOSTNAME, server).result == "fail"
    assert check_spf("127.0.0.1", "noreply@unknown.example", RELAY_HOSTNAME, server).result == (
        "none"
    )
