"""The relay server's SASL users: argon2id hashes and sender grants in one JSON file.

What ``saslpasswd2`` and Postfix's ``smtpd_sender_login_maps`` are in the guide. The file
(default ``DATA_DIR/users.json``, mode 0600) is written by ``hato user`` and read by
``hato serve``, which picks up a new version without a restart::

    {"version": 1,
     "users": {"postfix@dbmx.net": {"hash": "$argon2id$v=19$…", "allow": [], "only": false}}}

User names are ``name@domain`` (the guide's ``postfix@dbmx.net``) or bare names; they are
compared in lower case, their domains (and those of grants and sender addresses) in
:func:`~hato.message.normalize_domain`'s form, so ``x@Bücher.example`` is
``x@xn--bcher-kva.example``. Sender ownership, checked at MAIL FROM after AUTH:

* a ``name@domain`` user owns every address of its own domain (``postfix@dbmx.net`` may
  send as ``noreply@dbmx.net``); a bare name owns nothing by default;
* ``allow`` grants more: an address (``ops@other.example``) or a whole domain
  (``@other.example``);
* ``only`` drops the own-domain default, so the user owns exactly its ``allow`` list.

Writes are atomic (temporary file, fsync, rename) and serialised by a lock file, so the
server never reads half a file and two ``hato user`` commands never lose each other's
change. Password checks run in a thread (argon2 is slow on purpose) and take the same
time whether the user exists or not.

``hato serve`` answers from an in-memory snapshot (:class:`UserStore`) and never touches
the file on the event loop. The snapshot is brought up to date in a worker thread:

* by each AUTH, before the password is checked, so a user just added can log in at once;
* by :class:`UserWatcher`, as soon as the file is replaced (inotify on Linux) and every two
  seconds in any case (as the TLS certificates are).

The RCPT check of our own domains runs synchronously inside the sans-IO protocol
(:meth:`~hato.smtp.policy.Policy.check_recipient`), so it can neither read the file nor
wait for a thread. It answers from the snapshot and asks the watcher one question that
needs no I/O: is a change pending, seen but not yet read? A known recipient is accepted;
an unknown one is refused ``550 5.1.1``, or deferred ``451 4.3.0`` while a change is
pending (the new file may name it). Asking a thread for a stat at each session's start
instead would not do: one round trip to a worker thread takes longer than a client's
EHLO, MAIL and RCPT on loopback, so nearly every unknown name would get ``451``.

Why a user added with ``hato user add`` receives mail at once: the rename that installs
the new file queues an inotify event before the command returns, so before any client
can connect afterwards. The event loop reads the event (a read on the inotify descriptor,
not on the file) in the same or an earlier iteration than it accepts that connection,
marks the change pending and starts the re-read, which takes a fraction of a millisecond.
A client that still reaches RCPT first gets ``451`` and retries, never a false ``550``.
Without inotify (not Linux, or a users directory that did not exist when ``hato serve``
started) a change is seen within the two-second poll, and an RCPT in between is answered
from the previous snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import Argon2Error, InvalidHashError

from hato.errors import ConfigError, HatoError
from hato.inotify import DirectoryWatch, watch_directory
from hato.message import normalize_domain

FORMAT_VERSION = 1

_debug = logging.getLogger(__name__)

# Printable, no spaces, no "@" in the local part; the domain as a host name.
_NAME_RE = re.compile(
    r"^[^\s@:\x00-\x1f\x7f]{1,64}(?:@[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*)?$"
)
_DOMAIN_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*$")
_LOCAL_RE = re.compile(r"^[^\s@\x00-\x1f\x7f<>]{1,64}$")
MAX_PASSWORD = 1024


class UserError(HatoError):
    """A ``hato user`` request that cannot be done (unknown user, bad name, …)."""


def _normalize_address(text: str) -> str:
    """``local@domain`` in lower case with the domain in its one comparable form."""
    local, at, domain = text.strip().lower().rpartition("@")
    return f"{local}{at}{normalize_domain(domain)}"


def normalize_name(name: str) -> str:
    """The stored form of a user name; raises :class:`UserError` if it is not one."""
    text = _normalize_address(name)
    if not _NAME_RE.fullmatch(text) or len(text) > 255:
        raise UserError(f"invalid user name {name!r} (use name@domain or a bare name)")
    return text


def normalize_grant(grant: str) -> str:
    """``ops@x.example`` or ``@x.example`` in lower case; raises :class:`UserError`."""
    text = _normalize_address(grant)
    local, at, domain = text.rpartition("@")
    if not at or not _DOMAIN_RE.fullmatch(domain) or (local and not _LOCAL_RE.fullmatch(local)):
        raise UserError(f"invalid sender grant {grant!r} (use addr@domain or @domain)")
    return text


def check_password(password: str) -> str:
    """Refuse passwords no SASL client could send; returns the password unchanged."""
    if not password:
        raise UserError("empty password")
    if len(password) > MAX_PASSWORD:
        raise UserError(f"password longer than {MAX_PASSWORD} characters")
    if any(c in password for c in "\0\r\n"):
        raise UserError("password contains NUL, CR or LF")
    return password


@dataclass(frozen=True, slots=True)
class User:
    """One SASL account."""

    name: str
    password_hash: str = field(repr=False)
    allow: tuple[str, ...] = ()
    only: bool = False

    @property
    def domain(self) -> str:
        """The domain of a ``name@domain`` user; ``""`` for a bare name."""
        return self.name.rpartition("@")[2] if "@" in self.name else ""

    def owns(self, address: str) -> bool:
        """May this user use ``address`` as its envelope sender?"""
        text = _normalize_address(address)
        domain = text.rpartition("@")[2]
        if not self.only and self.domain and domain == self.domain:
            return True
        return any(g == text or (g.startswith("@") and g[1:] == domain) for g in self.allow)

    def describe_senders(self) -> str:
        """What ``hato user list`` prints for the senders this user owns."""
        parts = [] if self.only or not self.domain else [f"@{self.domain}"]
        parts += [g for g in self.allow if g not in parts]
        return ", ".join(parts) or "(none)"

    def to_json(self) -> dict[str, Any]:
        return {"hash": self.password_hash, "allow": list(self.allow), "only": self.only}


def _parse(text: str, path: Path) -> dict[str, User]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"user file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("users"), dict):
        raise ConfigError(f'user file {path} has no "users" object')
    if data.get("version", FORMAT_VERSION) != FORMAT_VERSION:
        raise ConfigError(f"user file {path} has unknown version {data.get('version')!r}")
    users: dict[str, User] = {}
    for raw_name, entry in data["users"].items():
        try:
            name = normalize_name(str(raw_name))
            if not isinstance(entry, dict) or not isinstance(entry.get("hash"), str):
                raise UserError(f"user {raw_name!r} has no hash")
            allow = entry.get("allow", [])
            if not isinstance(allow, list):
                raise UserError(f'user {raw_name!r}: "allow" is not a list')
            users[name] = User(
                name,
                entry["hash"],
                tuple(normalize_grant(str(g)) for g in allow),
                bool(entry.get("only", False)),
            )
        except UserError as exc:
            raise ConfigError(f"user file {path}: {exc}") from exc
    return users


def _dump(users: Mapping[str, User]) -> str:
    body = {"version": FORMAT_VERSION, "users": {n: users[n].to_json() for n in sorted(users)}}
    return json.dumps(body, indent=2, ensure_ascii=False) + "\n"


# Identity of a file version: a rename makes a new inode even within one mtime tick.
_Stamp = tuple[int, int, int]


class UserStore:
    """The user file: a snapshot for the server (:meth:`refresh`, :meth:`get`,
    :meth:`sender_allowed`) and atomic edits for the CLI (:meth:`add`, …).

    ``hasher`` sets the argon2id parameters of new hashes (argon2-cffi's RFC 9106
    low-memory profile by default); verification follows each stored hash's own.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, hasher: PasswordHasher | None = None
    ) -> None:
        self.path = Path(path)
        self.hasher = hasher if hasher is not None else PasswordHasher()
        self._users: dict[str, User] = {}
        self._stamp: _Stamp | None = None
        self._refresh_lock = threading.Lock()
        self._dummy: str | None = None
        self.reload_errors = 0

    # Reading ---------------------------------------------------------------------

    def _file_stamp(self) -> _Stamp | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read user file {self.path}: {exc.strerror}") from exc
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> tuple[dict[str, User], _Stamp | None]:
        stamp = self._file_stamp()
        if stamp is None:
            return {}, None
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}, None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read user file {self.path}: {exc}") from exc
        return _parse(text, self.path), stamp

    def load(self) -> UserStore:
        """Read the file now (a missing file is an empty store). Raises
        :class:`ConfigError` if it is unreadable or malformed: a start-up error."""
        with self._refresh_lock:
            self._users, self._stamp = self._read()
        return self

    def refresh(self) -> bool:
        """Re-read the file if it changed since the last read; ``True`` if it did.

        A file that became unreadable or malformed keeps the previous snapshot (the
        server keeps working with the users it knew) and is logged.
        """
        with self._refresh_lock:
            try:
                stamp = self._file_stamp()
                if stamp == self._stamp:
                    return False
                self._users, self._stamp = self._read()
            except ConfigError as exc:
                self.reload_errors += 1
                _debug.warning("keeping the previous users: %s", exc)
                return False
            return True

    def get(self, name: str) -> User | None:
        """The user of that name in the current snapshot (no file access)."""
        try:
            return self._users.get(normalize_name(name))
        except UserError:
            return None

    def users(self) -> list[User]:
        """Every user of the current snapshot, by name."""
        return [self._users[n] for n in sorted(self._users)]

    def __len__(self) -> int:
        return len(self._users)

    def has(self, local: str, domain: str) -> bool:
        """The :class:`~hato.aliases.LocalRecipients` hook: is ``local@domain`` a user of
        the current snapshot? No file access: the RCPT check calls it on the event loop."""
        return self.get(f"{local}@{domain}") is not None

    def sender_allowed(self, user: str, address: str) -> bool:
        """The :class:`~hato.smtp.policy.Policy` hook: may ``user`` (authenticated) send as
        ``address``? Uses the snapshot, which AUTH refreshed moments before."""
        found = self.get(user)
        return found is not None and found.owns(address)

    # Passwords -------------------------------------------------------------------

    def hash_password(self, password: str) -> str:
        try:
            return self.hasher.hash(check_password(password))
        except Argon2Error as exc:
            raise UserError(f"cannot hash the password: {exc}") from exc

    def _dummy_hash(self) -> str:
        # Built with the same parameters as real hashes, so that an unknown user costs
        # exactly what a known one does.
        if self._dummy is None:
            self._dummy = self.hasher.hash(os.urandom(16).hex())
        return self._dummy

    def verify(self, name: str, password: str) -> User | None:
        """Check a password (slow: call it from a thread). The same work is done for an
        unknown user, against a dummy hash, so timing does not tell which names exist."""
        user = self.get(name)
        stored = user.password_hash if user is not None else self._dummy_hash()
        ok: bool
        try:
            ok = self.hasher.verify(stored, password)
        except (InvalidHashError, ValueError):  # also UnsupportedParametersError
            _debug.warning("user %s has a malformed password hash", name)
            ok = False
        except Argon2Error:  # VerifyMismatchError and VerificationError
            ok = False
        return user if ok and user is not None else None

    # Editing (hato user) ---------------------------------------------------------

    @contextlib.contextmanager
    def _editing(self) -> Iterator[dict[str, User]]:
        """Lock, read the current file, let the caller change the dict, write it back."""
        directory = self.path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            lock = os.open(directory / f".{self.path.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot write user file {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            users, _stamp = self._read()
            yield users
            self._write(users)
            self._users = users
            self._stamp = self._file_stamp()
        finally:
            os.close(lock)

    def _write(self, users: Mapping[str, User]) -> None:
        data = _dump(users).encode("utf-8")
        directory = self.path.parent
        tmp = ""
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(fh.fileno(), 0o600)
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            tmp = ""
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise ConfigError(f"cannot write user file {self.path}: {exc.strerror}") from exc
        finally:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def add(
        self, name: str, password: str, *, allow: Iterable[str] = (), only: bool = False
    ) -> User:
        """Create a user; :class:`UserError` if it exists."""
        key = normalize_name(name)
        grants = tuple(dict.fromkeys(normalize_grant(g) for g in allow))
        if only and not grants:
            raise UserError("--only needs at least one sender address or @domain")
        password_hash = self.hash_password(password)
        with self._editing() as users:
            if key in users:
                raise UserError(f"user {key} exists (use hato user passwd)")
            user = users[key] = User(key, password_hash, grants, only)
        return user

    def set_password(self, name: str, password: str) -> User:
        """Replace a user's password; :class:`UserError` if there is no such user."""
        key = normalize_name(name)
        password_hash = self.hash_password(password)
        with self._editing() as users:
            if key not in users:
                raise UserError(f"no such user: {key}")
            user = users[key] = replace(users[key], password_hash=password_hash)
        return user

    def set_senders(
        self,
        name: str,
        *,
        allow: Iterable[str] = (),
        only: Iterable[str] = (),
        revoke: Iterable[str] = (),
        reset: bool = False,
    ) -> User:
        """Change a user's sender grants: ``allow`` adds, ``only`` replaces them and drops
        the own-domain default, ``revoke`` removes, ``reset`` goes back to the default."""
        key = normalize_name(name)
        added = [normalize_grant(g) for g in allow]
        exact = [normalize_grant(g) for g in only]
        removed = {normalize_grant(g) for g in revoke}
        with self._editing() as users:
            if key not in users:
                raise UserError(f"no such user: {key}")
            user = users[key]
            grants = [] if reset or exact else list(user.allow)
            flag = bool(exact) or (user.only and not reset)
            grants = [g for g in dict.fromkeys([*grants, *exact, *added]) if g not in removed]
            if flag and not grants:
                raise UserError(f"user {key} would own no sender address (use --reset)")
            user = users[key] = replace(user, allow=tuple(grants), only=flag)
        return user

    def remove(self, name: str) -> None:
        """Delete a user; :class:`UserError` if there is no such user."""
        key = normalize_name(name)
        with self._editing() as users:
            if key not in users:
                raise UserError(f"no such user: {key}")
            del users[key]


class UserWatcher:
    """Keeps a :class:`UserStore`'s snapshot current, off the event loop.

    :meth:`run` re-reads the file in a worker thread when inotify says it changed (the
    event loop watches the descriptor) and every ``interval`` seconds; :meth:`pending`
    tells the RCPT check whether a change was seen that the snapshot does not hold yet.
    See the module docstring for why.
    """

    def __init__(self, store: UserStore, *, interval: float = 2.0) -> None:
        self.store = store
        self.interval = interval
        self.notified = False  # inotify is watching the file's directory
        self._seen = 0  # changes notified
        self._read = 0  # changes the snapshot holds
        self._wake = asyncio.Event()

    def pending(self) -> bool:
        """Was a change of the file notified that the snapshot does not hold yet?"""
        return self._seen > self._read

    def _on_event(self, watch: DirectoryWatch) -> None:
        names = watch.changed()
        if self.store.path.name in names or "" in names:
            self._seen += 1
            self._wake.set()

    async def check(self) -> None:
        """Re-read the file in a worker thread if it changed."""
        seen = self._seen
        self._wake.clear()
        await asyncio.to_thread(self.store.refresh)
        self._read = seen

    async def run(self) -> None:
        """Watch and re-read until cancelled (:meth:`UserStore.refresh` keeps the
        previous snapshot when the file is broken, so nothing here ends on its own)."""
        loop = asyncio.get_running_loop()
        watch = await asyncio.to_thread(watch_directory, self.store.path.parent)
        if watch is not None:
            loop.add_reader(watch.fd, self._on_event, watch)
            self.notified = True
        try:
            while True:
                await self.check()  # the first also covers changes made before the watch
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.interval):
                        await self._wake.wait()
        finally:
            if watch is not None:
                loop.remove_reader(watch.fd)
                watch.close()
                self.notified = False


class UserAuthenticator:
    """The :class:`~hato.smtp.auth.Authenticator` of the relay server, over a
    :class:`UserStore`.

    Each check re-reads the user file if it changed, then verifies in a worker thread
    (at most ``max_concurrent`` at once: each argon2 verification takes tens of MiB of
    memory, and a flood of AUTH attempts must not take the host's). Proxy authorisation
    is not supported: a PLAIN authzid other than empty or the user itself is refused,
    after the same work as any other attempt.
    """

    def __init__(self, store: UserStore, *, max_concurrent: int = 4) -> None:
        self.store = store
        self._slots = asyncio.Semaphore(max_concurrent)

    def _check(self, username: str, password: str, authzid: str) -> str | None:
        self.store.refresh()
        # An over-long password cannot be a stored one; it still costs the full check.
        too_long = len(password) > MAX_PASSWORD
        user = self.store.verify(username, password[:MAX_PASSWORD])
        if user is None or too_long:
            return None
        if authzid:
            try:
                if normalize_name(authzid) != user.name:
                    return None
            except UserError:
                return None
        return user.name

    async def authenticate(self, username: str, password: str, *, authzid: str = "") -> str | None:
        async with self._slots:
            return await asyncio.to_thread(self._check, username, password, authzid)
