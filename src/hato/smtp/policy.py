"""Intake policy: who may authenticate, send from which address and relay to whom.

The state machine in :mod:`hato.smtp.protocol` parses; this module decides. One
:class:`Policy` exists per listener, so the listener's role (``smtp``, ``submission``,
``submissions``) is part of it. Every decision returns either an accepted, normalised
value or a :class:`~hato.reply.Reply` to send.

The relay rule (no open relay, under any address syntax): a session from a trusted
network or an authenticated one may send to any well-formed address; any other session
only to our own domains, and then only to plain local parts: percent hacks
(``a%b@ours``), bang paths (``b!a@ours``), quoted local parts holding ``@ % !``, source
routes (``<@x:a@ours>``), address literals and unqualified names (except ``postmaster``,
RFC 5321 4.5.1) are refused. Trailing-dot domains never parse.

Recipients of our own domains must exist (Postfix ``local_recipient_maps``). The check is
a lookup in memory (:class:`~hato.aliases.LocalRecipients` over the users snapshot): it
runs on the event loop, in the middle of the synchronous state machine, and does no file
I/O. An unknown name is refused ``550``, or deferred ``451`` while a change of the users
file is pending (seen, not yet read); :mod:`hato.users` explains why that accepts a user
added a moment ago and never refuses one.

Address literals are refused at RCPT when delivery would refuse them, whoever asks: an
invalid one (``[300.1.1.1]``, ``[::1]`` without its ``IPv6:`` tag, leading zeros, zone
ids) or an IP address written as a domain (``x@127.0.0.1``, any all-numeric top label)
gets ``501 5.1.3``; on the ``mx`` route, a literal in loopback, private or reserved
space gets ``550 5.4.4`` unless ``HATO_ALLOW_PRIVATE_MX``, as the MX courier would.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

from hato import reply
from hato.dns import is_private
from hato.errors import AddressError, ConfigError
from hato.message import normalize_domain, parse_address
from hato.reply import Reply

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# (authenticated user, sender address) -> may this user send as this address?
SenderCheck = Callable[[str, str], bool]

# (address in one of our domains) -> does it name a user, an alias, postmaster or abuse?
RecipientCheck = Callable[[str], bool]

# () -> may the table behind the RecipientCheck miss a change it was told about?
PendingCheck = Callable[[], bool]

_ROUTING_CHARS = ("%", "!", "@")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_LITERAL_CHARS = frozenset("0123456789abcdefABCDEF:.")


class ListenerRole(StrEnum):
    """What a listener is for.

    * ``smtp``: mail from trusted networks and to our own domains; AUTH optional.
    * ``submission``: STARTTLS required before AUTH and MAIL; AUTH required for MAIL.
    * ``submissions``: TLS from the first byte (RFC 8314); AUTH required for MAIL.
    """

    SMTP = "smtp"
    SUBMISSION = "submission"
    SUBMISSIONS = "submissions"


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """Where a listener binds and what role it plays. ``port`` may be 0 (any free port)."""

    host: str = "127.0.0.1"
    port: int = 2525
    role: ListenerRole = ListenerRole.SMTP

    @property
    def implicit_tls(self) -> bool:
        return self.role is ListenerRole.SUBMISSIONS


@dataclass(slots=True)
class SessionFacts:
    """What the policy knows about a session; the state machine keeps it up to date."""

    client_ip: str
    trusted: bool = False
    loopback: bool = False
    tls: bool = False
    user: str = ""


def parse_networks(items: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Parse ``mynetworks`` entries (``127.0.0.0/8``, ``[::1]/128``, ``10.0.0.1``).

    Postfix's bracketed IPv6 form is accepted. Raises :class:`ConfigError` on a bad entry.
    """
    nets: list[IPNetwork] = []
    for item in items:
        text = item.strip()
        if not text:
            continue
        addr, slash, length = text.partition("/")
        addr = addr.strip().removeprefix("[").removesuffix("]")
        try:
            nets.append(ipaddress.ip_network(f"{addr}{slash}{length}", strict=False))
        except ValueError as exc:
            raise ConfigError(f"invalid network in mynetworks: {item!r}") from exc
    return tuple(nets)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def literal_address(domain: str) -> IPAddress | None:
    """The address of an RFC 5321 address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``),
    or ``None`` if ``domain`` is not a valid one.

    Strict on purpose: IPv4 in dotted decimal without leading zeros (``[010.0.0.1]`` reads
    as 8 or 10 depending on who parses it), IPv6 only after its tag, no zone ids, no other
    tags (none is registered).
    """
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    v6 = inner[:5].lower() == "ipv6:"
    text = inner[5:] if v6 else inner
    if not text or not _LITERAL_CHARS.issuperset(text):
        return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return ip if (ip.version == 6) == v6 else None


def split_source_route(path: str) -> tuple[str, str]:
    """``"@a,@b:x@y"`` → ``("@a,@b", "x@y")``; a path without a route → ``("", path)``."""
    if path.startswith("@"):
        route, colon, mailbox = path.partition(":")
        if colon:
            return route, mailbox
    return "", path


class Policy:
    """The decisions of one listener. Pure: no I/O, safe to share between sessions."""

    def __init__(
        self,
        *,
        role: ListenerRole = ListenerRole.SMTP,
        mynetworks: Iterable[IPNetwork] = (),
        domains: Iterable[str] = (),
        allowed_sender_domains: Iterable[str] = (),
        allow_empty_sender_domains: bool = False,
        allow_plaintext_auth: bool = False,
        sender_allowed: SenderCheck | None = None,
        local_recipient_exists: RecipientCheck | None = None,
        recipients_pending: PendingCheck | None = None,
        route: str | None = None,
        allow_private_mx: bool = False,
    ) -> None:
        """
        ``domains``: our own domains (mail to them is accepted from anyone).
        ``allowed_sender_domains``: when non-empty, MAIL FROM must use one of them
        (boky/postfix ``ALLOWED_SENDER_DOMAINS``); empty means any sender domain.
        ``allow_empty_sender_domains`` is boky's explicit "yes, any sender domain" switch;
        the composition root uses it to refuse an exposed relay without sender domains,
        here it only documents intent. ``allow_plaintext_auth``: allow AUTH without TLS
        from loopback clients on the ``smtp`` role (``HATO_ALLOW_PLAINTEXT_AUTH``).
        ``sender_allowed(user, address)``: may an authenticated user use this sender
        address (the users' login maps); ``None`` allows any.
        ``local_recipient_exists(address)``: does a recipient in our own domains exist
        (users and aliases, Postfix ``local_recipient_maps``), answered from memory;
        unknown ones get 550 5.1.1, whoever asks, or 451 4.3.0 while
        ``recipients_pending()`` says the table is about to change (module docstring).
        ``route``: where mail for other domains goes (``hold``, ``relay`` or ``mx``); on
        ``mx`` an address literal in loopback, private or reserved space is refused at
        RCPT unless ``allow_private_mx`` (``HATO_ALLOW_PRIVATE_MX``).
        """
        self.role = role
        self.mynetworks = tuple(mynetworks)
        self.domains = tuple(normalize_domain(d) for d in domains if d.strip())
        self._domain_set = frozenset(self.domains)
        self.allowed_sender_domains = frozenset(
            normalize_domain(d) for d in allowed_sender_domains if d.strip()
        )
        self.allow_empty_sender_domains = allow_empty_sender_domains
        self.allow_plaintext_auth = allow_plaintext_auth
        self.sender_allowed = sender_allowed
        self.local_recipient_exists = local_recipient_exists
        self.recipients_pending = recipients_pending
        self.route = route
        self.allow_private_mx = allow_private_mx
        self._client_cache: dict[str, tuple[bool, bool]] = {}

    # Session-level facts

    def facts(self, client_ip: str, *, tls: bool = False) -> SessionFacts:
        """The facts for a new session from ``client_ip``."""
        known = self._client_cache.get(client_ip)
        if known is None:
            ip = _ip(client_ip)
            known = (
                ip is not None and any(ip in net for net in self.mynetworks),
                ip is not None and ip.is_loopback,
            )
            if len(self._client_cache) >= 4096:  # bounded: many clients, few repeats
                self._client_cache.clear()
            self._client_cache[client_ip] = known
        return SessionFacts(client_ip=client_ip, trusted=known[0], loopback=known[1], tls=tls)

    def is_trusted(self, client_ip: str) -> bool:
        return self.facts(client_ip).trusted

    @property
    def requires_auth(self) -> bool:
        return self.role is not ListenerRole.SMTP

    def auth_permitted(self, facts: SessionFacts) -> bool:
        """May the session use AUTH now (and so is it advertised in EHLO)?"""
        if facts.tls:
            return True
        if self.role is not ListenerRole.SMTP:
            return False
        return self.allow_plaintext_auth and facts.loopback

    def mail_permitted(self, facts: SessionFacts) -> Reply | None:
        """May the session start a transaction at all? ``None`` if so."""
        if self.role is ListenerRole.SUBMISSION and not facts.tls:
            return reply.TLS_REQUIRED
        if self.requires_auth and not facts.user:
            return reply.AUTH_REQUIRED
        return None

    # Envelope decisions

    def check_sender(self, facts: SessionFacts, path: str, *, smtputf8: bool) -> Reply | str:
        """Decide on MAIL FROM's path (the text between the angle brackets)."""
        _route, mailbox = split_source_route(path)  # RFC 5321 C: routes in MAIL are ignored
        if not mailbox:
            return ""
        try:
            address = parse_address(mailbox, allow_utf8=smtputf8)
        except AddressError:
            return reply.BAD_SENDER_ADDRESS
        if (
            self.allowed_sender_domains
            and normalize_domain(address.domain) not in self.allowed_sender_domains
        ):
            return reply.SENDER_DOMAIN_DENIED
        text = str(address)
        allowed = self.sender_allowed
        if facts.user and allowed is not None and not allowed(facts.user, text):
            return reply.SENDER_DENIED
        return text

    def may_relay(self, facts: SessionFacts) -> bool:
        return facts.trusted or bool(facts.user)

    def check_recipient(self, facts: SessionFacts, path: str, *, smtputf8: bool) -> Reply | str:
        """Decide on RCPT TO's path: the normalised address, or the rejection."""
        route, mailbox = split_source_route(path)
        relay = self.may_relay(facts)
        if route and not relay:
            return reply.RELAY_DENIED
        if "@" not in mailbox:
            if mailbox.lower() == "postmaster" and self.domains:
                return f"postmaster@{self.domains[0]}"
            return reply.NEED_FQDN if mailbox else reply.BAD_ADDRESS
        try:
            address = parse_address(mailbox, allow_utf8=smtputf8)
        except AddressError:
            return reply.BAD_ADDRESS
        refusal = self._literal_refusal(address.domain, relay)
        if refusal is not None:
            return refusal
        ours = not address.is_literal and normalize_domain(address.domain) in self._domain_set
        if ours and not (relay and any(c in address.local for c in _ROUTING_CHARS)):
            unknown = self._unknown_local(str(address))
            if unknown is not None:
                return unknown
        if relay:
            return str(address)
        if not ours:
            return reply.RELAY_DENIED
        if any(c in address.local for c in _ROUTING_CHARS):
            return reply.RELAY_DENIED
        return str(address)

    def _literal_refusal(self, domain: str, relay: bool) -> Reply | None:
        """Refuse an address literal (or an address posing as a domain) that delivery
        would refuse; sessions that may not relay keep their relay refusal otherwise."""
        if not domain.startswith("["):
            if domain.rpartition(".")[2].isdigit():  # "x@127.0.0.1": no such top label
                return reply.BAD_ADDRESS_LITERAL
            return None
        ip = literal_address(domain)
        if ip is None:
            return reply.BAD_ADDRESS_LITERAL
        if relay and self.route == "mx" and not self.allow_private_mx and is_private(str(ip)):
            return reply.PRIVATE_ADDRESS_LITERAL
        return None

    def _unknown_local(self, address: str) -> Reply | None:
        exists = self.local_recipient_exists
        if exists is None:
            return None
        try:
            if exists(address):
                return None
        except Exception:  # a broken user store defers, it never says "no such user"
            return reply.LOCAL_LOOKUP_FAILED
        pending = self.recipients_pending
        if pending is not None and pending():
            return reply.LOCAL_LOOKUP_FAILED  # the changed file, not yet read, may name it
        return reply.NO_SUCH_USER
