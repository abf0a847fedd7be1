"""The composition root hands the intake's defences their settings (``build_session_config``,
``build_policy``): names as an operator writes them in the environment, and the defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from hato.app import build_policy, build_session_config
from hato.config import load_settings
from hato.smtp.policy import ListenerRole
from hato.smtp.server import FreeSpace

NAMES = (
    "HATO_GREET_DELAY",
    "HATO_JUNK_COMMAND_LIMIT",
    "HATO_TRUSTED_CONNECTION_RESERVE",
    "HATO_QUEUE_MINFREE",
    "HATO_QUEUE_URL",
    "HATO_AUTH_USER_FAILURE_LIMIT",
    "HATO_AUTH_USER_FAILURE_WINDOW",
    "HATO_MAX_CONNECTIONS",
    "HATO_ROUTE",
    "HATO_ALLOW_PRIVATE_MX",
    "RELAYHOST",
    "MESSAGE_SIZE_LIMIT",
    "HATO_MESSAGE_SIZE_LIMIT",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray hato.toml or .env


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    config = build_session_config(settings)
    assert config.greet_delay == 1.0
    assert config.max_junk_commands == 100
    assert config.trusted_connection_reserve == 50  # a tenth of 500
    assert config.queue_min_free == 15 * 1024 * 1024  # 1.5 x 10 MiB
    assert isinstance(config.queue_free_space, FreeSpace)
    # The directory SQLite writes to (its URL may spell it with a leading "//").
    assert Path(config.queue_free_space.path).resolve() == tmp_path.resolve()
    assert (settings.auth_user_failure_limit, settings.auth_user_failure_window) == (10, 600.0)


def test_environment_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in {
        "HATO_GREET_DELAY": "3s",
        "HATO_JUNK_COMMAND_LIMIT": "7",
        "HATO_TRUSTED_CONNECTION_RESERVE": "5",
        "HATO_QUEUE_MINFREE": "123456",
        "HATO_AUTH_USER_FAILURE_LIMIT": "4",
        "HATO_AUTH_USER_FAILURE_WINDOW": "1h",
        "HATO_QUEUE_URL": f"sqlite:///{tmp_path}/spool/queue.db",
    }.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    config = build_session_config(settings)
    assert config.greet_delay == 3.0
    assert config.max_junk_commands == 7
    assert config.trusted_connection_reserve == 5
    assert config.queue_min_free == 123456
    assert isinstance(config.queue_free_space, FreeSpace)
    assert Path(config.queue_free_space.path).resolve() == (tmp_path / "spool").resolve()
    assert (settings.auth_user_failure_limit, settings.auth_user_failure_window) == (4, 3600.0)


@pytest.mark.parametrize(
    "url", ["memory://", "postgresql://hato@127.0.0.1/test", "redis://127.0.0.1:6379/0"]
)
def test_queues_that_are_not_files_are_not_checked(url: str, tmp_path: Path) -> None:
    config = build_session_config(load_settings(data_dir=tmp_path, queue_url=url))
    assert config.queue_free_space is None


def test_reserve_follows_the_total(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, max_connections=40)
    assert build_session_config(settings).trusted_connection_reserve == 4


@pytest.mark.parametrize(
    ("overrides", "route", "allow_private"),
    [
        ({}, "hold", False),
        ({"relay_host": "[127.0.0.1]:2526"}, "relay", False),
        ({"route": "mx"}, "mx", False),
        ({"route": "mx", "allow_private_mx": True}, "mx", True),
    ],
)
def test_policy_knows_the_route(
    overrides: dict[str, object], route: str, allow_private: bool, tmp_path: Path
) -> None:
    policy = build_policy(load_settings(data_dir=tmp_path, **overrides), ListenerRole.SMTP)
    assert (policy.route, policy.allow_private_mx) == (route, allow_private)
