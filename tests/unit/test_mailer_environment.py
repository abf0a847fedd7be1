"""What a Mailer takes from its surroundings: four environment variables, and no file."""

from __future__ import annotations

from pathlib import Path

import pytest

from hato import AsyncMailer, Mailer
from hato.config import mailer_environment

NAMES = ["HATO_QUEUE_URL", "HATO_DATA_DIR", "HATO_DEFAULT_FROM", "HATO_TEMPLATE_DIR"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in [*NAMES, "XDG_DATA_HOME"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


def test_defaults_without_any_variable(tmp_path: Path) -> None:
    env = mailer_environment()
    data_dir = tmp_path / "home" / ".local" / "share" / "hato"
    assert env.data_dir == data_dir
    assert env.queue_url == f"sqlite:///{data_dir / 'queue.db'}"
    assert env.default_from is None and env.template_dir is None


def test_the_four_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert mailer_environment().queue_url == f"sqlite:///{tmp_path / 'xdg' / 'hato' / 'queue.db'}"
    monkeypatch.setenv("HATO_DATA_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("HATO_DEFAULT_FROM", "App <noreply@app.example>")
    monkeypatch.setenv("HATO_TEMPLATE_DIR", str(tmp_path / "mail"))
    env = mailer_environment()
    assert env.queue_url == f"sqlite:///{tmp_path / 'state' / 'queue.db'}"
    assert env.default_from == "App <noreply@app.example>"
    assert env.template_dir == tmp_path / "mail"
    monkeypatch.setenv("HATO_QUEUE_URL", "memory://")
    assert mailer_environment().queue_url == "memory://"
    for name in NAMES:  # empty is unset
        monkeypatch.setenv(name, "")
    assert mailer_environment() == mailer_environment().__class__(
        queue_url=f"sqlite:///{tmp_path / 'xdg' / 'hato' / 'queue.db'}",
        default_from=None,
        template_dir=None,
        data_dir=tmp_path / "xdg" / "hato",
    )


def test_no_settings_file_from_the_working_directory_is_read(tmp_path: Path) -> None:
    """An app's working directory is not Hato's: its .env and hato.toml are not ours."""
    (tmp_path / ".env").write_text(
        "HATO_QUEUE_URL=memory://\nHATO_DEFAULT_FROM=dotenv@app.example\n"
    )
    (tmp_path / "hato.toml").write_text('default_from = "toml@app.example"\n')
    mailer = AsyncMailer()
    assert mailer.default_from is None
    assert mailer.queue_url.startswith("sqlite:///") and "home" in mailer.queue_url


def test_template_dir_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / "hi.subject.txt").write_text("Hi {{ name }}")
    (tmp_path / "mail" / "hi.txt").write_text("body")
    monkeypatch.setenv("HATO_TEMPLATE_DIR", str(tmp_path / "mail"))
    with Mailer("memory://", default_from="noreply@app.example") as mailer:
        message_id = mailer.send_template("hi", to="u@example.net", context={"name": "Ann"})

        async def stored() -> bytes:
            queue = await mailer._inner._open_queue()
            return (await queue.get(message_id)).data

        assert b"\r\nSubject: Hi Ann\r\n" in mailer._call(stored())
