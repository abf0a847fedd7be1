"""RFC 3461 parameters: xtext, RET, ENVID, NOTIFY, ORCPT, and what is stored (pure)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hato import Mailer, compose
from hato.config import load_settings
from hato.dsn_params import (
    META_NOTIFY,
    META_RCPT,
    META_RET,
    DsnError,
    DsnRequest,
    RecipientDsn,
    encode_orcpt,
    notify_option,
    notify_text,
    parse_envid,
    parse_notify,
    parse_orcpt,
    parse_ret,
    request_of,
    store_recipients,
    xtext_decode,
    xtext_encode,
)
from hato.errors import ConfigError, HatoError
from hato.message import META_ENVID


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("", ""),
        ("abc", "abc"),
        ("a+2Bb", "a+b"),
        ("a+3Db", "a=b"),
        ("+20", " "),
        ("a+2bb", "a+b"),  # ABNF hex digits are case-insensitive
        ("!~", "!~"),
    ],
)
def test_xtext_decode(text: str, value: str) -> None:
    assert xtext_decode(text) == value


@pytest.mark.parametrize("text", ["a+", "a+2", "a+ZZ", "a=b", "a b", "caf\u00e9", "a\x7f"])
def test_xtext_decode_refuses(text: str) -> None:
    with pytest.raises(DsnError):
        xtext_decode(text)


@pytest.mark.parametrize(
    ("value", "text"),
    [("abc", "abc"), ("a+b", "a+2Bb"), ("a=b", "a+3Db"), ("a b", "a+20b"), ("\r\n", "+0D+0A")],
)
def test_xtext_encode(value: str, text: str) -> None:
    assert xtext_encode(value) == text
    assert xtext_decode(text) == value


def test_xtext_round_trip_of_every_ascii_character() -> None:
    value = "".join(chr(i) for i in range(128))
    assert xtext_decode(xtext_encode(value)) == value


def test_xtext_of_utf8_is_its_octets() -> None:
    assert xtext_encode("j\u00f6rg") == "j+C3+B6rg"
    assert xtext_decode("j+C3+B6rg") == "j\u00f6rg"
    with pytest.raises(DsnError):
        xtext_decode("a+FFb")  # not UTF-8


def test_ret() -> None:
    assert parse_ret("full") == "FULL"
    assert parse_ret("HDRS") == "HDRS"
    for bad in ("", "BODY", "FULL,HDRS"):
        with pytest.raises(DsnError):
            parse_ret(bad)


def test_envid_limits() -> None:
    assert parse_envid("a" * 100) == "a" * 100
    assert parse_envid("Q+2B1") == "Q+1"
    for bad in ("", "a" * 101, "a+0Db", "a+00", "a+"):
        with pytest.raises(DsnError):
            parse_envid(bad)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("NEVER", {"NEVER"}),
        ("never", {"NEVER"}),
        ("SUCCESS", {"SUCCESS"}),
        ("delay,Failure", {"DELAY", "FAILURE"}),
        ("SUCCESS,FAILURE,DELAY", {"SUCCESS", "FAILURE", "DELAY"}),
    ],
)
def test_notify(value: str, words: set[str]) -> None:
    assert parse_notify(value) == words


@pytest.mark.parametrize(
    "value", ["", "NEVER,FAILURE", "FAILURE,NEVER", "SOMETIMES", "FAILURE,,DELAY", "DELAY,DELAY"]
)
def test_notify_refuses(value: str) -> None:
    with pytest.raises(DsnError):
        parse_notify(value)


def test_notify_text_is_in_rfc_order() -> None:
    assert notify_text({"DELAY", "SUCCESS"}) == "SUCCESS,DELAY"
    assert notify_text({"NEVER"}) == "NEVER"


def test_orcpt() -> None:
    assert parse_orcpt("rfc822;a+2Bb@example.org") == "rfc822;a+b@example.org"
    assert encode_orcpt("rfc822;a+b@example.org") == "rfc822;a+2Bb@example.org"
    assert parse_orcpt("rfc822;" + "b" * 493) == "rfc822;" + "b" * 493
    # Postfix's form of an SMTPUTF8 recipient: rfc822 with the UTF-8 octets as xtext.
    assert parse_orcpt("rfc822;j+C3+B6rg@example.org") == "rfc822;j\u00f6rg@example.org"
    assert encode_orcpt("rfc822;j\u00f6rg@example.org") == "rfc822;j+C3+B6rg@example.org"
    for bad in (
        "a@b",
        "rfc822;",
        ";a@b",
        "rfc_822;a@b",
        "rfc822;a+0A@b",
        "rfc822;a+E2+80+A8@b",  # U+2028
        "rfc822;" + "b" * 494,
    ):
        with pytest.raises(DsnError):
            parse_orcpt(bad)


def test_dsn_error_is_a_value_error_and_a_hato_error() -> None:
    assert issubclass(DsnError, ValueError)
    assert issubclass(DsnError, HatoError)


def test_stored_parameters_read_back() -> None:
    meta = {META_ENVID: "E1", META_RET: "HDRS"}
    store_recipients(
        meta,
        {
            "a@x.example": RecipientDsn(frozenset({"SUCCESS"}), "rfc822;A@x.example"),
            "b@x.example": RecipientDsn(),
        },
    )
    assert meta[META_RCPT] == '{"a@x.example":{"notify":"SUCCESS","orcpt":"rfc822;A@x.example"}}'
    request = request_of(meta)
    assert request.envid == "E1"
    assert request.ret == "HDRS"
    assert request.of("a@x.example") == RecipientDsn(frozenset({"SUCCESS"}), "rfc822;A@x.example")
    assert request.of("b@x.example") == RecipientDsn()
    assert request.mail_options() == [b"RET=HDRS", b"ENVID=E1"]
    assert request.rcpt_options("a@x.example") == [
        b"NOTIFY=SUCCESS",
        b"ORCPT=rfc822;A@x.example",
    ]
    assert request.rcpt_options("b@x.example") == []


def test_envid_goes_on_as_xtext() -> None:
    assert DsnRequest(envid="a b+c").mail_options() == [b"ENVID=a+20b+2Bc"]


def test_message_wide_notify_and_override() -> None:
    request = request_of({META_NOTIFY: "FAILURE,DELAY"}, envid="Q1")
    assert request.envid == "Q1"
    assert request.rcpt_options("anyone@x.example") == [b"NOTIFY=FAILURE,DELAY"]


def test_damaged_meta_is_dropped_not_passed_on() -> None:
    request = request_of(
        {
            META_ENVID: "a\r\nb",
            META_RET: "ALL",
            META_NOTIFY: "MAYBE",
            META_RCPT: '{"a@x": {"notify": "NEVER,SUCCESS"}, "b@x": 3, "c@x": {"orcpt": "r;\\n"}}',
        }
    )
    assert request == DsnRequest()
    assert request_of({META_RCPT: "not json"}) == DsnRequest()


def test_default_wants_failure_and_delay_not_success() -> None:
    default = RecipientDsn()
    assert default.wants("FAILURE") and default.wants("DELAY")
    assert not default.wants("SUCCESS")
    never = RecipientDsn(frozenset({"NEVER"}))
    assert not any(never.wants(w) for w in ("SUCCESS", "FAILURE", "DELAY"))


# Mailer.send(notify=...)


def test_notify_option() -> None:
    assert notify_option(("failure", "delay")) == {"FAILURE", "DELAY"}
    assert notify_option("never") == {"NEVER"}
    assert notify_option(["success"]) == {"SUCCESS"}
    for bad in ((), ("never", "failure"), ("sometimes",), "success,never", (1,)):
        with pytest.raises(DsnError):
            notify_option(bad)  # type: ignore[arg-type]


def test_compose_stores_the_notify_asked() -> None:
    common = {"from_": "noreply@app.example", "subject": "s", "text": "t"}
    default = compose("a@x.example", **common)  # type: ignore[arg-type]
    assert default.envelope.meta[META_NOTIFY] == "FAILURE,DELAY"
    success = compose("a@x.example", notify=("delay", "success"), **common)  # type: ignore[arg-type]
    assert success.envelope.meta[META_NOTIFY] == "SUCCESS,DELAY"
    never = compose("a@x.example", notify="never", **common)  # type: ignore[arg-type]
    assert never.envelope.meta[META_NOTIFY] == "NEVER"


def test_send_with_a_bad_notify_raises_and_stores_nothing(tmp_path: object) -> None:
    mailer = Mailer(f"sqlite:///{tmp_path}/outbox.db", default_from="noreply@app.example")
    try:
        with pytest.raises(DsnError):
            mailer.send("a@x.example", "s", "t", notify=("never", "failure"))
        good = mailer.send("a@x.example", "s", "t", notify="success")
        assert mailer.status(good).state == "queued"
    finally:
        mailer.close()


# HATO_DELAY_WARNING


def test_delay_warning_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for name in [k for k in os.environ if k.startswith("HATO_")]:
        monkeypatch.delenv(name)
    assert load_settings(data_dir=tmp_path).delay_warning == 4 * 3600
    monkeypatch.setenv("HATO_DELAY_WARNING", "90m")
    assert load_settings(data_dir=tmp_path).delay_warning == 5400
    monkeypatch.setenv("HATO_DELAY_WARNING", "0")
    assert load_settings(data_dir=tmp_path).delay_warning == 0
    monkeypatch.setenv("HATO_DELAY_WARNING", "-1h")
    with pytest.raises(ConfigError):
        load_settings(data_dir=tmp_path)


def test_utf8_orcpt_of_rfc_6533() -> None:
    assert (
        parse_orcpt("utf-8;j\u00f6rg@b\u00fccher.example") == "utf-8;j\u00f6rg@b\u00fccher.example"
    )
    assert parse_orcpt("utf-8;j\\x{F6}rg@example.org") == "utf-8;j\u00f6rg@example.org"
    assert encode_orcpt("utf-8;j\u00f6rg+x@example.org") == "utf-8;j\\x{F6}rg\\x{2B}x@example.org"
    assert (
        parse_orcpt(encode_orcpt("utf-8;j\u00f6rg+x@example.org"))
        == "utf-8;j\u00f6rg+x@example.org"
    )
    for bad in (
        "utf-8;a\\x{A}b",
        "utf-8;a\u2028b",
        "utf-8;a b",
        "utf-8;a+b",
        "utf-8;a\\x{}",
        "utf-8;a\\x{D800}",
    ):
        with pytest.raises(DsnError):
            parse_orcpt(bad)
