"""Jinja2 mail templates: subject, text and HTML from a folder; strict and escaped."""

from __future__ import annotations

import asyncio
import email
import email.policy
from pathlib import Path

import pytest

from hato import Mailer, TemplateError
from hato.queue import open_queue
from hato.templates import Templates


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "password_reset.subject.txt").write_text("Reset your password, {{ name }}\n")
    (tmp_path / "password_reset.txt").write_text("Hello {{ name }},\nopen {{ link }}\n")
    (tmp_path / "password_reset.html").write_text(
        '<p>Hello {{ name }}, <a href="{{ link }}">reset</a></p>\n'
    )
    (tmp_path / "text_only.subject.txt").write_text("Plain")
    (tmp_path / "text_only.txt").write_text("just text")
    (tmp_path / "no_body.subject.txt").write_text("Nothing")
    (tmp_path / "account").mkdir()
    (tmp_path / "account" / "welcome.subject.txt").write_text("Welcome")
    (tmp_path / "account" / "welcome.html").write_text("<b>hi</b>")
    return tmp_path


def test_render_all_three(folder: Path) -> None:
    out = Templates(folder).render(
        "password_reset", {"name": "<Ann & Bob>", "link": "https://app.example/r?a=1&b=2"}
    )
    assert out.subject == "Reset your password, <Ann & Bob>"
    assert out.text == "Hello <Ann & Bob>,\nopen https://app.example/r?a=1&b=2\n"
    assert out.html == (
        '<p>Hello &lt;Ann &amp; Bob&gt;, <a href="https://app.example/r?a=1&amp;b=2">reset</a></p>\n'
    )


def test_text_only_and_folders(folder: Path) -> None:
    templates = Templates(folder)
    plain = templates.render("text_only", {})
    assert (plain.subject, plain.text, plain.html) == ("Plain", "just text", None)
    welcome = templates.render("account/welcome", {})
    assert (welcome.text, welcome.html) == (None, "<b>hi</b>")


@pytest.mark.parametrize("name", ["missing", "no_body", "../etc/passwd", "/abs", ""])
def test_missing_or_bad_templates(folder: Path, name: str) -> None:
    with pytest.raises(TemplateError):
        Templates(folder).render(name, {})


def test_undefined_variables_are_errors(folder: Path) -> None:
    with pytest.raises(TemplateError, match="name"):
        Templates(folder).render("password_reset", {"link": "x"})


def test_syntax_errors_are_template_errors(tmp_path: Path) -> None:
    (tmp_path / "broken.subject.txt").write_text("{% if %}")
    (tmp_path / "broken.txt").write_text("x")
    with pytest.raises(TemplateError):
        Templates(tmp_path).render("broken", {})


def test_send_template_through_the_mailer(folder: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    mailer = Mailer(url, default_from="noreply@app.example", templates=folder, fsync=False)
    try:
        message_id = mailer.send_template(
            "password_reset",
            to="ann@example.net",
            context={"name": "Ann", "link": "https://app.example/r"},
            idempotency_key="reset:1",
        )
        assert mailer.status(message_id).state == "queued"
    finally:
        mailer.close()

    async def stored() -> bytes:
        q = open_queue(url, fsync=False)
        await q.open()
        try:
            return (await q.get(message_id)).data
        finally:
            await q.close()

    msg = email.message_from_bytes(asyncio.run(stored()), policy=email.policy.default)
    assert msg["Subject"] == "Reset your password, Ann"
    assert msg.get_content_type() == "multipart/alternative"


def test_subject_newlines_from_the_context_are_refused(folder: Path, tmp_path: Path) -> None:
    mailer = Mailer("memory://", default_from="noreply@app.example", templates=folder)
    try:
        with pytest.raises(Exception, match="CR, LF"):
            mailer.send_template(
                "password_reset", to="a@x.org", context={"name": "A\r\nBcc: x@evil", "link": "l"}
            )
    finally:
        mailer.close()
