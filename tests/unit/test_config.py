"""Settings: layering, boky/postfix names, derived values and the start-up refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from hato.app import build_policy
from hato.config import (
    Listener,
    Smarthost,
    load_settings,
    parse_duration,
    parse_listener,
    settings_reference,
    split_list,
)
from hato.errors import ConfigError
from hato.smtp.policy import ListenerRole

BOKY_AND_HATO_NAMES = [
    "HATO_LISTEN",
    "HATO_DATA_DIR",
    "HATO_MYNETWORKS",
    "MYNETWORKS",
    "POSTFIX_mynetworks",
    "RELAYHOST",
    "RELAYHOST_USERNAME",
    "RELAYHOST_PASSWORD",
    "RELAYHOST_PASSWORD_FILE",
    "RELAYHOST_USERNAME_FILE",
    "ALLOWED_SENDER_DOMAINS",
    "ALLOW_EMPTY_SENDER_DOMAINS",
    "MESSAGE_SIZE_LIMIT",
    "HATO_RELAY_TLS",
    "HATO_RELAY_TLS_VERIFY",
    "HATO_RELAY_TLS_CA_FILE",
    "HATO_ROUTE",
    "HATO_DOMAINS",
    "HATO_QUEUE_URL",
    "HATO_HOSTNAME",
    "POSTFIX_myhostname",
    "HATO_TLS_CERT_FILE",
    "HATO_TLS_KEY_FILE",
    "HATO_LOG_FORMAT",
    "HATO_LEASE_SECONDS",
    "HATO_SMTP_HOST",
    "HATO_SMTP_PORT",
    "HATO_SMTP_USERNAME",
    "HATO_SMTP_PASSWORD",
    "HATO_SMTP_PASSWORD_FILE",
    "HATO_SMTP_TLS",
    "HATO_SMTP_TLS_CA_FILE",
    "HATO_SMTP_REQUIRETLS",
    "HATO_RELAY_POOL_SIZE",
    "HATO_RELAY_TIMEOUT",
    "HATO_RELAY_PIPELINING",
    "HATO_WORKER_CONCURRENCY",
    "HATO_ALLOW_PLAINTEXT_AUTH",
    "HATO_HTTP_LISTEN",
    "HATO_HTTP_TOKEN",
    "HATO_HTTP_TOKEN_FILE",
    "HATO_HTTP_HOSTS",
    "HATO_HTTP_TLS",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in BOKY_AND_HATO_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray hato.toml or .env


def relay_of(**overrides: object) -> Smarthost:
    relay = load_settings(**overrides).relay
    assert relay is not None
    return relay


def password_of(smarthost: Smarthost) -> str | None:
    password = smarthost.resolve().password
    return password.get_secret_value() if password is not None else None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:2525", Listener("smtp", "127.0.0.1", 2525)),
        ("smtp=0.0.0.0:25", Listener("smtp", "0.0.0.0", 25)),
        ("submission=0.0.0.0:587", Listener("submission", "0.0.0.0", 587)),
        ("submissions=[::1]:465", Listener("submissions", "::1", 465)),
        (":2525", Listener("smtp", "0.0.0.0", 2525)),
    ],
)
def test_parse_listener(text: str, expected: Listener) -> None:
    assert parse_listener(text) == expected


@pytest.mark.parametrize("text", ["nonsense", "pop3=1.2.3.4:110", "1.2.3.4:99999", "1.2.3.4"])
def test_parse_listener_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_listener(text)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(300, 300.0), ("300", 300.0), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("5d", 432000.0)],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


def test_split_list_accepts_commas_and_spaces() -> None:
    assert split_list("a.org, b.org c.org,,") == ["a.org", "b.org", "c.org"]


def test_defaults_hold_on_loopback(tmp_path: Path) -> None:
    s = load_settings(data_dir=tmp_path)
    assert s.listeners == [Listener("smtp", "127.0.0.1", 2525)]
    assert s.effective_route == "hold"
    assert s.message_size_limit == 10 * 1024 * 1024
    assert s.effective_queue_url == f"sqlite:///{tmp_path}/queue.db"
    s.validate_for_serve()


def test_boky_compose_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAYHOST", "[dbmx.net]:587")
    monkeypatch.setenv("RELAYHOST_USERNAME", "postfix@dbmx.net")
    monkeypatch.setenv("RELAYHOST_PASSWORD", "secret")
    monkeypatch.setenv("ALLOWED_SENDER_DOMAINS", "dbmx.net")
    monkeypatch.setenv("HATO_LISTEN", "0.0.0.0:587")
    s = load_settings()
    assert s.effective_route == "relay"
    relay = s.relay
    assert relay is not None
    assert (relay.host, relay.port) == ("dbmx.net", 587)
    assert relay.tls == "encrypt"  # credentials: STARTTLS required
    assert password_of(relay) == "secret"
    assert "secret" not in repr(s)
    assert s.allowed_sender_domains == ["dbmx.net"]
    assert "172.16.0.0/12" in s.effective_mynetworks  # the compose network is trusted
    s.validate_for_serve()


def test_relay_tls_defaults() -> None:
    assert relay_of(relay_host="[r.example]:465").tls == "implicit"
    assert relay_of(relay_host="[r.example]:25").tls == "may"
    assert relay_of(relay_host="r.example:587", relay_tls="none").tls == "none"


def test_password_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    monkeypatch.setenv("RELAYHOST_PASSWORD_FILE", str(secret))
    monkeypatch.setenv("RELAYHOST_USERNAME", "u")
    assert password_of(relay_of(relay_host="[r.example]:587")) == "from-file"


def test_precedence_cli_over_env_over_dotenv_over_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "hato.toml").write_text(
        'listen = ["127.0.0.1:1001"]\nhostname = "toml"\nmax_recipients = 7\n'
    )
    (tmp_path / ".env").write_text("HATO_HOSTNAME=dotenv\nHATO_LISTEN=127.0.0.1:1002\n")
    monkeypatch.setenv("HATO_LISTEN", "127.0.0.1:1003")
    s = load_settings()
    assert s.max_recipients == 7  # only in the toml file
    assert s.hostname == "dotenv"  # .env beats toml
    assert s.listen == ["127.0.0.1:1003"]  # environment beats .env
    assert load_settings(listen=["127.0.0.1:1004"]).listen == ["127.0.0.1:1004"]  # CLI wins


def test_field_names_are_not_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    # Docker sets HOSTNAME to the container id; it must not become our host name.
    monkeypatch.setenv("HOSTNAME", "container-id")
    monkeypatch.setenv("HATO_HOSTNAME", "mail.example.org")
    assert load_settings().hostname == "mail.example.org"
    monkeypatch.setenv("LISTEN", "0.0.0.0:25")
    assert load_settings().listen == ["127.0.0.1:2525"]


def test_postfix_style_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTFIX_mynetworks", "127.0.0.0/8, [::1]/128")
    assert load_settings().effective_mynetworks == ["127.0.0.0/8", "::1/128"]


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"listen": ["0.0.0.0:25"], "relay_host": "[r.example]:25"}, "ALLOWED_SENDER_DOMAINS"),
        ({"route": "relay"}, "needs RELAYHOST"),
        ({"relay_host": "[r.example]:587", "relay_username": "u"}, "RELAYHOST_PASSWORD"),
        (
            {
                "relay_host": "[r.example]:25",
                "relay_username": "u",
                "relay_password": "p",
                "relay_tls": "may",
            },
            "never sent without TLS",
        ),
        ({"tls_cert_file": "/nonexistent/cert.pem"}, "HATO_TLS_KEY_FILE"),
        ({"relay_host": "[r.example]:99999"}, "port"),
        ({"mynetworks": ["not-a-network"]}, "HATO_MYNETWORKS"),
    ],
)
def test_refusals(overrides: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_settings(**overrides).validate_for_serve()


def test_allow_empty_sender_domains_lifts_the_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLOW_EMPTY_SENDER_DOMAINS", "true")
    load_settings(listen=["0.0.0.0:25"], relay_host="[r.example]:25").validate_for_serve()


def test_invalid_value_is_one_line_config_error() -> None:
    with pytest.raises(ConfigError, match="message_size_limit"):
        load_settings(message_size_limit="lots")


def test_reference_lists_every_setting() -> None:
    text = settings_reference()
    for name in ("HATO_LISTEN", "RELAYHOST", "ALLOWED_SENDER_DOMAINS", "HATO_RELAY_TLS_VERIFY"):
        assert f"`{name}`" in text


def test_docs_config_md_is_current() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "config.md"
    assert docs.read_text() == settings_reference(), "run: python -m hato.config > docs/config.md"


def test_relay_server_trusting_only_loopback_needs_no_sender_domains() -> None:
    s = load_settings(listen=["smtp=0.0.0.0:25", "smtp=[::]:25"], route="mx", domains=["dbmx.net"])
    assert s.effective_mynetworks == ["127.0.0.0/8", "::1/128"]
    s.validate_for_serve()


# --- the smarthosts: one model, secrets read when a role starts ---------------------------


def test_relay_pipelining_is_on_by_default_and_reaches_both_smarthosts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RELAYHOST", "[relay.example]:25")
    s = load_settings()
    assert s.relay_pipelining and s.relay is not None and s.relay.pipelining
    monkeypatch.setenv("HATO_RELAY_PIPELINING", "false")
    s = load_settings()
    assert s.relay is not None and not s.relay.pipelining and not s.smtp.pipelining


def test_one_smarthost_model_for_both_roles(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "RELAYHOST": "[relay.example]:587",
        "RELAYHOST_USERNAME": "u",
        "RELAYHOST_PASSWORD": "relay-secret",
        "HATO_RELAY_TLS_VERIFY": "false",
        "HATO_SMTP_HOST": "ses.example",
        "HATO_SMTP_PORT": "465",
        "HATO_SMTP_USERNAME": "AKIA",
        "HATO_SMTP_PASSWORD": "smtp-secret",
    }.items():
        monkeypatch.setenv(name, value)
    s = load_settings(relay_pool_size=2, worker_concurrency=8, relay_timeout="30s")
    assert s.relay == Smarthost(
        source="relay",
        host="relay.example",
        port=587,
        tls="encrypt",
        verify=False,
        username="u",
        password=SecretStr("relay-secret"),
        timeout=30,
        pool_size=2,
    )
    # hato worker: one pooled connection per concurrent delivery.
    assert s.smtp == Smarthost(
        source="smtp",
        host="ses.example",
        port=465,
        tls="implicit",
        username="AKIA",
        password=SecretStr("smtp-secret"),
        timeout=30,
        pool_size=8,
    )
    assert s.relay.describe() == "tls encrypt, no verify, AUTH as u"
    assert s.smtp.describe() == "tls implicit, verify, AUTH as AKIA"
    assert "secret" not in repr(s.relay) + repr(s.smtp)


def test_the_relay_smarthost_exists_on_the_relay_route_only() -> None:
    assert load_settings().relay is None
    assert load_settings(relay_host="[r.example]:25").relay is not None
    assert load_settings(relay_host="[r.example]:25", route="hold").relay is None
    assert load_settings(relay_host="[r.example]:25", route="mx").relay is None


def test_secret_files_are_read_when_the_role_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "missing"
    monkeypatch.setenv("RELAYHOST_USERNAME", "u")
    monkeypatch.setenv("RELAYHOST_PASSWORD_FILE", str(missing))
    monkeypatch.setenv("HATO_SMTP_USERNAME", "u")
    monkeypatch.setenv("HATO_SMTP_PASSWORD_FILE", str(missing))
    s = load_settings(relay_host="[r.example]:587")
    s.validate_for_serve()  # nothing is read yet: only which secrets are configured
    s.validate_for_worker()
    relay = s.relay
    assert relay is not None and relay.tls == "encrypt"
    with pytest.raises(ConfigError, match=f"cannot read relay password file {missing}: "):
        relay.resolve()
    with pytest.raises(ConfigError, match=f"cannot read SMTP password file {missing}: "):
        s.smtp.resolve()


def test_secret_files_fill_both_halves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "user").write_text("postfix@dbmx.net\n")
    (tmp_path / "password").write_text("from-file\n")
    monkeypatch.setenv("RELAYHOST_USERNAME_FILE", str(tmp_path / "user"))
    monkeypatch.setenv("RELAYHOST_PASSWORD_FILE", str(tmp_path / "password"))
    relay = relay_of(relay_host="[dbmx.net]:587")
    assert relay.tls == "encrypt"  # a user file counts as credentials
    resolved = relay.resolve()
    assert resolved.username == "postfix@dbmx.net"
    assert password_of(resolved) == "from-file"
    assert resolved.resolve() is resolved  # resolved once: nothing left to read


def test_an_empty_secret_file_leaves_half_a_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "password").write_text("\n")
    monkeypatch.setenv("RELAYHOST_USERNAME", "u")
    monkeypatch.setenv("RELAYHOST_PASSWORD_FILE", str(tmp_path / "password"))
    with pytest.raises(ConfigError, match="set both RELAYHOST_USERNAME and RELAYHOST_PASSWORD"):
        relay_of(relay_host="[r.example]:587").resolve()


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"smtp_username": "u"}, "set both HATO_SMTP_USERNAME and HATO_SMTP_PASSWORD"),
        (
            {"smtp_username": "u", "smtp_password": "p", "smtp_tls": "may"},
            "HATO_SMTP_TLS=may with credentials: AUTH is never sent without TLS",
        ),
        ({"smtp_tls_ca_file": "/nonexistent/ca.pem"}, "HATO_SMTP_TLS_CA_FILE: file not found"),
    ],
)
def test_worker_refusals(overrides: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_settings(**overrides).validate_for_worker()


def test_relay_ca_file_refusal_names_the_setting() -> None:
    s = load_settings(relay_host="[r.example]:587", relay_tls_ca_file="/nonexistent/ca.pem")
    with pytest.raises(ConfigError, match="HATO_RELAY_TLS_CA_FILE: file not found"):
        s.validate_for_serve()


def test_plaintext_auth_for_loopback_smtp_clients_only(monkeypatch: pytest.MonkeyPatch) -> None:
    default = build_policy(load_settings(), ListenerRole.SMTP)
    assert not default.auth_permitted(default.facts("127.0.0.1"))
    monkeypatch.setenv("HATO_ALLOW_PLAINTEXT_AUTH", "true")
    settings = load_settings()
    smtp = build_policy(settings, ListenerRole.SMTP)
    assert smtp.auth_permitted(smtp.facts("127.0.0.1"))
    assert not smtp.auth_permitted(smtp.facts("10.0.0.1"))  # trusted, but not loopback
    submission = build_policy(settings, ListenerRole.SUBMISSION)
    assert not submission.auth_permitted(submission.facts("127.0.0.1"))


def test_event_urls_and_webhook_secrets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from hato.config import settings_webhook_secrets

    monkeypatch.setenv("HATO_WEBHOOK_URL", "https://app.example/hook, http://127.0.0.1:9/h")
    monkeypatch.setenv("HATO_WEBHOOK_SECRET", "new-secret, old-secret")
    monkeypatch.setenv("HATO_RELAY_EVENTS_URL", "https://relay.example/api/v1/events")
    s = load_settings(data_dir=tmp_path)
    assert s.webhook_url == ["https://app.example/hook", "http://127.0.0.1:9/h"]
    assert settings_webhook_secrets(s) == ["new-secret", "old-secret"]
    assert "new-secret" not in repr(s)
    monkeypatch.delenv("HATO_WEBHOOK_SECRET")
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file\n")
    monkeypatch.setenv("HATO_WEBHOOK_SECRET_FILE", str(secret_file))
    assert settings_webhook_secrets(load_settings(data_dir=tmp_path)) == ["from-file"]
    monkeypatch.setenv("HATO_SMTP_EVENTS_URL", "ftp://local/api")
    with pytest.raises(ConfigError, match=r"HATO_SMTP_EVENTS_URL|smtp_events_url"):
        load_settings(data_dir=tmp_path)


def test_smtp_requiretls_names_the_first_hop(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().smtp.requiretls == "verify"
    monkeypatch.setenv("HATO_SMTP_REQUIRETLS", " Trusted ")
    assert load_settings().smtp.requiretls == "trusted"
    monkeypatch.setenv("HATO_SMTP_REQUIRETLS", "always")
    with pytest.raises(ConfigError, match="HATO_SMTP_REQUIRETLS"):
        load_settings()


# --- the HTTP listener ------------------------------------------------------------------


def test_http_listener_default_depends_on_the_command() -> None:
    settings = load_settings()
    assert settings.http_listener("serve") == ("127.0.0.1", 8025)
    assert settings.http_listener("worker") is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", None), ("  ", None), ("0.0.0.0:9000", ("0.0.0.0", 9000)), ("[::1]:0", ("::1", 0))],
)
def test_http_listen_set_applies_to_both_commands(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: tuple[str, int] | None
) -> None:
    monkeypatch.setenv("HATO_HTTP_LISTEN", value)
    settings = load_settings()
    assert settings.http_listener("serve") == expected
    assert settings.http_listener("worker") == expected


def test_http_listen_bad_value_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HATO_HTTP_LISTEN", "localhost")
    with pytest.raises(ConfigError, match="HATO_HTTP_LISTEN"):
        load_settings().http_listener("serve")


def test_http_token_from_env_or_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert load_settings().http_token_value() is None
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    monkeypatch.setenv("HATO_HTTP_TOKEN_FILE", str(secret))
    assert load_settings().http_token_value() == "from-file"
    monkeypatch.setenv("HATO_HTTP_TOKEN", "from-env")
    assert load_settings().http_token_value() == "from-env"
    monkeypatch.delenv("HATO_HTTP_TOKEN")
    secret.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        load_settings().http_token_value()
    monkeypatch.setenv("HATO_HTTP_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings().http_token_value()


def test_http_hosts_is_a_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HATO_HTTP_HOSTS", "mail.example.com, console.example.com")
    assert load_settings().http_hosts == ["mail.example.com", "console.example.com"]
