"""The bounce parser over the corpus in tests/data/bounces/: one row per sample.

Each sample is a bounce shaped like the ones the named MTA sends (addresses and hosts
anonymised to example.* names and documentation IP space). A row says what the parser
must read from it: the form, the clues to the original message and each recipient's
action, status, SMTP code, remote MTA and hard/soft.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from hato.bounces import Bounce, decode_xtext, parse_bounce
from hato.dsn import FailedRecipient, build_bounce
from hato.reply import Reply

CORPUS = Path(__file__).parent.parent / "data" / "bounces"


@dataclass(frozen=True)
class Rcpt:
    address: str
    action: str
    status: str
    code: int = 0
    remote: str = ""
    hard: bool = True
    says: str = ""  # a piece of the diagnostic


@dataclass(frozen=True)
class Row:
    sample: str
    form: str
    recipients: tuple[Rcpt, ...]
    envid: str = ""
    message_id: str = ""


ROWS = [
    Row(
        "postfix-user-unknown",
        "rfc3464",
        (
            Rcpt(
                "nobody@example.net",
                "failed",
                "5.1.1",
                550,
                "mailstore.example.net",
                says="User unknown in virtual mailbox table",
            ),
            Rcpt(
                "full@example.net",
                "failed",
                "5.2.2",
                552,
                "mailstore.example.net",
                says="Mailbox full",
            ),
        ),
        envid="0193A1B2C3D4E5F6A7B",
        message_id="<order-1042.1764753160@example.com>",
    ),
    Row(
        "postfix-delayed",
        "rfc3464",
        (Rcpt("slow@example.net", "delayed", "4.4.1", hard=False, says="Connection timed out"),),
        envid="order+1043",  # xtext: order+2B1043
        message_id="<order-1043@example.com>",
    ),
    Row(
        "exim-dsn",
        "rfc3464",
        (Rcpt("gone@example.net", "failed", "5.1.1", 550, "mx2.example.net", says="User unknown"),),
        envid="0193A1B2C3D4E5F6C01",
        message_id="<welcome-77@example.com>",
    ),
    Row(
        "exim-text",
        "exim",
        (
            Rcpt(
                "old.user@example.org",
                "failed",
                "5.7.1",
                550,
                "mx.example.org",
                says="Mailbox disabled",
            ),
        ),
        message_id="<reminder-5@example.com>",
    ),
    Row(
        "exim-delay-text",
        "exim",
        (Rcpt("later@example.org", "delayed", "4.7.1", 451, hard=False, says="Greylisted"),),
    ),
    Row(
        "qmail",
        "qmail",
        (Rcpt("jdoe@example.org", "failed", "5.1.1", 550, "192.0.2.50", says="User unknown"),),
        message_id="<reset-9f2c@example.com>",
    ),
    Row(
        "exchange-2003",
        "exchange",
        (Rcpt("j.smith@corp.example.org", "failed", "5.1.1", says="does not exist"),),
        message_id="<q-report-2026-4@example.com>",
    ),
    Row(
        "exchange-2010-text",
        "exchange",
        (Rcpt("a.nobody@example.org", "failed", "5.1.1", 550, says="RESOLVER.ADR.RecipNotFound"),),
        message_id="<notes-3@example.com>",
    ),
    Row(
        "exchange-base64-status",
        "rfc3464",
        (
            Rcpt(
                "p.brown@corp.example.org",
                "failed",
                "5.2.2",
                554,
                "exch02.corp.example.org",
                says="QuotaExceededException",
            ),
        ),
        message_id="<invoice-2026-118@example.com>",
    ),
    Row(
        "office365",
        "rfc3464",
        (
            Rcpt(
                "m.jones@contoso.example.net",
                "failed",
                "5.1.10",
                550,
                "db8pr01mb0001.eurprd01.prod.example.net",
                says="RecipientNotFound",
            ),
        ),
        message_id="<contract-11@example.com>",
    ),
    Row(
        "gmail-dsn",
        "rfc3464",
        (
            Rcpt(
                "no.such.user@gmail.example.net",
                "failed",
                "5.1.1",
                550,
                "gmail-smtp-in.l.google.example.net",
                says="does not exist",
            ),
        ),
        message_id="<digest-12@example.com>",
    ),
    Row(
        "gmail-text",
        "gmail",
        (Rcpt("someone@example.org", "failed", "5.7.1", 554, says="Relay access denied"),),
        message_id="<hello-1@example.com>",
    ),
    Row(
        "postfix-text-only",
        "postfix",
        (
            Rcpt(
                "typo@exmaple.example.org", "failed", "5.0.0", says="Host or domain name not found"
            ),
            Rcpt(
                "quota@example.org",
                "failed",
                "4.2.2",
                452,
                "imap.example.org",
                hard=False,
                says="Over quota",
            ),
        ),
    ),
    Row(
        "delivery-status-mixed",
        "rfc3464",
        (Rcpt("left@example.org", "failed", "5.1.6", 550, "store.example.org", says="no longer"),),
        envid="news-2026-12",
        message_id="<newsletter-2026-12@example.com>",  # from Original-Message-ID
    ),
    Row(
        "smtputf8",
        "rfc3464",
        (Rcpt("jörg@example.net", "failed", "5.1.1", 550, says="unknown user"),),
    ),
]


def parse(sample: str, crlf: bool) -> Bounce | None:
    data = (CORPUS / f"{sample}.eml").read_bytes()
    if crlf:
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return parse_bounce(data)


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
@pytest.mark.parametrize("row", ROWS, ids=[r.sample for r in ROWS])
def test_corpus(row: Row, crlf: bool) -> None:
    bounce = parse(row.sample, crlf)
    assert bounce is not None
    assert bounce.form == row.form
    assert bounce.envid == row.envid
    assert bounce.message_id == row.message_id
    assert len(bounce.recipients) == len(row.recipients)
    for got, want in zip(bounce.recipients, row.recipients, strict=True):
        assert got.address == want.address
        assert got.action == want.action
        assert got.status == want.status
        assert got.reply_code == want.code
        assert got.remote_mta == want.remote
        assert got.hard is want.hard
        assert got.soft is (not want.hard)
        assert want.says in got.diagnostic, got.diagnostic
        assert "\n" not in got.diagnostic


@pytest.mark.parametrize("sample", ["vacation", "read-receipt", "plain-mail"])
def test_what_is_not_a_bounce(sample: str) -> None:
    assert parse(sample, crlf=False) is None
    assert parse(sample, crlf=True) is None


def test_every_sample_has_a_row() -> None:
    samples = {p.stem for p in CORPUS.glob("*.eml")}
    assert samples == {r.sample for r in ROWS} | {"vacation", "read-receipt", "plain-mail"}


def test_a_hato_dsn_reads_back() -> None:
    original = b"From: app@example.com\r\nMessage-ID: <m-1@example.com>\r\n\r\nhi\r\n"
    built = build_bounce(
        hostname="relay.example.com",
        queue_id="0193A1B2C3D4E5F6A7B",
        sender="app@example.com",
        recipients=[
            FailedRecipient(
                "x@example.net",
                Reply(550, "5.1.1", "no such user\nsecond line"),
                "mx.example.net[192.0.2.1]:25",
            )
        ],
        original=original,
        arrival=1_764_750_000.0,
        now=1_764_750_060.0,
    )
    assert built is not None
    bounce = parse_bounce(built.data)
    assert bounce is not None
    assert bounce.hato_queue_id == "0193A1B2C3D4E5F6A7B"
    assert bounce.reporting_mta == "relay.example.com"
    assert bounce.message_id == "<m-1@example.com>"
    [r] = bounce.recipients
    assert (r.address, r.action, r.status, r.reply_code) == (
        "x@example.net",
        "failed",
        "5.1.1",
        550,
    )
    assert r.remote_mta == "mx.example.net"
    assert r.diagnostic == "550 5.1.1 no such user second line"
    assert bounce.hard


def test_the_verp_token_comes_from_the_envelope_recipient() -> None:
    data = (CORPUS / "qmail.eml").read_bytes()
    token = "0193a1b2c3d4e5f6a7b.0123456789abcdef"
    bounce = parse_bounce(data, ["postmaster@example.com", f"app+{token}@example.com"])
    assert bounce is not None
    assert bounce.verp_token == token
    plain = parse_bounce(data, ["app@example.com"])
    assert plain is not None and plain.verp_token == ""


@pytest.mark.parametrize(
    ("xtext", "text"),
    [("abc", "abc"), ("a+2Bb", "a+b"), ("a+3Db+20c", "a=b c"), ("bad+zz", "bad+zz")],
)
def test_xtext(xtext: str, text: str) -> None:
    assert decode_xtext(xtext) == text


def test_garbage_is_not_a_bounce() -> None:
    assert parse_bounce(b"") is None
    assert parse_bounce(b"\xff\xfe\x00garbage\r\n\r\n") is None
    nested = b"Content-Type: multipart/mixed; boundary=a\r\n\r\n" + b"--a\r\n" * 50
    assert parse_bounce(nested) is None
