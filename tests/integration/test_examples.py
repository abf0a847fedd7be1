"""The examples: the compose file's structure and settings, and both web apps with FastAPI's test client.

No Docker engine runs here, so ``examples/compose/docker-compose.yml`` is checked the way
Hato itself would read it: every variable a Hato service sets must be a setting Hato
reads, and each service's environment (``.env.example`` filled in, the Dockerfile's
``ENV`` included) must pass the checks ``hato serve`` and ``hato worker`` make at start.
The apps run in-process against a real queue (SQLite; PostgreSQL for the transactional
sign-up).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import importlib.util
import os
import re
import secrets
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import psycopg
import pytest
import yaml
from fastapi.testclient import TestClient
from pydantic import AliasChoices

from hato import Mailer
from hato.config import Settings, load_settings
from hato.queue import open_queue
from hato.queue.base import Queue

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
COMPOSE_DIR = EXAMPLES / "compose"
POSTGRES_URL = os.environ.get("HATO_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
FROM = "noreply@dbmx.net"
T = TypeVar("T")

# Every environment name Hato's Settings reads.
KNOWN_NAMES = frozenset(
    name
    for field in Settings.model_fields.values()
    if isinstance(field.validation_alias, AliasChoices)
    for name in field.validation_alias.choices
    if isinstance(name, str)
)
HATO_SERVICES = ("web", "smtp", "mailworker")
APP_NAMES = frozenset({"DATABASE_URL"})  # the web app's own variables
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def load_module(path: Path) -> ModuleType:
    name = f"example_{path.stem}_{secrets.token_hex(4)}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def read_queue(url: str, read: Callable[[Queue], Awaitable[T]]) -> T:
    """``read(queue)`` on a queue opened for the purpose (as another process would)."""

    async def run() -> T:
        queue = open_queue(url)
        await queue.open()
        try:
            return await read(queue)
        finally:
            await queue.close()

    return asyncio.run(run())


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        current = env.get(name)
        if op in (":-", "-"):
            return current if current else (arg or "")
        if op in (":?", "?"):
            assert current, f"compose would stop: {name}: {arg}"
        assert current is not None, f"${{{name}}} is not set in .env.example"
        return current

    return _INTERPOLATION.sub(one, value)


def dockerfile_env(path: Path) -> dict[str, str]:
    """The ``ENV`` instructions of a Dockerfile, as KEY=VALUE pairs."""
    text = path.read_text().replace("\\\n", " ")
    values = {}
    for line in text.splitlines():
        if line.strip().startswith("ENV "):
            for pair in line.strip()[4:].split():
                key, _, value = pair.partition("=")
                values[key] = value
    return values


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def service_env(compose: Mapping[str, Any], name: str) -> dict[str, str]:
    """A service's environment as the container sees it: image ENV, then compose's."""
    service = compose["services"][name]
    env = dockerfile_env(dockerfile_of(service))
    dot_env = read_env_file(COMPOSE_DIR / ".env.example")
    for key, value in (service.get("environment") or {}).items():
        env[key] = interpolate(str(value), dot_env)
    return env


def dockerfile_of(service: Mapping[str, Any]) -> Path:
    build = service["build"]
    return (COMPOSE_DIR / str(build["context"]) / str(build["dockerfile"])).resolve()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No Hato variable from the outside, no .env or hato.toml in the working directory."""
    for name in KNOWN_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


# -- the compose file ----------------------------------------------------------------------


def test_compose_has_the_guides_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"web", "smtp", "mailworker", "db"}
    assert services["smtp"]["command"] == ["hato", "serve"]
    assert services["mailworker"]["command"] == ["hato", "worker"]
    assert services["db"]["image"].startswith("postgres:")
    assert "587:587" in services["smtp"]["ports"]
    # The worker waits for the relay and the database, like the guide's depends_on: smtp.
    assert set(services["mailworker"]["depends_on"]) == {"smtp", "db"}
    for service in services.values():
        for dependency in service.get("depends_on") or {}:
            assert dependency in services


def test_compose_uses_only_names_hato_reads(compose: dict[str, Any]) -> None:
    for name in HATO_SERVICES:
        env = service_env(compose, name)
        unknown = set(env) - KNOWN_NAMES - APP_NAMES - {"PYTHONUNBUFFERED"}
        assert not unknown, f"{name}: Hato reads no variable named {sorted(unknown)}"


def test_compose_smtp_is_the_boky_drop_in(compose: dict[str, Any]) -> None:
    env = compose["services"]["smtp"]["environment"]
    for name in ("RELAYHOST", "RELAYHOST_USERNAME", "RELAYHOST_PASSWORD", "ALLOWED_SENDER_DOMAINS"):
        assert name in env
    assert env["HATO_LISTEN"] == "0.0.0.0:587"


def test_compose_worker_and_web_share_the_outbox(compose: dict[str, Any]) -> None:
    services = compose["services"]
    worker, web = service_env(compose, "mailworker"), service_env(compose, "web")
    assert worker["HATO_SMTP_HOST"] == "smtp"
    assert worker["HATO_SMTP_PORT"] == "587"
    assert worker["HATO_QUEUE_URL"] == web["HATO_QUEUE_URL"]
    # The transactional outbox needs the app's tables and the queue in one database.
    assert web["HATO_QUEUE_URL"] == web["DATABASE_URL"]
    assert re.match(r"postgresql://[^@]+@db:5432/", worker["HATO_QUEUE_URL"])
    db = services["db"]["environment"]
    assert (
        f"{db['POSTGRES_USER']}:{db['POSTGRES_PASSWORD']}@db:5432/{db['POSTGRES_DB']}"
        in (worker["HATO_QUEUE_URL"])
    )


def test_compose_interpolation_is_covered_by_env_example(compose: dict[str, Any]) -> None:
    text = (COMPOSE_DIR / "docker-compose.yml").read_text()
    documented = read_env_file(COMPOSE_DIR / ".env.example")
    for match in _INTERPOLATION.finditer(text):
        assert match.group(1) in documented, f"${{{match.group(1)}}} is missing in .env.example"


def test_compose_build_installs_hato_from_this_repository(compose: dict[str, Any]) -> None:
    for name in HATO_SERVICES:
        dockerfile = dockerfile_of(compose["services"][name])
        assert dockerfile == COMPOSE_DIR / "Dockerfile"
        context = (COMPOSE_DIR / compose["services"][name]["build"]["context"]).resolve()
        assert context == REPO
    text = (COMPOSE_DIR / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    assert '"./[fast,postgres]"' in text
    assert (COMPOSE_DIR / "app.py").is_file()


def test_compose_smtp_settings_pass_hato_serve_checks(
    compose: dict[str, Any], clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = service_env(compose, "smtp")
    for key, value in env.items():
        clean_env.setenv(key, value)
    clean_env.setenv("HATO_DATA_DIR", str(tmp_path))  # the image's /var/lib/hato, here
    settings = load_settings()
    settings.validate_for_serve()
    assert settings.effective_route == "relay"
    relay = settings.relay
    assert relay is not None
    assert (relay.host, relay.port) == ("dbmx.net", 587)
    assert relay.tls == "encrypt"  # AUTH only over TLS
    assert relay.resolve().username == "postfix@dbmx.net"
    assert [(item.host, item.port) for item in settings.listeners] == [("0.0.0.0", 587)]
    # The compose network is a private range: the web app and worker may relay.
    assert any(
        net.startswith(("172.16.", "10.", "192.168.")) for net in settings.effective_mynetworks
    )


def test_compose_worker_settings_pass_hato_worker_checks(
    compose: dict[str, Any], clean_env: pytest.MonkeyPatch
) -> None:
    for key, value in service_env(compose, "mailworker").items():
        clean_env.setenv(key, value)
    settings = load_settings()
    settings.validate_for_worker()
    assert (settings.smtp_host, settings.smtp_port) == ("smtp", 587)
    assert settings.effective_queue_url.startswith("postgresql://fakebook:")
    assert settings.worker_concurrency == 32
    assert settings.lease_seconds == 300


def test_compose_web_settings_give_the_mailer_its_sender(
    compose: dict[str, Any], clean_env: pytest.MonkeyPatch
) -> None:
    for key, value in service_env(compose, "web").items():
        clean_env.setenv(key, value)
    settings = load_settings()
    assert settings.default_from == "noreply@dbmx.net"


# -- examples/fastapi_signup.py ------------------------------------------------------------


@pytest.fixture
def signup_client(tmp_path: Path) -> Iterator[tuple[TestClient, str]]:
    module = load_module(EXAMPLES / "fastapi_signup.py")
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    with TestClient(module.create_app(url, default_from=FROM)) as client:
        yield client, url


def test_fastapi_signup_queues_the_welcome_mail(signup_client: tuple[TestClient, str]) -> None:
    client, url = signup_client
    answer = client.post("/signup", json={"email": "taro@example.net", "name": "Taro"})
    assert answer.status_code == 202, answer.text
    message_id = answer.json()["message_id"]

    shown = client.get(f"/mail/{message_id}")
    assert shown.status_code == 200
    assert shown.json() == {
        "message_id": message_id,
        "state": "queued",
        "reply": "",
        "attempts": 0,
    }

    # What the worker will deliver, read from the queue by another process's mailer.
    with Mailer(url, default_from=FROM) as mailer:
        assert mailer.status(message_id).state == "queued"
    stored = read_queue(url, lambda q: q.get(message_id))
    assert stored.sender == FROM
    assert stored.recipients[0].address == "taro@example.net"
    parsed = email.message_from_bytes(stored.data, policy=email.policy.SMTP)
    assert parsed["Subject"] == "Welcome to Fakebook"
    assert parsed["To"] == "taro@example.net"
    assert parsed["From"] == FROM
    assert parsed["Message-ID"]
    body = parsed.get_body(("plain",))
    assert body is not None
    assert "Hello Taro" in body.get_content()


def test_fastapi_signup_twice_sends_once(signup_client: tuple[TestClient, str]) -> None:
    client, url = signup_client
    form = {"email": "hanako@example.net", "name": "Hanako"}
    first = client.post("/signup", json=form).json()["message_id"]
    again = client.post("/signup", json={**form, "email": "Hanako@example.net"}).json()
    assert again["message_id"] == first
    assert [m.id for m in read_queue(url, lambda q: q.list())] == [first]


@pytest.mark.parametrize(
    "address",
    ["not-an-address", "taro@example.net\r\nBcc: victim@example.org", "taro@example.net>, x@y.z"],
)
def test_fastapi_signup_refuses_bad_addresses(
    signup_client: tuple[TestClient, str], address: str
) -> None:
    client, url = signup_client
    answer = client.post("/signup", json={"email": address, "name": "Mallory"})
    assert answer.status_code == 422
    assert read_queue(url, lambda q: q.list()) == []


def test_fastapi_signup_unknown_message_is_404(signup_client: tuple[TestClient, str]) -> None:
    client, _ = signup_client
    assert client.get("/mail/0000000000000000").status_code == 404


# -- examples/compose/app.py: the transactional sign-up on PostgreSQL -------------------------


@pytest.fixture
def compose_app() -> Iterator[tuple[TestClient, str, str]]:
    schema = f"hato_example_{secrets.token_hex(4)}"
    queue_url = f"{POSTGRES_URL}?schema={schema}"
    # The app's own tables go to the same schema, through libpq's search_path option.
    database_url = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    module = load_module(COMPOSE_DIR / "app.py")
    try:
        with TestClient(module.create_app(database_url, queue_url, default_from=FROM)) as client:
            yield client, database_url, queue_url
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _counts(database_url: str) -> tuple[int, int]:
    with psycopg.connect(database_url) as conn:
        users = conn.execute("SELECT count(*) FROM users").fetchone()
        mails = conn.execute("SELECT count(*) FROM hato_messages").fetchone()
    assert users is not None and mails is not None
    return int(users[0]), int(mails[0])


def test_compose_app_signup_commits_user_and_mail_together(
    compose_app: tuple[TestClient, str, str],
) -> None:
    client, database_url, queue_url = compose_app
    answer = client.post("/signup", json={"email": "taro@example.net", "name": "Taro"})
    assert answer.status_code == 201, answer.text
    message_id = answer.json()["message_id"]
    assert _counts(database_url) == (1, 1)
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT welcome_mail FROM users").fetchone()
    assert row == (message_id,)
    shown = client.get(f"/mail/{message_id}").json()
    assert shown == {"state": "queued", "reply": "", "attempts": 0}
    with Mailer(queue_url, default_from=FROM) as mailer:
        assert mailer.status(message_id).state == "queued"


def test_compose_app_failed_signup_queues_no_mail(
    compose_app: tuple[TestClient, str, str],
) -> None:
    client, database_url, _ = compose_app
    assert (
        client.post("/signup", json={"email": "taro@example.net", "name": "Taro"}).status_code
        == 201
    )
    # The INSERT fails after the mail was enqueued on the same connection: both roll back.
    again = client.post("/signup", json={"email": "TARO@example.net", "name": "Taro"})
    assert again.status_code == 409
    bad = client.post("/signup", json={"email": "taro@example.net\r\nBcc: x@y.z", "name": "T"})
    assert bad.status_code == 422
    assert _counts(database_url) == (1, 1)
