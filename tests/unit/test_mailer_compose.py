"""Building messages for the outbox: structure, encodings, Bcc, header injection (pure, no I/O)."""

from __future__ import annotations

import email
import email.header
import email.policy
import email.utils
import re
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from pathlib import Path

import pytest

from hato import AddressError, ConfigError, compose
from hato.mailer import IDEMPOTENCY_HEADER, MAX_SEND_AT_DELAY, Email, Mailer, compose_email

T0 = 1_700_000_000.0
FROM = "App <noreply@app.example>"


def clock() -> float:
    return T0


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects
    for part in msg.walk():
        assert not part.defects, part.defects
    return msg


def header_names(data: bytes) -> list[str]:
    head = data.split(b"\r\n\r\n", 1)[0].decode("ascii")
    return [line.split(":", 1)[0].lower() for line in head.split("\r\n") if line[:1] not in " \t"]


def assert_wire_clean(data: bytes) -> None:
    """7-bit, CRLF only, no line over 998 characters."""
    assert data.isascii()
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def test_plain_text_message() -> None:
    c = compose("user@example.net", "Welcome", "Hello!\n", from_=FROM, clock=clock)
    assert c.envelope.sender == "noreply@app.example"
    assert c.envelope.recipients == ["user@example.net"]
    assert_wire_clean(c.data)
    msg = parse(c.data)
    assert msg["From"] == FROM
    assert msg["To"] == "user@example.net"
    assert msg["Subject"] == "Welcome"
    assert msg["Date"].datetime == datetime.fromtimestamp(T0, UTC)
    assert msg["Message-ID"] == c.message_id
    assert re.fullmatch(r"<hato\.[0-9a-f]{32}@app\.example>", c.message_id)
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "text/plain"
    assert msg["Content-Transfer-Encoding"] == "7bit"
    assert msg.get_content() == "Hello!\r\n"
    assert c.idempotency_key is None and c.not_before is None


def test_text_and_html_are_multipart_alternative() -> None:
    c = compose("u@example.net", "Hi", "plain body", "<p>html body</p>", from_=FROM)
    msg = parse(c.data)
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert parts[0].get_content().strip() == "plain body"
    assert parts[1].get_content().strip() == "<p>html body</p>"
    body = msg.get_body(preferencelist=("html", "plain"))
    assert body is not None and body.get_content_type() == "text/html"


def test_html_only_and_empty_bodies() -> None:
    html = parse(compose("u@example.net", "Hi", html="<b>x</b>", from_=FROM).data)
    assert html.get_content_type() == "text/html"
    empty = parse(compose("u@example.net", "Hi", from_=FROM).data)
    assert empty.get_content_type() == "text/plain"
    assert empty.get_content() == ""


def test_attachments_with_mime_types(tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    c = compose(
        "u@example.net",
        "Files",
        "see attached",
        "<p>see attached</p>",
        from_=FROM,
        attachments=[
            ("report.pdf", b"%PDF-1.7 \x00\xff"),
            ("data.bin", b"\x00\x01\x02"),
            ("notes.txt", b"line 1\nline 2\n"),
            ("custom.dat", b"x", "application/x-custom"),
            ("résumé.txt", "été".encode()),
            ("mail.eml", b"Subject: inner\r\n\r\nbody\r\n"),
            photo,
            str(photo),
        ],
    )
    assert_wire_clean(c.data)
    msg = parse(c.data)
    assert msg.get_content_type() == "multipart/mixed"
    first, *files = list(msg.iter_parts())
    assert first.get_content_type() == "multipart/alternative"
    got = [(p.get_filename(), p.get_content_type(), p.get_payload(decode=True)) for p in files]
    assert got == [
        ("report.pdf", "application/pdf", b"%PDF-1.7 \x00\xff"),
        ("data.bin", "application/octet-stream", b"\x00\x01\x02"),
        ("notes.txt", "text/plain", b"line 1\nline 2\n"),  # bytes kept exactly
        ("custom.dat", "application/x-custom", b"x"),
        ("résumé.txt", "text/plain", "été".encode()),
        # message/* may not be base64 (RFC 2046), so opaque bytes go as octet-stream
        ("mail.eml", "application/octet-stream", b"Subject: inner\r\n\r\nbody\r\n"),
        ("photo.png", "image/png", photo.read_bytes()),
        ("photo.png", "image/png", photo.read_bytes()),
    ]
    assert all(p.get_content_disposition() == "attachment" for p in files)


def test_attachment_errors(tmp_path: Path) -> None:
    with pytest.raises(AddressError):
        compose("u@x.org", "s", from_=FROM, attachments=[("a\r\nX-Evil: 1", b"x")])
    with pytest.raises(AddressError):
        compose("u@x.org", "s", from_=FROM, attachments=[("a.txt", b"x", "not a type")])
    with pytest.raises(TypeError):
        compose("u@x.org", "s", from_=FROM, attachments=[("a.txt", "not bytes")])  # type: ignore[list-item]
    with pytest.raises(Exception, match="missing"):
        compose("u@x.org", "s", from_=FROM, attachments=[tmp_path / "missing.pdf"])


def test_non_ascii_subject_names_and_bodies() -> None:
    subject = "パスワードの再設定 — Héllo " * 4
    text = "こんにちは世界\n" * 3
    html = "<p>Ünïcödé ça va</p>\n" + "x" * 300
    c = compose(
        ["Jöhn Dœ, Jr. <john@bücher.example>", Address("Zoë", "zoe", "example.org")],
        subject,
        text,
        html,
        from_="Äpp Tëam <noreply@app.example>",
        cc="Ünïcödé <cc@example.org>",
        reply_to='"Support, Team" <help@app.example>',
    )
    assert_wire_clean(c.data)
    msg = parse(c.data)
    assert msg["Subject"] == subject
    assert msg["From"].addresses[0].display_name == "Äpp Tëam"
    to = msg["To"].addresses
    assert [(a.display_name, a.addr_spec) for a in to] == [
        ("Jöhn Dœ, Jr.", "john@xn--bcher-kva.example"),
        ("Zoë", "zoe@example.org"),
    ]
    assert msg["Cc"].addresses[0].display_name == "Ünïcödé"
    assert msg["Reply-To"].addresses[0].display_name == "Support, Team"
    plain, rich = list(msg.iter_parts())
    assert plain["Content-Transfer-Encoding"] == "base64"  # mostly Japanese: smaller
    assert plain.get_content().replace("\r\n", "\n") == text
    assert rich["Content-Transfer-Encoding"] == "quoted-printable"
    assert rich.get_content().replace("\r\n", "\n") == html + "\n"
    assert c.envelope.recipients == [
        "john@xn--bcher-kva.example",
        "zoe@example.org",
        "cc@example.org",
    ]


def test_line_endings_are_normalised_and_long_lines_encoded() -> None:
    c = compose("u@x.org", "s", "a\nb\rc\r\nd" + "y" * 2000, from_=FROM)
    assert_wire_clean(c.data)
    assert parse(c.data).get_content() == "a\r\nb\r\nc\r\nd" + "y" * 2000 + "\r\n"


def test_long_recipient_lists_fold_between_addresses() -> None:
    to = [f"Person Number {i} <person.number.{i}@example.org>" for i in range(40)]
    c = compose(to, "s", "x", from_=FROM)
    assert_wire_clean(c.data)
    head = c.data.split(b"\r\n\r\n")[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 78
    assert len(parse(c.data)["To"].addresses) == 40


def test_bcc_is_in_the_envelope_only() -> None:
    c = compose(
        "to@example.org",
        "s",
        "x",
        from_=FROM,
        cc="cc@example.org",
        bcc=["Secret Person <secret@example.org>", "hidden@example.net"],
    )
    assert c.envelope.recipients == [
        "to@example.org",
        "cc@example.org",
        "secret@example.org",
        "hidden@example.net",
    ]
    assert "bcc" not in header_names(c.data)
    assert b"secret" not in c.data.lower() and b"hidden" not in c.data.lower()


def test_bcc_only_message_has_no_to_header() -> None:
    c = compose([], "s", "x", from_=FROM, bcc="only@example.org")
    assert c.envelope.recipients == ["only@example.org"]
    assert "to" not in header_names(c.data)
    assert b"only@" not in c.data


def test_recipients_are_deduplicated_in_order() -> None:
    c = compose(["a@x.org", "B@x.org"], "s", from_=FROM, cc="a@x.org", bcc=["b@x.org", "c@x.org"])
    assert c.envelope.recipients == ["a@x.org", "B@x.org", "c@x.org"]


INJECTIONS = ["\r\nBcc: victim@evil.example", "\nX-Evil: 1", "\rX-Evil: 1", "a\x00b"]


@pytest.mark.parametrize("evil", INJECTIONS)
@pytest.mark.parametrize(
    "field",
    [
        "subject",
        "to",
        "to_name",
        "cc",
        "bcc",
        "from_",
        "from_name",
        "reply_to",
        "header_value",
        "idempotency_key",
        "filename",
    ],
)
def test_header_injection_is_refused(field: str, evil: str) -> None:
    kwargs: dict[str, object] = {
        "to": "u@example.net",
        "subject": "hello",
        "text": "body",
        "from_": FROM,
    }
    if field == "subject":
        kwargs["subject"] = "hello" + evil
    elif field == "to":
        kwargs["to"] = "u@example.net" + evil
    elif field == "to_name":
        kwargs["to"] = f"Name{evil} <u@example.net>"
    elif field in ("cc", "bcc", "reply_to"):
        kwargs[field] = "x@example.net" + evil
    elif field == "from_":
        kwargs["from_"] = "noreply@app.example" + evil
    elif field == "from_name":
        kwargs["from_"] = f"App{evil} <noreply@app.example>"
    elif field == "header_value":
        kwargs["headers"] = {"X-Campaign": "spring" + evil}
    elif field == "idempotency_key":
        kwargs["idempotency_key"] = "key" + evil
    elif field == "filename":
        kwargs["attachments"] = [("a.txt" + evil, b"x")]
    with pytest.raises(AddressError):
        compose(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["X Bad", "X:Bad", "Bcc", "bcc", "To", "Content-Type", "", "Ä"])
def test_bad_or_reserved_header_names_are_refused(name: str) -> None:
    with pytest.raises(AddressError):
        compose("u@x.org", "s", from_=FROM, headers={name: "v"})


def test_extra_headers_and_replaceable_ones() -> None:
    c = compose(
        "u@x.org",
        "s",
        "x",
        from_=FROM,
        headers={
            "List-Unsubscribe": "<https://app.example/unsubscribe?u=1>",
            "X-Note": "ça va " + "long " * 30,
            "Message-ID": "<custom-id@app.example>",
            "Date": "Mon, 01 Jan 2024 00:00:00 +0000",
        },
    )
    assert_wire_clean(c.data)
    msg = parse(c.data)
    assert msg["List-Unsubscribe"] == "<https://app.example/unsubscribe?u=1>"
    assert msg["X-Note"] == "ça va " + "long " * 30
    assert msg.get_all("Message-ID") == ["<custom-id@app.example>"]
    assert msg.get_all("Date") == ["Mon, 01 Jan 2024 00:00:00 +0000"]
    assert c.message_id == "<custom-id@app.example>"


def test_idempotency_key_travels_as_a_header_and_fixes_the_message_id() -> None:
    a = compose("u@x.org", "s", "x", from_=FROM, idempotency_key="signup:42")
    b = compose("u@x.org", "s", "x", from_=FROM, idempotency_key="signup:42")
    other = compose("u@x.org", "s", "x", from_=FROM, idempotency_key="signup:43")
    assert a.idempotency_key == "signup:42"
    assert parse(a.data)[IDEMPOTENCY_HEADER] == "signup:42"
    assert a.message_id == b.message_id != other.message_id
    fresh = {compose("u@x.org", "s", from_=FROM).message_id for _ in range(20)}
    assert len(fresh) == 20
    with pytest.raises(AddressError):
        compose("u@x.org", "s", from_=FROM, idempotency_key="k" * 201)


def test_sender_comes_from_the_default() -> None:
    c = compose("u@x.org", "s", default_from="Default <d@app.example>")
    assert c.envelope.sender == "d@app.example"
    assert parse(c.data)["From"] == "Default <d@app.example>"
    assert compose("u@x.org", "s", from_="o@x.org", default_from="d@x.org").envelope.sender == (
        "o@x.org"
    )
    with pytest.raises(ConfigError):
        compose("u@x.org", "s")


@pytest.mark.parametrize(
    "bad",
    ["no-at-sign", "a@", "@x.org", "a b@x.org", "a@x.org.", "jöhn@bad domain.org", "<>", ""],
)
def test_bad_addresses_are_refused(bad: str) -> None:
    with pytest.raises(AddressError):
        compose(bad, "s", from_=FROM)


def test_no_recipients_is_an_error() -> None:
    with pytest.raises(AddressError):
        compose([], "s", from_=FROM)


def test_send_at() -> None:
    when = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)  # seven weeks after T0
    c = compose("u@x.org", "s", from_=FROM, send_at=when, clock=clock)
    assert c.not_before == when.timestamp()
    assert compose("u@x.org", "s", from_=FROM, send_at=T0 + 60).not_before == T0 + 60
    with pytest.raises(ValueError):
        compose("u@x.org", "s", from_=FROM, send_at=float("inf"))


def test_send_at_more_than_a_year_ahead_is_refused() -> None:
    """A year is 366 days, so "the same day next year" always fits."""
    year = MAX_SEND_AT_DELAY
    assert year == 366 * 86_400
    ok = compose("u@x.org", "s", from_=FROM, send_at=T0 + year, clock=clock)
    assert ok.not_before == T0 + year
    past = compose("u@x.org", "s", from_=FROM, send_at=T0 - 10 * year, clock=clock)
    assert past.not_before == T0 - 10 * year  # due at once
    for late in (T0 + year + 1, T0 * 1000, datetime(2030, 1, 2, tzinfo=UTC)):
        with pytest.raises(ValueError, match="days ahead"):
            compose("u@x.org", "s", from_=FROM, send_at=late, clock=clock)


def test_quoted_local_parts_and_literals() -> None:
    c = compose(['"john smith"@example.org', "x@[192.0.2.1]"], "s", from_=FROM)
    assert c.envelope.recipients == ['"john smith"@example.org', "x@[192.0.2.1]"]
    assert [a.addr_spec for a in parse(c.data)["To"].addresses] == [
        '"john smith"@example.org',
        "x@[192.0.2.1]",
    ]


def test_international_domains_are_idna_2008() -> None:
    """UTS #46 non-transitional: ß stays ß (xn--fa-hia), where IDNA 2003 made it "ss"."""
    c = compose(["anna@faß.de", "Bü <b@BÜCHER.example>"], "s", from_="noreply@café.example")
    assert c.envelope.sender == "noreply@xn--caf-dma.example"
    assert c.envelope.recipients == ["anna@xn--fa-hia.de", "b@xn--bcher-kva.example"]
    assert [a.addr_spec for a in parse(c.data)["To"].addresses] == [
        "anna@xn--fa-hia.de",
        "b@xn--bcher-kva.example",
    ]
    assert_wire_clean(c.data)


@pytest.mark.parametrize("bad", ["a@☃.example", "a@x\u0080.example", "a@😀.example"])
def test_domains_idna_2008_refuses_are_refused(bad: str) -> None:
    """IDNA 2003 took the snowman; IDNA 2008 allows no symbols, emoji or controls."""
    with pytest.raises(AddressError, match="international domain"):
        compose(bad, "s", from_=FROM)


# Input a person and a program could read as different addresses: refused, not guessed at.
AMBIGUOUS = [
    "alice@good.example <bob@evil.example> <c@x.example>",  # two <...>, the last one won
    "Alice <bob@evil.example> <c@x.example>",
    "alice@good.example <c@x.example>",  # an @ in an unquoted name
    "Alice <c@x.example> bob@evil.example",  # text after >
    "Alice <c@x.example>>",
    "Alice <<c@x.example>",
    "Alice> <c@x.example>",
    "c@x.example>",
    '"Alice <c@x.example>',  # no closing quote
    '"Alice" bob@evil.example <c@x.example>',  # text between the quoted name and <
    '"Alice" <c@x.example> <d@x.example>',
    "<bob@evil.example> <c@x.example>",
]


@pytest.mark.parametrize("field", ["to", "cc", "bcc", "reply_to", "from_"])
@pytest.mark.parametrize("value", AMBIGUOUS)
def test_ambiguous_addresses_are_refused(field: str, value: str) -> None:
    kwargs: dict[str, object] = {"to": "u@example.net", "subject": "s", "from_": FROM}
    kwargs[field] = value
    with pytest.raises(AddressError):
        compose(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "display", "addr_spec"),
    [
        ("c@x.example", "", "c@x.example"),
        ("<c@x.example>", "", "c@x.example"),
        ("  Carol  < c@x.example >  ", "Carol", "c@x.example"),
        ('"alice@good.example" <c@x.example>', "alice@good.example", "c@x.example"),
        ('"Carol <the boss>" <c@x.example>', "Carol <the boss>", "c@x.example"),
        ('"Say \\"hi\\"" <c@x.example>', 'Say "hi"', "c@x.example"),
        ("Yamada, Taro <c@x.example>", "Yamada, Taro", "c@x.example"),
        ('"a<b"@x.example', "", '"a<b"@x.example'),
    ],
)
def test_unambiguous_address_forms(value: str, display: str, addr_spec: str) -> None:
    c = compose(value, "s", from_=FROM)
    assert c.envelope.recipients == [addr_spec]
    [to] = parse(c.data)["To"].addresses
    assert (to.display_name, to.addr_spec) == (display, addr_spec)


def test_mailer_send_refuses_an_ambiguous_address_and_stores_nothing() -> None:
    with Mailer("memory://", default_from=FROM) as mailer:
        with pytest.raises(AddressError, match="more than one"):
            mailer.send("alice@good.example <bob@evil.example> <c@x.example>", "s", "x")

        async def count() -> int:
            queue = await mailer._inner._open_queue()
            return sum((await queue.counts()).values())

        assert mailer._call(count()) == 0


def test_compose_is_compose_email_of_one_email() -> None:
    """compose(...) and compose_email(Email(...)) are the same message."""
    fields: dict[str, object] = {
        "to": ["a@x.org", "B <b@x.org>"],
        "subject": "s",
        "text": "t",
        "html": "<p>h</p>",
        "from_": FROM,
        "cc": "c@x.org",
        "bcc": ["d@x.org"],
        "reply_to": "r@x.org",
        "headers": {"X-Tag": "1"},
        "attachments": [("a.txt", b"a")],
        "send_at": T0 + 60,
        "idempotency_key": "k",
    }
    by_args = compose(**fields, clock=clock)  # type: ignore[arg-type]
    by_value = compose_email(Email(**fields), clock=clock)  # type: ignore[arg-type]
    boundary = re.compile(rb"=_hato_[0-9a-f]+")
    assert boundary.sub(b"B", by_args.data) == boundary.sub(b"B", by_value.data)
    assert (by_args.envelope, by_args.message_id, by_args.not_before) == (
        by_value.envelope,
        by_value.message_id,
        by_value.not_before,
    )


@pytest.mark.parametrize(
    "when",
    [
        0.0,
        T0,
        T0 + 0.999_999_7,  # rounds up to the next second, as datetime does
        datetime(2024, 2, 29, 23, 59, 59, tzinfo=UTC).timestamp(),
        datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC).timestamp(),
        datetime(2038, 1, 19, 3, 14, 8, tzinfo=UTC).timestamp(),
        datetime(2100, 3, 1, tzinfo=UTC).timestamp(),
    ],
)
def test_date_header_is_what_the_email_package_writes(when: float) -> None:
    expected = email.utils.format_datetime(datetime.fromtimestamp(when, UTC))
    c = compose("u@x.org", "s", from_=FROM, clock=lambda: when)
    assert f"\r\nDate: {expected}\r\n".encode() in c.data


def test_an_international_address_makes_the_message_smtputf8() -> None:
    c = compose("Jörg <jörg@bücher.example>", "s", "x", from_=FROM, cc="田中@例え.jp")
    # RFC 6531: the local part stays UTF-8, the domain goes to its A-label for DNS.
    assert c.envelope.recipients == ["jörg@xn--bcher-kva.example", "田中@xn--r8jz45g.jp"]
    assert c.envelope.smtputf8
    msg = email.message_from_string(c.data.decode("utf-8"), policy=email.policy.SMTPUTF8)
    assert msg["To"].addresses[0].addr_spec == "jörg@xn--bcher-kva.example"
    assert msg["To"].addresses[0].display_name == "Jörg"
    assert "田中@xn--r8jz45g.jp" in c.data.decode("utf-8")
    plain = compose("u@bücher.example", "s", "x", from_=FROM)
    assert not plain.envelope.smtputf8 and plain.data.isascii()


def test_require_tls_marks_the_message() -> None:
    from hato.message import META_REQUIRETLS

    marked = compose("u@x.org", "s", from_=FROM, require_tls=True).envelope.meta
    assert marked.get(META_REQUIRETLS) == "yes"
    assert META_REQUIRETLS not in compose("u@x.org", "s", from_=FROM).envelope.meta


@pytest.mark.parametrize(
    ("subject", "name"),
    [
        ("s" * 1200, "Name"),  # one word longer than a line may be (a fuzz finding)
        ("short", "Name " + "long " * 300),  # a display name longer than a line
        ("x" * 70 + " tail", "N" * 200),
    ],
)
def test_long_words_and_names_fold_into_legal_lines(subject: str, name: str) -> None:
    composed = compose(
        f"{name} <u@example.net>", subject, "body", from_=f"{name} <noreply@example.org>"
    )
    head = composed.data.partition(b"\r\n\r\n")[0]
    # Folded: well under RFC 5322's 998 (the encoded words are at most 76 each).
    assert all(len(line) <= 120 for line in head.split(b"\r\n")), head[:400]
    parsed = email.message_from_bytes(composed.data, policy=email.policy.default)
    assert parsed["Subject"] == subject
    raw = email.message_from_bytes(composed.data, policy=email.policy.compat32)
    for field in ("To", "From"):
        # RFC 2047 decoding (adjacent encoded words join without the folding space;
        # the header registry's phrase parser would keep one).
        display = re.sub(r"\r?\n[ \t]", " ", raw[field]).rpartition(" <")[0]
        decoded = str(email.header.make_header(email.header.decode_header(display)))
        assert decoded.strip('"') == name.strip()
