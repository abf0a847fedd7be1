"""The record texts and comparisons of :mod:`hato.records`, without DNS."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from hato.dkim import DKIMRecord
from hato.records import (
    address_line,
    dkim_tags,
    dmarc_record,
    mx_line,
    ptr_line,
    records_text,
    spf_record,
    spf_verdict,
    txt_line,
)

V4 = ipaddress.ip_address("203.0.113.7")
V6 = ipaddress.ip_address("2001:db8::7")


def test_spf_record_as_in_the_guide() -> None:
    assert spf_record([V4]) == "v=spf1 ip4:203.0.113.7 -all"
    assert spf_record([V4, V6]) == "v=spf1 ip4:203.0.113.7 ip6:2001:db8::7 -all"
    assert spf_record([]) == "v=spf1 mx -all"


def test_dmarc_record() -> None:
    assert dmarc_record("dbmx.net") == "v=DMARC1; p=quarantine; rua=mailto:postmaster@dbmx.net"


@pytest.mark.parametrize(
    ("record", "ip", "verdict"),
    [
        ("v=spf1 ip4:203.0.113.7 -all", V4, True),
        ("v=spf1 ip4:203.0.113.0/24 -all", V4, True),
        ("v=spf1 +ip4:203.0.113.7 ~all", V4, True),
        ("v=spf1 -ip4:203.0.113.7 +all", V4, False),
        ("v=spf1 ip4:198.51.100.1 -all", V4, False),
        ("v=spf1 ip6:2001:db8::/32 -all", V6, True),
        ("v=spf1 ip4:203.0.113.7 -all", V6, False),
        ("v=spf1 mx -all", V4, None),
        ("v=spf1 include:_spf.provider.example -all", V4, None),
        ("v=spf1 ip4:bogus ip4:203.0.113.7 -all", V4, True),
        ("v=spf1 -all", V4, False),
    ],
)
def test_spf_verdict(record: str, ip: ipaddress.IPv4Address, verdict: bool | None) -> None:
    assert spf_verdict(record, ip) is verdict


def test_dkim_tags_ignore_whitespace_in_values() -> None:
    assert dkim_tags("v=DKIM1; k=rsa; p=MIIB IjAN\tBgkq ;") == {
        "v": "DKIM1",
        "k": "rsa",
        "p": "MIIBIjANBgkq",
    }


def test_records_text_zone_and_words() -> None:
    dkim = DKIMRecord("dbmx.net", "s1", "v=DKIM1; k=ed25519; p=AAAA")
    text = records_text("dbmx.net", "dbmx.net", [V4], [dkim], Path("/keys"))
    lines = text.splitlines()
    assert "dbmx.net. IN MX 10 dbmx.net." in lines
    assert "dbmx.net. IN A 203.0.113.7" in lines
    assert 'dbmx.net. IN TXT "v=spf1 ip4:203.0.113.7 -all"' in lines
    assert dkim.zone_line() in lines
    assert (
        '_dmarc.dbmx.net. IN TXT "v=DMARC1; p=quarantine; rua=mailto:postmaster@dbmx.net"' in lines
    )
    assert "7.113.0.203.in-addr.arpa. IN PTR dbmx.net." in lines
    assert 'DKIM (ed25519): a TXT record named "s1._domainkey.dbmx.net"' in text


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (mx_line("dbmx.net", "mail.dbmx.net"), "dbmx.net. IN MX 10 mail.dbmx.net."),
        (address_line("mail.dbmx.net", V4), "mail.dbmx.net. IN A 203.0.113.7"),
        (address_line("mail.dbmx.net", V6), "mail.dbmx.net. IN AAAA 2001:db8::7"),
        (txt_line("dbmx.net", 'say "hi" \\o/'), 'dbmx.net. IN TXT "say \\"hi\\" \\\\o/"'),
        (ptr_line(V4, "mail.dbmx.net"), "7.113.0.203.in-addr.arpa. IN PTR mail.dbmx.net."),
    ],
)
def test_zone_lines(line: str, expected: str) -> None:
    assert line == expected


# --- MTA-STS, TLS-RPT, TLSA, alignment --------------------------------------------------


def test_own_mta_sts_policy_and_record() -> None:
    from hato.records import mta_sts_id, mta_sts_policy, mta_sts_record, parse_mta_sts_policy

    policy = mta_sts_policy(["mail.dbmx.net"], "enforce", 604800)
    assert policy == "version: STSv1\r\nmode: enforce\r\nmx: mail.dbmx.net\r\nmax_age: 604800\r\n"
    assert parse_mta_sts_policy(policy) == {
        "version": ["STSv1"],
        "mode": ["enforce"],
        "mx": ["mail.dbmx.net"],
        "max_age": ["604800"],
    }
    ident = mta_sts_id(policy)
    assert ident.isalnum() and 1 <= len(ident) <= 32
    assert mta_sts_record(policy) == f"v=STSv1; id={ident}"
    assert mta_sts_id(mta_sts_policy(["mail.dbmx.net"], "testing", 604800)) != ident


@pytest.mark.parametrize(
    ("pattern", "host", "match"),
    [
        ("mail.example.org", "mail.example.org", True),
        ("mail.example.org", "MAIL.example.org.", True),
        ("*.example.org", "mx1.example.org", True),
        ("*.example.org", "a.b.example.org", False),
        ("*.example.org", "example.org", False),
        ("mail.example.org", "mx.example.org", False),
    ],
)
def test_mx_patterns(pattern: str, host: str, match: bool) -> None:
    from hato.records import mx_matches

    assert mx_matches(pattern, host) is match


@pytest.mark.parametrize(
    ("domain", "from_domain", "mode", "ok"),
    [
        ("example.org", "example.org", "s", True),
        ("bounce.example.org", "example.org", "r", True),
        ("bounce.example.org", "example.org", "s", False),
        ("example.net", "example.org", "r", False),
        ("a.example.co.uk", "example.co.uk", "r", True),
        ("other.co.uk", "example.co.uk", "r", False),
    ],
)
def test_dmarc_alignment(domain: str, from_domain: str, mode: str, ok: bool) -> None:
    from hato.records import aligned

    assert aligned(domain, from_domain, mode) is ok


def test_tlsa_of_a_certificate() -> None:
    import hashlib

    import trustme
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from hato.records import certificate_spki_sha256, tlsa_name, tlsa_record

    pem = trustme.CA().issue_cert("mail.dbmx.net").cert_chain_pems[0].bytes()
    spki = (
        x509.load_pem_x509_certificate(pem)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert certificate_spki_sha256(pem) == hashlib.sha256(spki).hexdigest()
    assert tlsa_record("AB" * 32) == "3 1 1 " + "ab" * 32
    assert tlsa_name("mail.dbmx.net") == "_25._tcp.mail.dbmx.net"


def test_records_text_with_mta_sts_tlsrpt_and_tlsa() -> None:
    text = records_text(
        "dbmx.net",
        "dbmx.net",
        [V4],
        [],
        Path("/keys"),
        mta_sts="version: STSv1\r\nmode: testing\r\nmx: dbmx.net\r\nmax_age: 86400\r\n",
        tlsrpt_rua=["tls@dbmx.net"],
        tlsa="3 1 1 " + "00" * 32,
    )
    lines = text.splitlines()
    assert any(line.startswith('_mta-sts.dbmx.net. IN TXT "v=STSv1; id=') for line in lines)
    assert '_smtp._tls.dbmx.net. IN TXT "v=TLSRPTv1; rua=mailto:tls@dbmx.net"' in lines
    assert "_25._tcp.dbmx.net. IN TLSA 3 1 1 " + "00" * 32 in lines
    assert "certbot --reuse-key" in text
    # Without them, the output is as before.
    assert "_mta-sts" not in records_text("dbmx.net", "dbmx.net", [V4], [], Path("/keys"))
