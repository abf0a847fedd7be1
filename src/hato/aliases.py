"""Local recipients: the aliases file and what an address of our own domains resolves to.

The aliases file has the familiar ``/etc/aliases`` form (aliases(5))::

    # comments and blank lines are ignored
    postmaster: root
    sales:      alice, bob+sales,
                carol@example.net          # a line starting with whitespace continues
    info@example.org: alice                # an extension: only for that domain

A name maps to one or more targets, separated by commas (or whitespace). A target is a
bare local name (a mailbox in the recipient's domain, or another alias), an address in
one of our domains (resolved again), or an external address (forwarded: the message is
queued again for that address). Pipes (``|command``), files (``/path``) and
``:include:`` are refused: Hato delivers only to Maildirs. Names are compared in lower
case; a duplicated name is an error.

Resolution of ``local@domain`` (:meth:`LocalRecipients.expand`), first match wins: an
alias for the full local part, a user of the user store, then the same two for the local
part without its extension (``user+tag`` → ``user``, the recipient delimiter), then the
always-present ``postmaster`` and ``abuse``: without an alias they resolve to the
configured postmaster target, or, failing that, ``abuse`` to ``postmaster`` and
``postmaster`` to a Maildir named ``postmaster`` (RFC 5321 4.5.1 and RFC 2142 require
both to accept mail). Anything else is unknown: ``550 5.1.1``.

Expansion is bounded: an alias that names itself delivers to its own Maildir (as in
Postfix, ``root: root, admin@example.net``), a longer cycle is cut where it repeats, and
nesting deeper than :data:`MAX_DEPTH` or a cycle with nothing left to deliver to is a
mail loop, ``554 5.4.6``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hato.errors import AddressError, ConfigError
from hato.message import normalize_domain, parse_address
from hato.reply import Reply

# (local part without extension, lower case; our domain, normalised) -> is this a user?
UserExists = Callable[[str, str], bool]

MAX_DEPTH = 10

UNKNOWN_USER = Reply(550, "5.1.1", "Recipient address rejected: user unknown")
ALIAS_LOOP = Reply(554, "5.4.6", "Alias expansion loop")

ALWAYS_PRESENT = ("postmaster", "abuse")

# A local name usable as a Maildir directory: atext without "/", not starting with ".".
_NAME_RE = re.compile(
    r"^[a-z0-9!#$%&'*+=?^_`{|}~\-\u0080-\U0010ffff][a-z0-9.!#$%&'*+=?^_`{|}~\-\u0080-\U0010ffff]*$"
)


def is_mailbox_name(name: str) -> bool:
    """Can ``name`` be a Maildir directory under the domain (no ``/``, no leading dot)?"""
    return bool(_NAME_RE.match(name)) and len(name.encode()) <= 64


@dataclass(frozen=True, slots=True)
class Aliases:
    """Parsed aliases: ``name`` or ``name@domain`` (lower case) → targets."""

    entries: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def lookup(self, local: str, domain: str) -> tuple[str, ...] | None:
        """The targets of ``local@domain``: a domain-specific entry, else a bare one."""
        return self.entries.get(f"{local}@{domain}") or self.entries.get(local)

    def __len__(self) -> int:
        return len(self.entries)


def _check_target(target: str, where: str) -> str:
    if target.startswith(("|", "/", '"|', '"/')) or target.lower().startswith(":include:"):
        raise ConfigError(
            f"{where}: target {target!r} is not supported: Hato delivers to Maildirs "
            "and addresses only (no pipes, files or :include:)"
        )
    if "@" in target:
        try:
            address = parse_address(target)
        except AddressError as exc:
            raise ConfigError(f"{where}: target {target!r}: {exc}") from None
        if address.is_literal:
            raise ConfigError(f"{where}: target {target!r}: address literals are not supported")
        return f"{address.local}@{normalize_domain(address.domain)}"
    name = target.lower()
    if not is_mailbox_name(name):
        raise ConfigError(f"{where}: target {target!r} is not a valid local name")
    return name


def _check_name(name: str, where: str) -> str:
    local, at, domain = name.lower().partition("@")
    if not is_mailbox_name(local) or (at and not domain):
        raise ConfigError(f"{where}: {name!r} is not a valid alias name")
    return f"{local}@{normalize_domain(domain)}" if at else local


def parse_aliases(text: str, source: str = "aliases") -> Aliases:
    """Parse aliases-file text; :class:`ConfigError` naming ``source`` and the line."""
    logical: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = re.sub(r"\s#.*$", "", raw).strip()  # also a comment after the targets
        if not stripped or stripped.startswith("#"):
            continue
        if raw[:1] in (" ", "\t"):
            if not logical:
                raise ConfigError(f"{source}:{number}: continuation line without an entry")
            first, previous = logical[-1]
            logical[-1] = (first, f"{previous} {stripped}")
        else:
            logical.append((number, stripped))
    entries: dict[str, tuple[str, ...]] = {}
    for number, line in logical:
        where = f"{source}:{number}"
        name, colon, rest = line.partition(":")
        if not colon or not name.strip():
            raise ConfigError(f"{where}: expected 'name: target, target'")
        key = _check_name(name.strip(), where)
        if key in entries:
            raise ConfigError(f"{where}: alias {key!r} is defined twice")
        targets = [t for t in re.split(r"[,\s]+", rest) if t]
        if not targets:
            raise ConfigError(f"{where}: alias {key!r} has no target")
        entries[key] = tuple(dict.fromkeys(_check_target(t, where) for t in targets))
    return Aliases(entries)


def load_aliases(path: Path | None) -> Aliases:
    """Read an aliases file; ``None`` means no aliases."""
    if path is None:
        return Aliases()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"aliases file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read aliases file {path}: {exc}") from None
    return parse_aliases(text, str(path))


@dataclass(frozen=True, slots=True)
class Mailbox:
    """A Maildir: ``ROOT/DOMAIN/USER``."""

    domain: str
    user: str

    def __str__(self) -> str:
        return f"{self.user}@{self.domain}"


@dataclass(frozen=True, slots=True)
class Expansion:
    """What one local recipient resolves to: Maildirs to write, external addresses to
    forward to, or the reply that refuses it."""

    mailboxes: tuple[Mailbox, ...] = ()
    forwards: tuple[str, ...] = ()
    error: Reply | None = None


class _Loop(Exception):
    pass


class LocalRecipients:
    """Resolves addresses of our own domains. Pure apart from ``user_exists``, which must
    answer from memory (:meth:`~hato.users.UserStore.has`): :meth:`exists` is the intake's
    RCPT check and runs on the event loop. ``hato serve`` builds one and shares it between
    that check and the Maildir courier."""

    def __init__(
        self,
        domains: Iterable[str],
        aliases: Aliases | None = None,
        recipient_delimiter: str = "+",
        *,
        user_exists: UserExists | None = None,
        postmaster: str | None = None,
    ) -> None:
        """``postmaster``: where postmaster (and abuse) go when the aliases file does not
        say: a local name or an address (an alias target)."""
        self.domains = frozenset(normalize_domain(d) for d in domains if d.strip())
        self.aliases = aliases or Aliases()
        self.delimiter = recipient_delimiter
        self.user_exists: UserExists = user_exists or (lambda _local, _domain: False)
        self.postmaster = _check_target(postmaster, "postmaster") if postmaster else None

    def is_local_domain(self, domain: str) -> bool:
        return normalize_domain(domain) in self.domains

    def _split(self, address: str) -> tuple[str, str] | None:
        local, at, domain = address.rpartition("@")
        if not at or not local:
            return None
        domain = normalize_domain(domain)
        if domain not in self.domains:
            return None
        return local.lower(), domain

    def exists(self, address: str) -> bool:
        """Does ``address`` name a user, an alias, postmaster or abuse of our domains?

        For the RCPT check (``550 5.1.1`` otherwise). Calls ``user_exists``; an exception
        from it propagates (the caller answers 451, not 550).
        """
        parts = self._split(address)
        return parts is not None and self._kind(*parts) is not None

    def _candidates(self, local: str) -> list[str]:
        names = [local]
        if self.delimiter and self.delimiter in local:
            base = local.split(self.delimiter, 1)[0]
            if base and base != local:
                names.append(base)
        return names

    def _kind(self, local: str, domain: str) -> tuple[str, str] | None:
        """("alias"|"user"|"special", name) for the first rule that matches."""
        for name in self._candidates(local):
            if self.aliases.lookup(name, domain) is not None:
                return "alias", name
            if is_mailbox_name(name) and self.user_exists(name, domain):
                return "user", name
        base = self._candidates(local)[-1]
        if base in ALWAYS_PRESENT:
            return "special", base
        return None

    def expand(self, address: str) -> Expansion:
        """Resolve one recipient of our domains (see the module docstring)."""
        parts = self._split(address)
        if parts is None:
            return Expansion(error=UNKNOWN_USER)
        mailboxes: dict[Mailbox, None] = {}
        forwards: dict[str, None] = {}
        try:
            found = self._resolve(*parts, 0, frozenset(), mailboxes, forwards, strict=True)
        except _Loop:
            return Expansion(error=ALIAS_LOOP)
        if not found:
            return Expansion(error=UNKNOWN_USER)
        if not mailboxes and not forwards:
            return Expansion(error=ALIAS_LOOP)
        return Expansion(tuple(mailboxes), tuple(forwards))

    def _resolve(
        self,
        local: str,
        domain: str,
        depth: int,
        path: frozenset[str],
        mailboxes: dict[Mailbox, None],
        forwards: dict[str, None],
        *,
        strict: bool,
    ) -> bool:
        """Add what ``local@domain`` resolves to; False if it is unknown. ``strict``:
        an unknown name is unknown (the recipient itself), otherwise (an alias target
        the operator wrote) it is a Maildir of that name."""
        if depth > MAX_DEPTH:
            raise _Loop
        kind = self._kind(local, domain)
        if kind is None:
            base = self._candidates(local)[-1]
            if strict or not is_mailbox_name(base):
                return False
            mailboxes[Mailbox(domain, base)] = None
            return True
        what, name = kind
        if what == "user":
            mailboxes[Mailbox(domain, name)] = None
            return True
        if what == "alias":
            key = f"{name}@{domain}"
            if key in path:
                return True  # a cycle: this branch adds nothing new
            targets = self.aliases.lookup(name, domain) or ()
            for target in targets:
                self._target(target, name, domain, depth, path | {key}, mailboxes, forwards)
            return True
        # postmaster or abuse without an alias or a user.
        if self.postmaster is not None:
            self._target(self.postmaster, name, domain, depth, path, mailboxes, forwards)
        elif name == "abuse":
            self._resolve("postmaster", domain, depth + 1, path, mailboxes, forwards, strict=False)
        else:
            mailboxes[Mailbox(domain, "postmaster")] = None
        return True

    def _target(
        self,
        target: str,
        parent: str,
        domain: str,
        depth: int,
        path: frozenset[str],
        mailboxes: dict[Mailbox, None],
        forwards: dict[str, None],
    ) -> None:
        if "@" in target:
            local, _, tdomain = target.rpartition("@")
            if tdomain not in self.domains:
                forwards[target] = None
                return
            local = local.lower()
        else:
            local, tdomain = target, domain
        if local == parent and tdomain == domain:
            # "root: root, ..." delivers to root's own Maildir (Postfix does the same).
            mailboxes[Mailbox(domain, self._candidates(local)[-1])] = None
            return
        self._resolve(local, tdomain, depth + 1, path, mailboxes, forwards, strict=False)
