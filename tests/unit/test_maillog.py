"""The operator log cannot be forged: every field of every event, fed a hostile value,
stays on its one line, in the text log and in the JSON log (RELIABILITY.md promise 9)."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from hato.maillog import MailLog, escape
from hato.reply import Reply

# A fake log line after CRLF, an ANSI escape, a bare CR, NUL, DEL, C1 controls (NEL and
# CSI), the Unicode line/paragraph separators, the separators str.splitlines() honours, a
# lone surrogate, and a backslash sequence that must not read as one of our escapes.
FAKE = "Jan  1 00:00:00 hato/smtpd[1]: 0FAKE: to=<x@y>, status=sent (250 ok)"
HOSTILE = (
    f"h\r\n{FAKE}\x1b[2J\rbare\x00nul\x7f\x85nel\x9bcsi\u2028ls\u2029ps"
    "\x0b\x0c\x1c\x1d\x1e\ud800end\\x0a\\\\"
)

# Every character that may not appear in a line as itself.
UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _unescape(text: str) -> str:
    """What a reader of the text log does to get a value back."""
    return re.sub(
        r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4})",
        lambda m: "\\" if m.group(1) == "\\" else chr(int(m.group(1)[1:], 16)),
        text,
    )


Call = Callable[[MailLog, str], None]

# (name, call): each call puts the hostile value into one field of one event.
CALLS: list[tuple[str, Call]] = [
    ("event.service", lambda log, v: log.event(v, "Q1", status="sent")),
    ("event.queue_id", lambda log, v: log.event("qmgr", v, status="sent")),
    ("event.field", lambda log, v: log.event("qmgr", "Q1", warning=v)),
    ("event.status", lambda log, v: log.event("qmgr", "Q1", status=v)),
    ("event.detail", lambda log, v: log.event("qmgr", "Q1", status="x", detail=v)),
    ("event.text", lambda log, v: log.event("smtpd", "", text=v, client="c")),
    ("event.from", lambda log, v: log.event("smtpd", "Q1", **{"from": v})),
    ("event.to", lambda log, v: log.event("smtpd", "Q1", to=v)),
    ("event.orig_to", lambda log, v: log.event("smtpd", "Q1", orig_to=v)),
    ("connect.client", lambda log, v: log.connect(v)),
    ("disconnect.client", lambda log, v: log.disconnect(v, messages=1)),
    ("disconnect.count", lambda log, v: log.disconnect("c", helo=v)),
    ("rejected.client", lambda log, v: log.rejected(v, "RCPT", Reply(554, "5.7.1", "no"))),
    ("rejected.command", lambda log, v: log.rejected("c", v, Reply(554, "5.7.1", "no"))),
    ("rejected.reply", lambda log, v: log.rejected("c", "RCPT", v)),
    ("rejected.Reply", lambda log, v: log.rejected("c", "RCPT", Reply(554, "5.7.1", v))),
    ("rejected.from", lambda log, v: log.rejected("c", "MAIL", "r", **{"from": v})),
    ("rejected.to", lambda log, v: log.rejected("c", "RCPT", "r", to=v)),
    ("rejected.detail", lambda log, v: log.rejected("c", "DATA", "r", detail=v)),
    ("auth_failed.client", lambda log, v: log.auth_failed(v, "user", "PLAIN")),
    ("auth_failed.user", lambda log, v: log.auth_failed("c", v, "PLAIN")),
    ("auth_failed.mechanism", lambda log, v: log.auth_failed("c", "user", v)),
    ("auth_locked.user", lambda log, v: log.auth_locked(v, 600)),
    ("received.queue_id", lambda log, v: log.received(v, client="c", sender="s", size=1, nrcpt=1)),
    ("received.client", lambda log, v: log.received("Q1", client=v, sender="s", size=1, nrcpt=1)),
    ("received.sender", lambda log, v: log.received("Q1", client="c", sender=v, size=1, nrcpt=1)),
    (
        "received.sasl_username",
        lambda log, v: log.received("Q1", client="c", sender="s", size=1, nrcpt=1, sasl_username=v),
    ),
    ("delivery.queue_id", lambda log, v: _delivery(log, queue_id=v)),
    ("delivery.to", lambda log, v: _delivery(log, to=v)),
    ("delivery.relay", lambda log, v: _delivery(log, relay=v)),
    ("delivery.dsn", lambda log, v: _delivery(log, dsn=v)),
    ("delivery.status", lambda log, v: _delivery(log, status=v)),
    ("delivery.detail", lambda log, v: _delivery(log, detail=v)),
    ("delivery.service", lambda log, v: _delivery(log, service=v)),
    ("queue_event.queue_id", lambda log, v: log.queue_event(v, "quarantined")),
    ("queue_event.what", lambda log, v: log.queue_event("Q1", v)),
    ("queue_event.field", lambda log, v: log.queue_event("Q1", "released", reason=v)),
]


def _delivery(log: MailLog, **override: Any) -> None:
    fields: dict[str, Any] = {
        "queue_id": "Q1",
        "to": "c@d",
        "relay": "mx.d[192.0.2.1]:25",
        "delay": 0.5,
        "attempts": 1,
        "dsn": "2.0.0",
        "status": "sent",
        "detail": "250 2.0.0 Ok",
        "service": "relay",
    }
    fields.update(override)
    queue_id = fields.pop("queue_id")
    log.delivery(queue_id, **fields)


# A Reply's own text lines are joined with " / " before they reach the log.
EXPECTED = {"rejected.Reply": str(Reply(554, "5.7.1", HOSTILE))}


def _write(call: Call, *, json_format: bool, value: str = HOSTILE) -> str:
    out = io.StringIO()
    call(MailLog(out, json=json_format, clock=lambda: 1_700_000_000.0), value)
    return out.getvalue()


@pytest.mark.parametrize(("name", "call"), CALLS, ids=[name for name, _ in CALLS])
def test_a_hostile_value_stays_on_one_text_line(name: str, call: Call) -> None:
    written = _write(call, json_format=False)
    assert written.endswith("\n") and written.count("\n") == 1
    line = written[:-1]
    assert line.splitlines() == [line]
    assert UNSAFE.search(line) is None
    # The value is there, escaped, and reads back exactly.
    value = EXPECTED.get(name, HOSTILE)
    assert escape(value) in line
    assert value in _unescape(line)


@pytest.mark.parametrize(("name", "call"), CALLS, ids=[name for name, _ in CALLS])
def test_a_hostile_value_stays_on_one_json_line(name: str, call: Call) -> None:
    written = _write(call, json_format=True)
    assert written.endswith("\n") and written.count("\n") == 1
    line = written[:-1]
    assert line.splitlines() == [line]
    assert UNSAFE.search(line) is None
    record = json.loads(line)
    value = EXPECTED.get(name, HOSTILE)
    assert any(value in str(field) for field in record.values())


def test_every_log_method_is_covered() -> None:
    methods = {
        name
        for name in vars(MailLog)
        if not name.startswith("_") and callable(getattr(MailLog, name))
    }
    assert methods == {name.split(".")[0] for name, _ in CALLS}
    assert len(CALLS) == len({name for name, _ in CALLS})


def test_a_crlf_user_name_cannot_start_a_log_line() -> None:
    # The reproduction of issue 8: a failed AUTH PLAIN whose user name holds CRLF and a
    # whole fake line.
    out = io.StringIO()
    MailLog(out).auth_failed("unknown[192.0.2.9]", f"ghost\r\n{FAKE}", "PLAIN")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert not any(line.startswith("Jan  1") for line in lines)
    assert "sasl_username=ghost\\x0d\\x0aJan  1 00:00:00 hato/smtpd[1]: 0FAKE" in lines[0]


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        ("plain text, ünïcödé ✓", "plain text, ünïcödé ✓"),
        ("a\r\nb", "a\\x0d\\x0ab"),
        ("\x00\x1f\x7f", "\\x00\\x1f\\x7f"),
        ("\x80\x85\x9f\xa0", "\\x80\\x85\\x9f\xa0"),  # C1 escaped; NBSP is printable
        ("\u2028\u2029", "\\u2028\\u2029"),
        ("\ud800\udfff", "\\ud800\\udfff"),
        ("C:\\x0a", "C:\\\\x0a"),  # a literal backslash never reads as an escape
        ("\\", "\\\\"),
    ],
)
def test_escape(value: str, escaped: str) -> None:
    assert escape(value) == escaped
    assert _unescape(escaped) == value


def test_every_code_point_round_trips_and_never_breaks_a_line() -> None:
    text = "".join(chr(c) for c in range(0x3000)) + "\\x41\\\\u2028"
    escaped = escape(text)
    assert escaped.splitlines() == [escaped]
    assert UNSAFE.search(escaped) is None
    assert _unescape(escaped) == text


def test_json_escapes_decode_to_the_value() -> None:
    out = io.StringIO()
    MailLog(out, json=True).auth_failed("c", HOSTILE, "PLAIN")
    record = json.loads(out.getvalue())
    assert record["sasl_username"] == HOSTILE
    # ensure_ascii=False: ordinary non-ASCII text stays readable.
    out = io.StringIO()
    MailLog(out, json=True).auth_failed("c", "jörg", "PLAIN")
    assert '"sasl_username": "jörg"' in out.getvalue()
