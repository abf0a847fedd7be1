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
