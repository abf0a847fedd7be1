"""Settings: one typed, frozen object built from defaults < hato.toml < .env < environment < CLI.

Native environment names are ``HATO_*``. The names of the ``boky/postfix`` image
(``RELAYHOST``, ``RELAYHOST_USERNAME``, ``RELAYHOST_PASSWORD`` and their ``_FILE``
variants, ``ALLOWED_SENDER_DOMAINS``, ``ALLOW_EMPTY_SENDER_DOMAINS``,
``MESSAGE_SIZE_LIMIT``, ``MYNETWORKS`` / ``POSTFIX_mynetworks``, ``POSTFIX_myhostname``)
are accepted too, so an existing compose file works by changing only the image.

The two smarthosts, ``hato serve``'s relay route (``RELAYHOST``, ``HATO_RELAY_*``) and
``hato worker``'s server (``HATO_SMTP_*``), are one model, :class:`Smarthost`, built from
those flat fields by :attr:`Settings.relay` and :attr:`Settings.smtp`. Secret files
(``RELAYHOST_PASSWORD_FILE`` and the like) are not read while settings load, nor by any
property: :meth:`Smarthost.resolve` reads them when a role that uses them starts
(``hato serve``, ``hato worker``), so a command that needs no secret (``hato queue list``,
``hato user add``) never fails on an unreadable one. ``hato config check`` does read them,
as ``hato serve`` would: it answers "would this configuration start?".

This is the only module that reads the environment or configuration files.
``docs/config.md`` is generated from the field descriptions here
(``python -m hato.config > docs/config.md``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from hato.errors import ConfigError
from hato.message import normalize_domain

RelayTLS = Literal["none", "may", "encrypt", "implicit"]
Route = Literal["hold", "relay", "mx"]
ListenerRole = Literal["smtp", "submission", "submissions"]
LISTENER_ROLES: tuple[str, ...] = ("smtp", "submission", "submissions")

LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")
# The HTTP listener of `hato serve` when HATO_HTTP_LISTEN is unset (Mailpit's port).
DEFAULT_HTTP_LISTEN = "127.0.0.1:8025"
# boky/postfix trusts the private ranges by default so that a compose network can send.
PRIVATE_NETWORKS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: object) -> float:
    """``300``, ``"300s"``, ``"5m"``, ``"1h"``, ``"5d"`` → seconds (Postfix's time units)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    m = _DURATION_RE.match(str(value))
    if m is None:
        raise ValueError(f"not a duration: {value!r} (use seconds or 30s/5m/1h/5d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def split_list(value: object) -> list[str]:
    """Comma- or whitespace-separated strings (boky accepts both) → list."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        items = [str(v) for v in value]
    else:
        items = re.split(r"[,\s]+", str(value))
    return [item.strip() for item in items if item.strip()]


DEFAULT_SMTP_PORT = 25


def parse_relayhost(text: str) -> tuple[str, int]:
    """Parse a Postfix/boky relay host: ``[host]:port``, ``host:port``, ``[host]``, ``host``.

    The port defaults to 25. IPv6 addresses need brackets when a port is given
    (``[::1]:2525``); Postfix's ``[ipv6:2001:db8::1]`` form is accepted too. Raises
    :class:`~hato.errors.ConfigError` for anything else.
    """
    value = text.strip()
    if not value:
        raise ConfigError("relay host is empty")
    port_text = ""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ConfigError(f"relay host {text!r}: missing ']'")
        host, rest = value[1:end], value[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"relay host {text!r}: junk after ']'")
            port_text = rest[1:]
            if not port_text:
                raise ConfigError(f"relay host {text!r}: empty port")
        if host.lower().startswith("ipv6:"):
            host = host[5:]
    elif value.count(":") == 1:
        host, port_text = value.split(":")
        if not port_text:
            raise ConfigError(f"relay host {text!r}: empty port")
    else:
        # No colon, or a bare IPv6 address (several colons, so no port can be meant).
        host = value
    host = host.strip()
    if not host or any(c.isspace() or c in "[]/@" for c in host):
        raise ConfigError(f"relay host {text!r}: bad host name")
    port = DEFAULT_SMTP_PORT
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"relay host {text!r}: bad port {port_text!r}")
        port = int(port_text)
    return host, port


def default_tls(port: int, *, credentials: bool) -> RelayTLS:
    """TLS towards a smarthost when not set: ``implicit`` on port 465, ``encrypt`` with
    credentials (AUTH is never sent in clear text), else ``may``."""
    if port == 465:
        return "implicit"
    return "encrypt" if credentials else "may"


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return Path(base) / "hato"


def _truthy(value: object) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() not in ("", "0", "false", "no", "off")


CommaList = Annotated[list[str], NoDecode]


class _AliasOnlyMixin:
    """Read a field only from its listed environment names, never from its bare field name.

    ``populate_by_name`` lets CLI flags and hato.toml use field names; without this the
    environment would be searched for them too, and ``HOSTNAME`` (set by Docker to the
    container id) or ``DATA_DIR`` would silently become settings.
    """

    def _extract_field_info(
        self, field: FieldInfo, field_name: str, model_config: Any = None
    ) -> list[tuple[str, str, bool]]:
        infos: list[tuple[str, str, bool]] = super()._extract_field_info(  # type: ignore[misc]
            field, field_name, model_config
        )
        if field.validation_alias is None:
            return infos
        return [info for info in infos if info[0] != field_name]


class _EnvSource(_AliasOnlyMixin, EnvSettingsSource):
    pass


class _DotEnvSource(_AliasOnlyMixin, DotEnvSettingsSource):
    pass


@dataclass(frozen=True, slots=True)
class Listener:
    """One listening socket: ``role=host:port``."""

    role: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.role}={host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host in ("localhost",):
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_listener(text: str) -> Listener:
    """``HOST:PORT``, ``[v6]:PORT`` or ``ROLE=HOST:PORT``; a bare address is role ``smtp``."""
    role, sep, rest = text.partition("=")
    if not sep:
        role, rest = "smtp", text
    role = role.strip().lower()
    rest = rest.strip()
    if role not in LISTENER_ROLES:
        raise ValueError(
            f"unknown listener role {role!r} in {text!r} (use {', '.join(LISTENER_ROLES)})"
        )
    m = re.match(r"^\[(?P<v6>[^\]]+)\]:(?P<port>\d+)$|^(?P<host>[^:\[\]]*):(?P<port2>\d+)$", rest)
    if m is None:
        raise ValueError(f"listener {text!r} is not HOST:PORT")
    host = m.group("v6") or m.group("host") or "0.0.0.0"
    port = int(m.group("port") or m.group("port2"))
    if not 0 <= port <= 65535:
        raise ValueError(f"listener port out of range in {text!r}")
    return Listener(role, host, port)


@dataclass(frozen=True, slots=True)
class _SmarthostNames:
    """The setting names one smarthost's refusals point the operator to; ``what``
    names its secret files ("cannot read relay password file …")."""

    username: str
    password: str
    tls: str
    ca_file: str
    what: str


_SMARTHOST_NAMES = {
    "relay": _SmarthostNames(
        username="RELAYHOST_USERNAME",
        password="RELAYHOST_PASSWORD",
        tls="HATO_RELAY_TLS",
        ca_file="HATO_RELAY_TLS_CA_FILE",
        what="relay",
    ),
    "smtp": _SmarthostNames(
        username="HATO_SMTP_USERNAME",
        password="HATO_SMTP_PASSWORD",
        tls="HATO_SMTP_TLS",
        ca_file="HATO_SMTP_TLS_CA_FILE",
        what="SMTP",
    ),
}


class Smarthost(BaseModel):
    """One SMTP server that takes all our outgoing mail, with its TLS and SASL settings.

    ``source`` says which settings it comes from: ``relay`` (``RELAYHOST``,
    ``HATO_RELAY_*``: the upstream of ``hato serve``) or ``smtp`` (``HATO_SMTP_*``: where
    ``hato worker`` delivers). ``tls`` is the effective level (:func:`default_tls` when
    the settings leave it out). The secret files stay unread until :meth:`resolve`.
    """

    model_config = ConfigDict(frozen=True)

    source: Literal["relay", "smtp"]
    host: str
    port: int
    tls: RelayTLS
    verify: bool = True
    ca_file: Path | None = None
    username: str | None = None
    username_file: Path | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    timeout: float = 60.0
    pool_size: int = 4
    requiretls: Literal["verify", "trusted"] = "verify"
    pipelining: bool = True

    @field_validator("password")
    @classmethod
    def _empty_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None

    @property
    def _names(self) -> _SmarthostNames:
        return _SMARTHOST_NAMES[self.source]

    def check(self) -> None:
        """Refuse what can never work, with one line naming the setting (ConfigError):
        half a credential pair, credentials without TLS, a CA file that is not there.
        Looks at which secrets are configured, without reading their files."""
        names = self._names
        has_user = self.username is not None or self.username_file is not None
        has_password = self.password is not None or self.password_file is not None
        if has_user != has_password:
            raise ConfigError(f"set both {names.username} and {names.password}, or neither")
        if has_user and self.tls in ("none", "may"):
            raise ConfigError(
                f"{names.tls}={self.tls} with credentials: AUTH is never sent without TLS; "
                "use encrypt or implicit"
            )
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ConfigError(f"{names.ca_file}: file not found: {self.ca_file}")

    def resolve(self) -> Smarthost:
        """This smarthost with its secret files read into ``username`` and ``password``.

        Called once, when the role that uses it starts. Raises ConfigError (one line) if
        a file cannot be read, or if what the files hold leaves half a credential pair
        (an empty file). A value given directly wins over its file.
        """
        if self.username_file is None and self.password_file is None:
            return self
        what = self._names.what
        username = self.username
        if username is None and self.username_file is not None:
            username = _read_secret(self.username_file, f"{what} user") or None
        password = self.password
        if password is None and self.password_file is not None:
            text = _read_secret(self.password_file, f"{what} password")
            password = SecretStr(text) if text else None
        resolved = self.model_copy(
            update={
                "username": username,
                "username_file": None,
                "password": password,
                "password_file": None,
            }
        )
        resolved.check()
        return resolved

    def describe(self) -> str:
        """``tls encrypt, verify, AUTH as user``: how we talk to it, for start-up lines."""
        verify = "verify" if self.verify else "no verify"
        auth = f", AUTH as {self.username}" if self.username else ""
        return f"tls {self.tls}, {verify}{auth}"


class Settings(BaseSettings):
    """Every setting of Hato. Field descriptions become docs/config.md."""

    model_config = SettingsConfigDict(
        frozen=True,
        populate_by_name=True,
        extra="ignore",
        case_sensitive=False,
        env_file=".env",
        env_file_encoding="utf-8",
        toml_file="hato.toml",
    )

    # --- where and how we listen -----------------------------------------------------
    listen: CommaList = Field(
        default_factory=lambda: ["127.0.0.1:2525"],
        validation_alias=_env("HATO_LISTEN"),
        description="Listeners, comma separated: `[ROLE=]HOST:PORT` with ROLE `smtp` "
        "(default), `submission` (587, STARTTLS+AUTH required) or `submissions` (465, "
        "implicit TLS).",
    )
    hostname: str = Field(
        default_factory=socket.gethostname,
        validation_alias=_env("HATO_HOSTNAME", "POSTFIX_myhostname"),
        description="Our host name: greeting, EHLO to peers, Received headers, DSNs.",
    )
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        validation_alias=_env("HATO_DATA_DIR"),
        description="State directory: the SQLite queue, users, DKIM keys. "
        "Default `$XDG_DATA_HOME/hato` (`~/.local/share/hato`).",
    )
    queue_url: str | None = Field(
        default=None,
        validation_alias=_env("HATO_QUEUE_URL"),
        description="Queue backend URL: `sqlite:///PATH`, `memory://`, `postgresql://…`, "
        "`redis://…`. Default `sqlite:///DATA_DIR/queue.db`.",
    )
    fsync: bool = Field(
        default=True,
        validation_alias=_env("HATO_FSYNC"),
        description="fsync the SQLite queue before answering 250. Turn off only for tests.",
    )

    # --- who may send what to whom ---------------------------------------------------
    mynetworks: CommaList | None = Field(
        default=None,
        validation_alias=_env("HATO_MYNETWORKS", "MYNETWORKS", "POSTFIX_mynetworks"),
        description="Trusted client networks (relay without AUTH). Default: loopback and "
        "the private ranges (as boky/postfix) for the local-relay and hold roles; loopback "
        "only when the route is `mx`.",
    )
    domains: CommaList = Field(
        default_factory=list,
        validation_alias=_env("HATO_DOMAINS"),
        description="Our own mail domains (Postfix `mydestination`); anyone may send to them.",
    )
    allowed_sender_domains: CommaList = Field(
        default_factory=list,
        validation_alias=_env("HATO_ALLOWED_SENDER_DOMAINS", "ALLOWED_SENDER_DOMAINS"),
        description="Envelope sender domains accepted (boky's ALLOWED_SENDER_DOMAINS). Empty: "
        "any, but only on a loopback-only server or with ALLOW_EMPTY_SENDER_DOMAINS.",
    )
    allow_empty_sender_domains: bool = Field(
        default=False,
        validation_alias=_env("HATO_ALLOW_EMPTY_SENDER_DOMAINS", "ALLOW_EMPTY_SENDER_DOMAINS"),
        description="Accept any sender domain even when reachable from outside loopback.",
    )

    # --- limits ----------------------------------------------------------------------
    message_size_limit: int = Field(
        default=10 * 1024 * 1024,
        ge=0,
        validation_alias=_env("HATO_MESSAGE_SIZE_LIMIT", "MESSAGE_SIZE_LIMIT"),
        description="Largest message in bytes (10 MiB as in the guide); 0 means no limit.",
    )
    max_recipients: int = Field(
        default=1000,
        ge=1,
        validation_alias=_env("HATO_MAX_RECIPIENTS"),
        description="Recipients per message (Postfix smtpd_recipient_limit).",
    )
    max_connections: int = Field(
        default=500,
        ge=1,
        validation_alias=_env("HATO_MAX_CONNECTIONS"),
        description="Concurrent SMTP connections in total, per listener (over every intake "
        "process when HATO_PROCESSES > 1).",
    )
    max_connections_per_client: int = Field(
        default=50,
        ge=1,
        validation_alias=_env("HATO_MAX_CONNECTIONS_PER_CLIENT"),
        description="Concurrent SMTP connections from one client address.",
    )
    idle_timeout: float = Field(
        default=300.0,
        gt=0,
        validation_alias=_env("HATO_IDLE_TIMEOUT"),
        description="Seconds a client may stay silent between commands (Postfix smtpd_timeout).",
    )
    command_timeout: float = Field(
        default=600.0,
        gt=0,
        validation_alias=_env("HATO_COMMAND_TIMEOUT"),
        description="Seconds one command line or one DATA transfer may take (trickling clients).",
    )
    max_received_headers: int = Field(
        default=50,
        ge=1,
        validation_alias=_env("HATO_MAX_RECEIVED_HEADERS"),
        description="More Received headers than this means a mail loop (Postfix hopcount_limit).",
    )

    # --- intake defences: password guessing, early talkers, junk, reserve, disk -------
    auth_user_failure_limit: int = Field(
        default=10,
        ge=1,
        validation_alias=_env("HATO_AUTH_USER_FAILURE_LIMIT"),
        description="Failed AUTH attempts per user name, from all clients together, within "
        "HATO_AUTH_USER_FAILURE_WINDOW before the name is locked: AUTH as it gets "
        "454 4.7.0 whatever the password, existing user or not, until the failures age out. "
        "Trusted networks and addresses that logged in as the user within the window are "
        "never locked out. Postfix and Dovecot count per client only.",
    )
    auth_user_failure_window: float = Field(
        default=600.0,
        gt=0,
        validation_alias=_env("HATO_AUTH_USER_FAILURE_WINDOW"),
        description="Window for counting AUTH failures per user name; a lock lasts at most this.",
    )
    greet_delay: float = Field(
        default=1.0,
        ge=0,
        validation_alias=_env("HATO_GREET_DELAY"),
        description="Seconds the greeting of an `smtp` listener not bound to loopback is held "
        "back from clients outside HATO_MYNETWORKS; a client that talks before it is a bot "
        "and gets 554 5.5.1 (Postfix postscreen's pregreet test, which waits 6s). Never on "
        "submission ports or loopback listeners; 0 turns it off.",
    )
    junk_command_limit: int = Field(
        default=100,
        ge=1,
        validation_alias=_env("HATO_JUNK_COMMAND_LIMIT"),
        description="NOOP, VRFY, ETRN and RSET commands a session may send between two "
        "accepted messages; the next one gets 421 4.7.0 and the connection closes (Postfix "
        "smtpd_junk_command_limit, 100).",
    )
    trusted_connection_reserve: int | None = Field(
        default=None,
        ge=0,
        validation_alias=_env("HATO_TRUSTED_CONNECTION_RESERVE"),
        description="Of HATO_MAX_CONNECTIONS on an `smtp` listener, how many only clients "
        "in HATO_MYNETWORKS may use, so that idle strangers cannot lock the application's "
        "own mail out. Default a tenth (50 of 500). Submission listeners have no reserve: "
        "their clients authenticate.",
    )
    queue_minfree: int | None = Field(
        default=None,
        ge=0,
        validation_alias=_env("HATO_QUEUE_MINFREE"),
        description="Bytes that must stay free on the SQLite queue's filesystem: MAIL is "
        "answered 452 4.3.1 (before any data is sent) when less would be left after the "
        "declared SIZE. Default 1.5 × HATO_MESSAGE_SIZE_LIMIT, the least Postfix advises "
        "for its queue_minfree; 0 checks the declared SIZE only. Not used with "
        "PostgreSQL, Redis or memory queues.",
    )

    @field_validator("auth_user_failure_window", "greet_delay", mode="before")
    @classmethod
    def _intake_duration(cls, value: object) -> float:
        return parse_duration(value)

    # --- TLS on our listeners --------------------------------------------------------
    tls_cert_file: Path | None = Field(
        default=None,
        validation_alias=_env("HATO_TLS_CERT_FILE"),
        description="Certificate chain (PEM, e.g. Let's Encrypt fullchain.pem); enables STARTTLS.",
    )
    tls_key_file: Path | None = Field(
        default=None,
        validation_alias=_env("HATO_TLS_KEY_FILE"),
        description="Private key (PEM, e.g. privkey.pem).",
    )

    # --- where mail goes -------------------------------------------------------------
    route: Route | None = Field(
        default=None,
        validation_alias=_env("HATO_ROUTE"),
        description="For mail not addressed to our own domains: `hold` (keep it here), "
        "`relay` (to RELAYHOST) or `mx`. Default `relay` when RELAYHOST is set, else `hold`.",
    )
    relay_host: str | None = Field(
        default=None,
        validation_alias=_env("HATO_RELAY_HOST", "RELAYHOST"),
        description="Upstream relay as `[host]:port` (Postfix/boky form).",
    )
    relay_username: str | None = Field(
        default=None,
        validation_alias=_env("HATO_RELAY_USERNAME", "RELAYHOST_USERNAME"),
        description="SASL user for the upstream relay.",
    )
    relay_password: SecretStr | None = Field(
        default=None,
        validation_alias=_env("HATO_RELAY_PASSWORD", "RELAYHOST_PASSWORD"),
        description="SASL password for the upstream relay (never logged).",
    )
    relay_username_file: Path | None = Field(
        default=None,
        validation_alias=_env("HATO_RELAY_USERNAME_FILE", "RELAYHOST_USERNAME_FILE"),
        description="File holding the relay user (Docker secrets).",
    )
    relay_password_file: Path | None = Field(
        default=None,
        validation_alias=_env("HATO_RELAY_PASSWORD_FILE", "RELAYHOST_PASSWORD_FILE"),
        description="File holding the relay password (Docker secrets).",
    )
    relay_tls: RelayTLS | None = Field(
        default=None,
        validation_alias=_env("HATO_RELAY_TLS"),
        description="TLS to the relay: `none`, `may`, `encrypt` (STARTTLS required) or "
        "`implicit`. Default `implicit` on port 465, `encrypt` with credentials, else `may`.",
    )
    relay_tls_verify: bool = Field(
        default=True,
        validation_alias=_env("HATO_RELAY_TLS_VERIFY"),
        description="Verify the relay's certificate. Turn off only for a self-signed upstream.",
    )
    relay_tls_ca_file: Path | None = Field(
        default=None,
        validation_alias=_env("HATO_RELAY_TLS_CA_FILE"),
        description="CA bundle (PEM) to verify the relay with, instead of the system's.",
    )
    relay_pool_size: int = Field(
        default=4,
        ge=1,
        validation_alias=_env("HATO_RELAY_POOL_SIZE"),
        description="Connections kept open to the relay and reused across messages.",
    )
    relay_timeout: float = Field(
        default=60.0,
        gt=0,
        validation_alias=_env("HATO_RELAY_TIMEOUT"),
        description="Seconds to wait for each reply of the relay.",
    )
    relay_pipelining: bool = Field(
        default=True,
        validation_alias=_env("HATO_RELAY_PIPELINING"),
        description="Send MAIL, RCPT and DATA as one group (RFC 2920) to a next hop that "
        "offers PIPELINING: the relay, `hato worker`'s server and MX hosts alike "
        "(false: one command at a time).",
    )

    # --- processes and flow control ----------------------------------------------------
    processes: int = Field(
        default=0,
        ge=0,
        le=64,
        validation_alias=_env("HATO_PROCESSES"),
        description="Intake processes of hato serve. 0 (the default): the CPUs this process "
        "may use (affinity and cgroup quota), at most 4. 1: one process does everything. "
        "More: a supervisor starts that many SMTP intake processes sharing the listening "
        "sockets and one delivery process (queue commits, worker, console). memory:// "
        "queues always use 1.",
    )
    intake_commit: Literal["delivery", "intake"] = Field(
        default="delivery",
        validation_alias=_env("HATO_INTAKE_COMMIT"),
        description="With HATO_PROCESSES above 1, who commits accepted mail to the queue. "
        "delivery: the intake processes send each message over a Unix socket to the "
        "delivery process, which commits them all in one group commit and hands fresh mail "
        "straight to its worker. intake: each intake process commits through its own "
        "writer (kept for measurement).",
    )
    in_flow_delay: float = Field(
        default=1.0,
        ge=0,
        validation_alias=_env("HATO_IN_FLOW_DELAY"),
        description="Flow control, as Postfix's in_flow_delay: while the unsent messages "
        "reach HATO_QUEUE_HIGH_WATER, the reply to DATA waits up to this many seconds for "
        "delivery to catch up. 0 turns it off.",
    )
    queue_high_water: int = Field(
        default=20000,
        ge=0,
        validation_alias=_env("HATO_QUEUE_HIGH_WATER"),
        description="Unsent messages (queued, sending, deferred) at which intake slows down "
        "(HATO_IN_FLOW_DELAY). 0 turns flow control off.",
    )

    # --- delivery worker -------------------------------------------------------------
    retry_min_delay: float = Field(
        default=60.0,
        gt=0,
        validation_alias=_env("HATO_RETRY_MIN_DELAY"),
        description="First retry delay (doubles each attempt). Postfix: 300s.",
    )
    retry_max_delay: float = Field(
        default=4000.0,
        gt=0,
        validation_alias=_env("HATO_RETRY_MAX_DELAY"),
        description="Longest retry delay. Postfix: 4000s.",
    )
    max_queue_lifetime: float = Field(
        default=5 * 86400.0,
        gt=0,
        validation_alias=_env("HATO_MAX_QUEUE_LIFETIME"),
        description="Give up and bounce after this long. Postfix: 5d.",
    )
    delay_warning: float = Field(
        default=4 * 3600.0,
        ge=0,
        validation_alias=_env("HATO_DELAY_WARNING"),
        description="Send the sender one delayed-mail DSN (RFC 3461 NOTIFY=DELAY, the default)"
        " for a message still queued after this long; 0 turns the warning off."
        " Postfix: delay_warning_time.",
    )
    worker_concurrency: int = Field(
        default=32,
        ge=1,
        validation_alias=_env("HATO_WORKER_CONCURRENCY"),
        description="Messages delivered at once by one worker.",
    )
    lease_seconds: float = Field(
        default=300.0,
        gt=0,
        validation_alias=_env("HATO_LEASE_SECONDS"),
        description="How long a claimed message stays leased to a worker before another may take it.",
    )
    trace_stages: Path | None = Field(
        default=None,
        validation_alias=_env("HATO_TRACE_STAGES"),
        description="Debugging latency: append one JSON line per delivered message to this"
        " file with the time it was accepted, committed, claimed, delivered and recorded (and"
        " a line per garbage collection over 5 ms); see docs/performance.md. Off by default.",
    )
    node_liveness_interval: float = Field(
        default=2.0,
        ge=0,
        validation_alias=_env("HATO_NODE_LIVENESS_INTERVAL"),
        description="On a PostgreSQL queue shared by several nodes: how often each worker"
        " looks for nodes that died (their liveness lock is free) and puts the messages they"
        " held back in the queue, instead of waiting for the lease to run out; 0: only at"
        " start-up.",
    )

    # --- relay server role: MX delivery, users, own domains, DKIM ----------------------
    dns_servers: CommaList = Field(
        default_factory=list,
        validation_alias=_env("HATO_DNS_SERVERS"),
        description="Resolvers for MX/A/AAAA/TXT lookups as `IP[:PORT]`, comma separated. "
        "Default: the system's (/etc/resolv.conf).",
    )
    outbound_port: int = Field(
        default=25,
        ge=1,
        le=65535,
        validation_alias=_env("HATO_OUTBOUND_PORT"),
        description="Port of the recipients' MX hosts. Only tests change it.",
    )
    allow_private_mx: bool = Field(
        default=False,
        validation_alias=_env("HATO_ALLOW_PRIVATE_MX"),
        description="Deliver to MX hosts in loopback, private or link-local space (tests).",
    )
    mx_tls: Literal["may", "encrypt", "verify"] = Field(
        default="may",
        validation_alias=_env("HATO_MX_TLS"),
        description="TLS towards MX hosts: `may` (opportunistic STARTTLS, Postfix's "
        "smtp_tls_security_level=may), `encrypt` (STARTTLS required) or `verify` "
        "(STARTTLS with a valid certificate for the MX name).",
    )
    mx_tls_policy: CommaList = Field(
        default_factory=list,
        validation_alias=_env("HATO_MX_TLS_POLICY"),
        description="Per-destination TLS levels: `domain=encrypt`, `domain=verify`, `domain=may`.",
    )
    mx_tls_ca_file: Path | None = Field(
        default=None,
        validation_alias=_env("HATO_MX_TLS_CA_FILE"),
        description="CA bundle (PEM) trusted besides the system's CAs for MX certificates "
        "and MTA-STS policy fetches (private deployments, tests). Unlike "
        "HATO_RELAY_TLS_CA_FILE it adds to the system's CAs, not replaces them.",
    )
    mta_sts_port: int = Field(
        default=443,
        ge=1,
        le=65535,
        validation_alias=_env("HATO_MTA_STS_PORT"),
        description="HTTPS port of MTA-STS policy fetches "
        "(`https://mta-sts.DOMAIN:PORT/.well-known/mta-sts.txt`). Only tests change it.",
    )
    dnssec_resolver: str | None = Field(
        default=None,
        validation_alias=_env("HATO_DNSSEC_RESOLVER"),
        description="A validating resolver (`IP[:PORT]`, e.g. a local unbound at "
        "`127.0.0.1:53`) asked for TLSA records with DO set; its AD bit is trusted for "
        "DANE (RFC 7672). Unset: no DANE.",
    )
    mx_concurrency: int = Field(
        default=10,
        ge=1,
        validation_alias=_env("HATO_MX_CONCURRENCY"),
        description="Concurrent connections per destination domain (Postfix "
        "default_destination_concurrency_limit = 20).",
    )
    users_file: Path | None = Field(
        default=None,
        validation_alias=_env("HATO_USERS_FILE"),
        description="SASL users (argon2id hashes), written by `hato user`. Default "
        "`DATA_DIR/users.json`; re-read when it changes, no restart needed.",
    )
    sender_login_check: bool = Field(
        default=True,
        validation_alias=_env("HATO_SENDER_LOGIN_CHECK"),
        description="An authenticated user may only use the sender addresses it owns "
        "(Postfix smtpd_sender_login_maps): by default every address of its own domain, "
        "widened or narrowed per user with `hato user add --allow`.",
    )
    allow_plaintext_auth: bool = Field(
        default=False,
        validation_alias=_env("HATO_ALLOW_PLAINTEXT_AUTH"),
        description="Offer AUTH without TLS to loopback clients of `smtp` listeners (an app "
        "on the same host that logs in over plain SMTP). Never on `submission` listeners, "
        "never to other addresses.",
    )
    auth_failure_limit: int = Field(
        default=5,
        ge=1,
        validation_alias=_env("HATO_AUTH_FAILURE_LIMIT"),
        description="Failed AUTH attempts per client address (across connections) within "
        "HATO_AUTH_FAILURE_WINDOW before it is refused with 421 4.7.0.",
    )
    auth_failure_window: float = Field(
        default=600.0,
        gt=0,
        validation_alias=_env("HATO_AUTH_FAILURE_WINDOW"),
        description="Window for counting AUTH failures per client address.",
    )
    maildir_root: Path | None = Field(
        default=None,
        validation_alias=_env("HATO_MAILDIR_ROOT"),
        description="Where mail for our own domains is delivered: `ROOT/DOMAIN/USER/` "
        "Maildirs. Default `DATA_DIR/mail`.",
    )
    aliases_file: Path | None = Field(
        default=None,
        validation_alias=_env("HATO_ALIASES_FILE"),
        description="Aliases in the familiar `name: target, target` form. Default "
        "`DATA_DIR/aliases` when it exists.",
    )
    recipient_delimiter: str = Field(
        default="+",
        validation_alias=_env("HATO_RECIPIENT_DELIMITER"),
        description="`user+tag@domain` is delivered to `user` (empty turns it off).",
    )
    verp: bool = Field(
        default=False,
        validation_alias=_env("HATO_VERP"),
        description="Send mail from our own domains with a VERP return path, "
        "`local+<signed queue id>@domain`, so a bounce names its message even when the "
        "upstream drops ENVID (docs/bounces.md).",
    )
    verp_secret: SecretStr | None = Field(
        default=None,
        validation_alias=_env("HATO_VERP_SECRET"),
        repr=False,
        description="The key that signs VERP tokens (16 bytes or more). Default: a random "
        "key kept in `DATA_DIR/verp.key`, made on first use.",
    )
    bounce_keep: bool = Field(
        default=False,
        validation_alias=_env("HATO_BOUNCE_KEEP"),
        description="Also deliver to the mailbox the bounces that were matched to a message "
        "this node sent and recorded as events (by default they are only recorded).",
    )
    dkim_dir: Path | None = Field(
        default=None,
        validation_alias=_env("HATO_DKIM_DIR"),
        description="DKIM keys written by `hato dkim keygen` as `DOMAIN/SELECTOR.{rsa,ed25519}.key`;"
        " every key found there signs mail from its domain. Default `DATA_DIR/dkim`.",
    )

    # --- our own domains: TLS-RPT and MTA-STS (RFC 8460, RFC 8461) ---------------------
    tlsrpt_org: str | None = Field(
        default=None,
        validation_alias=_env("HATO_TLSRPT_ORG"),
        description="`organization-name` of the TLS-RPT reports Hato sends. Default: "
        "HATO_HOSTNAME.",
    )
    tlsrpt_contact: str | None = Field(
        default=None,
        validation_alias=_env("HATO_TLSRPT_CONTACT"),
        description="`contact-info` of the TLS-RPT reports Hato sends. Default "
        "`postmaster@` the first of HATO_DOMAINS (else of HATO_HOSTNAME).",
    )
    tlsrpt_from: str | None = Field(
        default=None,
        validation_alias=_env("HATO_TLSRPT_FROM"),
        description="From and envelope sender of the TLS-RPT report messages Hato sends. "
        "Default `noreply-smtp-tls-reporting@` HATO_HOSTNAME.",
    )
    tlsrpt_send: bool = Field(
        default=True,
        validation_alias=_env("HATO_TLSRPT_SEND"),
        description="`hato serve` sends yesterday's TLS-RPT reports once a day, shortly "
        "after midnight UTC, to the `rua` of each recipient domain's `_smtp._tls` record.",
    )
    tlsrpt_rua: CommaList = Field(
        default_factory=list,
        validation_alias=_env("HATO_TLSRPT_RUA"),
        description="Where other servers send TLS-RPT reports about our domains (the `rua` "
        "that `hato dns records` puts in `_smtp._tls`): mail addresses or `https:` URIs. "
        "Default `postmaster@DOMAIN`. Reports that reach a Maildir of ours are read by "
        "`hato tls reports`.",
    )
    mta_sts_mode: Literal["enforce", "testing", "none"] = Field(
        default="testing",
        validation_alias=_env("HATO_MTA_STS_MODE"),
        description="`mode` of our own MTA-STS policy (`hato dns mta-sts-policy`, "
        "`/.well-known/mta-sts.txt`): start with `testing`, then `enforce`.",
    )
    mta_sts_max_age: int = Field(
        default=604800,
        ge=86400,
        le=31557600,
        validation_alias=_env("HATO_MTA_STS_MAX_AGE"),
        description="`max_age` (seconds) of our own MTA-STS policy: how long senders cache it.",
    )

    # --- application side: Mailer and hato worker --------------------------------------
    default_from: str | None = Field(
        default=None,
        validation_alias=_env("HATO_DEFAULT_FROM"),
        description="Sender used by `hato.Mailer.send` when `from_` is not given.",
    )
    smtp_host: str = Field(
        default="127.0.0.1",
        validation_alias=_env("HATO_SMTP_HOST"),
        description="Where `hato worker` delivers: the local relay or an SMTP service.",
    )
    smtp_port: int = Field(
        default=2525,
        ge=1,
        le=65535,
        validation_alias=_env("HATO_SMTP_PORT"),
        description="Port of HATO_SMTP_HOST.",
    )
    smtp_tls: RelayTLS | None = Field(
        default=None,
        validation_alias=_env("HATO_SMTP_TLS"),
        description="TLS to HATO_SMTP_HOST (as HATO_RELAY_TLS; default `implicit` on 465, "
        "`encrypt` with credentials, else `may`).",
    )
    smtp_tls_verify: bool = Field(
        default=True,
        validation_alias=_env("HATO_SMTP_TLS_VERIFY"),
        description="Verify HATO_SMTP_HOST's certificate.",
    )
    smtp_tls_ca_file: Path | None = Field(
        default=None,
        validation_alias=_env("HATO_SMTP_TLS_CA_FILE"),
        description="CA bundle for HATO_SMTP_HOST.",
    )
    smtp_requiretls: Literal["verify", "trusted"] = Field(
        default="verify",
        validation_alias=_env("HATO_SMTP_REQUIRETLS"),
        description="REQUIRETLS mail (RFC 8689, `require_tls=True`) to HATO_SMTP_HOST: "
        "`verify` sends it only over verified TLS to a server that offers REQUIRETLS; "
        "`trusted` (HATO_SMTP_HOST is Hato's relay server on a trusted network, e.g. in "
        "one compose network) passes the REQUIRETLS parameter on even in plaintext, and "
        "the relay server enforces it from there.",
    )
    smtp_username: str | None = Field(
        default=None,
        validation_alias=_env("HATO_SMTP_USERNAME"),
        description="SASL user for HATO_SMTP_HOST (an SMTP service such as SES).",
    )
    smtp_password: SecretStr | None = Field(
        default=None,
        validation_alias=_env("HATO_SMTP_PASSWORD"),
        description="SASL password for HATO_SMTP_HOST (never logged).",
    )
    smtp_password_file: Path | None = Field(
        default=None,
        validation_alias=_env("HATO_SMTP_PASSWORD_FILE"),
        description="File holding HATO_SMTP_PASSWORD.",
    )
    template_dir: Path | None = Field(
        default=None,
        validation_alias=_env("HATO_TEMPLATE_DIR"),
        description="Jinja2 templates for `Mailer.send_template` (NAME.subject.txt, "
        "NAME.txt, NAME.html). Default `./templates`.",
    )

    # --- the HTTP listener (console, API, health, metrics) ----------------------------
    http_listen: str | None = Field(
        default=None,
        validation_alias=_env("HATO_HTTP_LISTEN"),
        description="The HTTP listener (web console, API, `/healthz`, `/readyz`, "
        "`/metrics`): `HOST:PORT`; empty turns it off. Unset, it depends on the command: "
        f"`{DEFAULT_HTTP_LISTEN}` for `hato serve`, off for `hato worker`. Off loopback "
        "it needs HATO_HTTP_TOKEN or HATO_HTTP_TOKEN_FILE.",
    )
    http_token: SecretStr | None = Field(
        default=None,
        validation_alias=_env("HATO_HTTP_TOKEN"),
        description="The token for the HTTP listener: API clients send "
        "`Authorization: Bearer TOKEN`, the browser logs in with it once. Required off "
        "loopback; `hato health` sends it.",
    )
    http_token_file: Path | None = Field(
        default=None,
        validation_alias=_env("HATO_HTTP_TOKEN_FILE"),
        description="A file holding HATO_HTTP_TOKEN (a container secret, `/run/secrets/...`).",
    )
    http_hosts: CommaList = Field(
        default_factory=list,
        validation_alias=_env("HATO_HTTP_HOSTS"),
        description="Host names the HTTP listener answers to besides loopback names and "
        "addresses (and its own bound address); any other `Host` is refused "
        "(DNS rebinding).",
    )
    http_tls: bool = Field(
        default=False,
        validation_alias=_env("HATO_HTTP_TLS"),
        description="Serve HTTPS on HATO_HTTP_LISTEN with HATO_TLS_CERT_FILE and "
        "HATO_TLS_KEY_FILE; plain HTTP otherwise.",
    )

    # --- delivery events: pull and push ------------------------------------------------
    relay_events_url: str | None = Field(
        default=None,
        validation_alias=_env("HATO_RELAY_EVENTS_URL"),
        description="The upstream Hato's events API (`https://relay.example/api/v1/events`): "
        "`hato serve` pulls the events of the messages it relayed there, authenticated with "
        "the relay credentials (HATO_RELAY_USERNAME/PASSWORD), and records them as its own.",
    )
    smtp_events_url: str | None = Field(
        default=None,
        validation_alias=_env("HATO_SMTP_EVENTS_URL"),
        description="The local relay's events API: `hato worker` pulls the events of the "
        "messages it delivered there (with HATO_SMTP_USERNAME/PASSWORD when set) and writes "
        "them onto the outbox messages.",
    )
    events_poll_interval: float = Field(
        default=5.0,
        gt=0,
        validation_alias=_env("HATO_EVENTS_POLL_INTERVAL"),
        description="Seconds between two pulls of an upstream's events while messages "
        "relayed there are not final (ten times as long otherwise).",
    )
    webhook_url: CommaList = Field(
        default_factory=list,
        validation_alias=_env("HATO_WEBHOOK_URL"),
        description="Where each delivery event is POSTed as signed JSON (one or more URLs, "
        "comma-separated); at least once, from the queue's event log, retried with backoff.",
    )
    webhook_secret: SecretStr | None = Field(
        default=None,
        validation_alias=_env("HATO_WEBHOOK_SECRET"),
        repr=False,
        description="The HMAC-SHA256 key(s) of the `Hato-Signature` header; several "
        "comma-separated during a rotation (the sender signs with each, a receiver accepts "
        "any).",
    )
    webhook_secret_file: Path | None = Field(
        default=None,
        validation_alias=_env("HATO_WEBHOOK_SECRET_FILE"),
        repr=False,
        description="File holding HATO_WEBHOOK_SECRET (Docker secrets).",
    )

    # --- logging ---------------------------------------------------------------------
    log_format: Literal["text", "json"] = Field(
        default="text",
        validation_alias=_env("HATO_LOG_FORMAT"),
        description="Operator log format: Postfix-like `text` lines or `json`.",
    )

    # --- validators ------------------------------------------------------------------
    @field_validator(
        "listen",
        "domains",
        "allowed_sender_domains",
        "dns_servers",
        "mx_tls_policy",
        "http_hosts",
        "webhook_url",
        mode="before",
    )
    @classmethod
    def _split(cls, value: object) -> list[str]:
        return split_list(value)

    @field_validator("tlsrpt_rua", mode="before")
    @classmethod
    def _split_tlsrpt(cls, value: object) -> list[str]:
        return split_list(value)

    @field_validator("mta_sts_mode", mode="before")
    @classmethod
    def _lower_sts_mode(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("mynetworks", mode="before")
    @classmethod
    def _split_networks(cls, value: object) -> list[str] | None:
        if value is None:
            return None
        # Postfix writes IPv6 networks as [::1]/128.
        return [item.replace("[", "").replace("]", "") for item in split_list(value)]

    @field_validator("webhook_url", "relay_events_url", "smtp_events_url")
    @classmethod
    def _http_urls(cls, value: list[str] | str | None) -> list[str] | str | None:
        for url in [value] if isinstance(value, str) else value or []:
            if not url.lower().startswith(("http://", "https://")) or len(url) < 10:
                raise ValueError(f"{url!r} is not an http:// or https:// URL")
        return value

    @field_validator("domains", "allowed_sender_domains")
    @classmethod
    def _lower_domains(cls, value: list[str]) -> list[str]:
        return [normalize_domain(d) for d in value]

    @field_validator("dnssec_resolver")
    @classmethod
    def _resolver_address(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from hato.dns import parse_server  # dnspython only where DANE is asked for

        try:
            parse_server(value)
        except ConfigError:
            raise ValueError(f"{value!r} is not IP[:PORT] (a resolver by address)") from None
        return value.strip()

    @field_validator(
        "relay_tls", "smtp_tls", "route", "mx_tls", "log_format", "smtp_requiretls", mode="before"
    )
    @classmethod
    def _lower_choice(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("allow_empty_sender_domains", mode="before")
    @classmethod
    def _boky_truthy(cls, value: object) -> bool:
        # boky: any non-empty value turns it on.
        return _truthy(value)

    @field_validator(
        "retry_min_delay",
        "retry_max_delay",
        "max_queue_lifetime",
        "delay_warning",
        "idle_timeout",
        "command_timeout",
        "lease_seconds",
        "relay_timeout",
        "auth_failure_window",
        "in_flow_delay",
        mode="before",
    )
    @classmethod
    def _duration(cls, value: object) -> float:
        return parse_duration(value)

    @field_validator(
        "relay_host", "relay_username", "queue_url", "default_from", "smtp_username", mode="before"
    )
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest priority first: CLI flags (init) > environment > .env > hato.toml.
        return (
            init_settings,
            _EnvSource(settings_cls),
            _DotEnvSource(settings_cls),
            TomlConfigSettingsSource(settings_cls),
            file_secret_settings,
        )

    # --- effective values (derived, never stored twice) ------------------------------
    @property
    def listeners(self) -> list[Listener]:
        return [parse_listener(item) for item in self.listen]

    def http_listener(self, command: Literal["serve", "worker"]) -> tuple[str, int] | None:
        """Where ``command``'s HTTP listener binds, ``(host, port)``, or ``None`` when it
        is off: HATO_HTTP_LISTEN, or unset, ``127.0.0.1:8025`` for ``serve`` and off for
        ``worker``. Raises ConfigError on bad syntax."""
        text = self.http_listen
        if text is None:
            text = DEFAULT_HTTP_LISTEN if command == "serve" else ""
        text = text.strip()
        if not text:
            return None
        try:
            listener = parse_listener(text)
        except ValueError as exc:
            raise ConfigError(f"HATO_HTTP_LISTEN: {text!r} is not HOST:PORT") from exc
        return listener.host, listener.port

    def http_token_value(self) -> str | None:
        """HATO_HTTP_TOKEN, else the content of HATO_HTTP_TOKEN_FILE (read now), else
        ``None``. Raises ConfigError when the file cannot be read or is empty."""
        if self.http_token is not None and self.http_token.get_secret_value().strip():
            return self.http_token.get_secret_value().strip()
        if self.http_token_file is None:
            return None
        token = _read_secret(self.http_token_file, "HATO_HTTP_TOKEN")
        if not token:
            raise ConfigError(f"HATO_HTTP_TOKEN_FILE {self.http_token_file} is empty")
        return token

    @property
    def effective_queue_url(self) -> str:
        return self.queue_url or f"sqlite:///{self.data_dir / 'queue.db'}"

    @property
    def effective_route(self) -> Route:
        if self.route is not None:
            return self.route
        return "relay" if self.relay_host else "hold"

    @property
    def effective_users_file(self) -> Path:
        return self.users_file or self.data_dir / "users.json"

    @property
    def effective_maildir_root(self) -> Path:
        return self.maildir_root or self.data_dir / "mail"

    @property
    def effective_aliases_file(self) -> Path | None:
        if self.aliases_file is not None:
            return self.aliases_file
        default = self.data_dir / "aliases"
        return default if default.is_file() else None

    @property
    def effective_dkim_dir(self) -> Path:
        return self.dkim_dir or self.data_dir / "dkim"

    @property
    def effective_tlsrpt_contact(self) -> str:
        domain = self.domains[0] if self.domains else self.hostname
        return self.tlsrpt_contact or f"postmaster@{domain}"

    def effective_tlsrpt_rua(self, domain: str) -> list[str]:
        """The rua of ``_smtp._tls.DOMAIN``: HATO_TLSRPT_RUA, else postmaster@DOMAIN."""
        return list(self.tlsrpt_rua) or [f"postmaster@{domain}"]

    @property
    def effective_mynetworks(self) -> list[str]:
        if self.mynetworks is not None:
            return list(self.mynetworks)
        if self.effective_route == "mx":
            return list(LOOPBACK_NETWORKS)
        return [*LOOPBACK_NETWORKS, *PRIVATE_NETWORKS]

    @property
    def relay(self) -> Smarthost | None:
        """Where ``hato serve`` relays: the smarthost of the ``relay`` route, from
        ``RELAYHOST`` and ``HATO_RELAY_*``; ``None`` on the ``hold`` and ``mx`` routes.
        Raises ConfigError if ``RELAYHOST`` does not parse. Secret files stay unread."""
        if self.effective_route != "relay" or not self.relay_host:
            return None
        host, port = parse_relayhost(self.relay_host)
        return Smarthost(
            source="relay",
            host=host,
            port=port,
            tls=self.relay_tls
            or default_tls(port, credentials=bool(self.relay_username or self.relay_username_file)),
            verify=self.relay_tls_verify,
            ca_file=self.relay_tls_ca_file,
            username=self.relay_username,
            username_file=self.relay_username_file,
            password=self.relay_password,
            password_file=self.relay_password_file,
            timeout=self.relay_timeout,
            pool_size=self.relay_pool_size,
            pipelining=self.relay_pipelining,
        )

    @property
    def smtp(self) -> Smarthost:
        """Where ``hato worker`` delivers: ``HATO_SMTP_HOST`` and ``HATO_SMTP_*``, with the
        relay's timeout and one pooled connection per concurrent delivery. Secret files
        stay unread."""
        return Smarthost(
            source="smtp",
            host=self.smtp_host,
            port=self.smtp_port,
            tls=self.smtp_tls or default_tls(self.smtp_port, credentials=bool(self.smtp_username)),
            verify=self.smtp_tls_verify,
            ca_file=self.smtp_tls_ca_file,
            username=self.smtp_username,
            password=self.smtp_password,
            password_file=self.smtp_password_file,
            timeout=self.relay_timeout,
            pool_size=max(self.relay_pool_size, self.worker_concurrency),
            requiretls=self.smtp_requiretls,
            pipelining=self.relay_pipelining,
        )

    @property
    def role(self) -> str:
        """A short description of the role this configuration plays."""
        route = self.effective_route
        if route == "relay":
            return f"local relay (relays to {self.relay_host})"
        if route == "mx":
            return "relay server (delivers to MX hosts)"
        return "capture (holds mail; nothing leaves this machine)"

    def validate_for_serve(self) -> None:
        """Cross-field checks that make ``hato serve`` refuse to start. Raises ConfigError.
        Secret files are not read here (:meth:`Smarthost.resolve` does, at start)."""
        listeners = self.listeners  # raises ValueError on bad syntax
        for net in self.effective_mynetworks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ConfigError(f"HATO_MYNETWORKS: {net!r} is not a network ({exc})") from exc
        route = self.effective_route
        if route == "relay" and not self.relay_host:
            raise ConfigError("HATO_ROUTE=relay needs RELAYHOST (or HATO_RELAY_HOST)")
        if self.relay_host:
            parse_relayhost(self.relay_host)  # a typo is an error whatever the route
        relay = self.relay
        if relay is not None:
            relay.check()
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("set both HATO_TLS_CERT_FILE and HATO_TLS_KEY_FILE, or neither")
        needs_tls = [item for item in listeners if item.role != "smtp"]
        if needs_tls and self.tls_cert_file is None:
            raise ConfigError(
                f"listener {needs_tls[0]} needs a TLS certificate: set HATO_TLS_CERT_FILE and "
                "HATO_TLS_KEY_FILE (hato tls self-signed makes one for development)"
            )
        for path in (self.tls_cert_file, self.tls_key_file):
            if path is not None and not path.is_file():
                raise ConfigError(f"file not found: {path}")
        public = [item for item in listeners if not item.is_loopback]
        # Like boky/postfix: a server that relays without AUTH for clients beyond loopback
        # must say which sender domains it relays for. A relay server whose only trusted
        # network is loopback relays for authenticated users alone and needs no such list.
        trusts_beyond_loopback = any(
            not ipaddress.ip_network(net, strict=False).is_loopback
            for net in self.effective_mynetworks
        )
        if (
            public
            and route != "hold"
            and trusts_beyond_loopback
            and not self.allowed_sender_domains
            and not self.allow_empty_sender_domains
        ):
            raise ConfigError(
                f"refusing to relay from {public[0]} (reachable from outside loopback) without "
                "ALLOWED_SENDER_DOMAINS; set it, or ALLOW_EMPTY_SENDER_DOMAINS=true to accept any"
            )
        if self.retry_min_delay > self.retry_max_delay:
            raise ConfigError("HATO_RETRY_MIN_DELAY is larger than HATO_RETRY_MAX_DELAY")

    def validate_for_worker(self) -> None:
        """Refuse settings ``hato worker`` cannot work with (ConfigError, one line).
        Secret files are not read here (:meth:`Smarthost.resolve` does, at start)."""
        url = self.effective_queue_url
        if url.split(":", 1)[0].lower() == "memory":
            raise ConfigError(
                "HATO_QUEUE_URL=memory:// lives inside one process; hato worker needs the app's "
                "queue: sqlite:///PATH, postgresql://... or redis://..."
            )
        self.smtp.check()


def _read_secret(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror}") from exc


def load_settings(*, config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build Settings; ``overrides`` are CLI flags (None values are ignored).

    Raises ConfigError with one line per problem instead of a pydantic traceback.
    """
    values = {k: v for k, v in overrides.items() if v is not None}
    try:
        if config_file is not None:
            if not config_file.is_file():
                raise ConfigError(f"config file not found: {config_file}")

            class FileSettings(Settings):
                model_config = SettingsConfigDict(toml_file=str(config_file))

            return FileSettings(**values)
        return Settings(**values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "settings"
        msg = err["msg"].removeprefix("Value error, ")
        problems.append(f"{loc}: {msg}")
    return "invalid settings: " + "; ".join(problems)


def settings_reference() -> str:
    """Markdown table of every setting: name, environment names, default, meaning."""
    lines = [
        "# Settings",
        "",
        "Generated from `src/hato/config.py` by `python -m hato.config`; do not edit by hand.",
        "",
        "Precedence: defaults < `hato.toml` (field names as keys) < `.env` < environment < "
        "CLI flags. Durations take seconds or `30s`, `5m`, `1h`, `5d`. Lists take commas "
        "or spaces.",
        "",
        "| setting | environment | default | meaning |",
        "|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        envs = list(alias.choices) if isinstance(alias, AliasChoices) else []
        if field.default_factory is not None:
            default = {
                "listen": "`127.0.0.1:2525`",
                "hostname": "the host name",
                "data_dir": "`~/.local/share/hato`",
            }.get(name, "empty")
        elif field.default is None:
            default = "unset"
        else:
            default = f"`{field.default}`"
        env_names = ", ".join(f"`{e}`" for e in envs)
        lines.append(f"| `{name}` | {env_names} | {default} | {field.description or ''} |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class MailerEnvironment:
    """What :func:`mailer_environment` read; see there."""

    queue_url: str
    default_from: str | None
    template_dir: Path | None
    data_dir: Path


def mailer_environment() -> MailerEnvironment:
    """The fallbacks of ``hato.Mailer`` / ``AsyncMailer``, from the environment only.

    Exactly these variables are read (an empty value counts as unset); no ``hato.toml``
    and no ``.env`` file, since an application's working directory is not Hato's:

    * ``HATO_QUEUE_URL``: the queue; else ``sqlite:///DATA_DIR/queue.db``;
    * ``HATO_DATA_DIR``: that ``DATA_DIR``; else ``$XDG_DATA_HOME/hato``
      (``~/.local/share/hato``);
    * ``HATO_DEFAULT_FROM``: the sender of messages without ``from_``; else none;
    * ``HATO_TEMPLATE_DIR``: the folder of ``send_template``; else none (``./templates``).
    """
    data_dir = Path(os.environ.get("HATO_DATA_DIR") or _default_data_dir())
    template_dir = os.environ.get("HATO_TEMPLATE_DIR")
    return MailerEnvironment(
        queue_url=os.environ.get("HATO_QUEUE_URL") or f"sqlite:///{data_dir / 'queue.db'}",
        default_from=os.environ.get("HATO_DEFAULT_FROM") or None,
        template_dir=Path(template_dir) if template_dir else None,
        data_dir=data_dir,
    )


def webhook_secrets(secret: str | None, secret_file: Path | None) -> list[str]:
    """The webhook keys, newest first: ``HATO_WEBHOOK_SECRET``'s comma-separated values,
    else those of ``HATO_WEBHOOK_SECRET_FILE`` (ConfigError if it cannot be read)."""
    text = secret or ""
    if not text and secret_file is not None:
        text = _read_secret(secret_file, "webhook secret")
    return [part.strip() for part in text.split(",") if part.strip()]


def settings_webhook_secrets(settings: Settings) -> list[str]:
    """:func:`webhook_secrets` of the settings."""
    secret = settings.webhook_secret
    return webhook_secrets(
        secret.get_secret_value() if secret is not None else None, settings.webhook_secret_file
    )


def environment_webhook_secrets() -> list[str]:
    """The webhook keys of the environment alone (``HATO_WEBHOOK_SECRET``, else
    ``HATO_WEBHOOK_SECRET_FILE``), for receivers inside an application; may be empty."""
    secret_file = os.environ.get("HATO_WEBHOOK_SECRET_FILE")
    return webhook_secrets(
        os.environ.get("HATO_WEBHOOK_SECRET"), Path(secret_file) if secret_file else None
    )


@dataclass(frozen=True, slots=True)
class WebhookEnvironment:
    """What :func:`webhook_environment` read; see there."""

    queue_url: str
    secrets: list[str]


def webhook_environment() -> WebhookEnvironment:
    """The settings of ``hato.webhooks.app`` (a receiver run as ``uvicorn
    hato.webhooks:app`` beside the application), from the environment only, as
    :func:`mailer_environment` reads them: ``HATO_QUEUE_URL`` (else the SQLite file in
    ``HATO_DATA_DIR``), and ``HATO_WEBHOOK_SECRET`` or ``HATO_WEBHOOK_SECRET_FILE``
    (required: ConfigError without one)."""
    mailer = mailer_environment()
    secrets = environment_webhook_secrets()
    if not secrets:
        raise ConfigError("set HATO_WEBHOOK_SECRET (or HATO_WEBHOOK_SECRET_FILE)")
    return WebhookEnvironment(queue_url=mailer.queue_url, secrets=secrets)


if __name__ == "__main__":
    print(settings_reference(), end="")
