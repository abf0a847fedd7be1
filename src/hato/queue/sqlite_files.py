"""The files beside a SQLite spool: its existence marker and its lease owners' lock files.

``queue.db.hato``
    Written once, when the spool is created (or first opened by a Hato that knows
    about it): ``hato queue <id>``, the id also kept inside the database. It says that
    a queue existed here, so a ``queue.db`` that is later missing, empty, or another
    queue's file is refused instead of being silently replaced by an empty queue. Every
    open queue holds a shared ``flock`` on it; ``hato queue check --repair`` takes it
    exclusively, so it never swaps the file under a running process.

``queue.db.owners/<owner>.lock``
    One per lease owner (a worker) in this process, created and ``flock``-ed before the
    owner's first claim and held until the queue closes. The kernel drops the lock when
    the process ends, however it ends: killed, crashed, or a zombie its parent has not
    reaped. Start-up recovery tries each lease owner's lock without blocking; if it gets
    it, the owner is gone and its leases come back at once. Unlike ``kill(pid, 0)`` this
    cannot mistake a zombie, or another process that got the same pid, for the owner.
    (A child forked without ``exec`` inherits the lock and keeps the owner alive while
    it runs; Hato does not fork so.)

``queue.db.repairing``
    Present only while a repair swaps the files; names the repaired copy. An open finds
    it and refuses; the next ``--repair`` finishes the swap.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
from urllib.parse import quote

from hato.errors import QueueDamaged, QueueError


def marker_path(path: str) -> str:
    return path + ".hato"


def owners_dir(path: str) -> str:
    return path + ".owners"


def repair_note_path(path: str) -> str:
    return path + ".repairing"


def new_queue_id() -> str:
    return secrets.token_hex(8)


def read_marker(path: str) -> str | None:
    """The queue id the marker beside ``path`` names; ``None`` without a marker, ``""``
    for a marker whose writing was cut short."""
    try:
        with open(marker_path(path), encoding="ascii", errors="replace") as f:
            text = f.read(200)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise QueueError(f"cannot read {marker_path(path)}: {exc}") from exc
    parts = text.split()
    return parts[2] if len(parts) >= 3 and parts[:2] == ["hato", "queue"] else ""


def write_marker(path: str, queue_id: str, *, fsync: bool) -> None:
    """Create the marker (never replace one: it is also the lock ``repair`` takes)."""
    try:
        fd = os.open(marker_path(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.write(fd, f"hato queue {queue_id}\n".encode())
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def refuse_without_database(path: str) -> None:
    """Refuse to start an empty queue where the marker says a queue existed."""
    if os.path.exists(repair_note_path(path)):
        raise QueueDamaged(
            f"a repair of the queue database {path} was interrupted;"
            " run hato queue check --repair to finish it"
        )
    if not read_marker(path):
        return
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        state = "missing"
    else:
        if size > 0:
            return
        state = "empty (0 bytes)"
    raise QueueDamaged(
        f"the queue database {path} is {state}, but a queue existed there"
        f" ({marker_path(path)}): restore it from a backup, or delete {marker_path(path)}"
        " to start with an empty queue"
    )


def check_identity(path: str, queue_id: str) -> None:
    """Refuse another queue's file in this one's place (the marker names the queue)."""
    expected = read_marker(path)
    if expected and expected != queue_id:
        raise QueueDamaged(
            f"the queue database {path} is queue {queue_id}, but {marker_path(path)} says"
            f" queue {expected} was there: if it is another queue's file, put the right one"
            f" back (or delete {marker_path(path)} to adopt it); if it is this queue's,"
            " damaged, run hato queue check --repair"
        )


class SpoolLock:
    """The shared (open queues) or exclusive (repair) ``flock`` on the marker."""

    def __init__(self, path: str, *, exclusive: bool) -> None:
        self._fd: int | None = None
        try:
            fd = os.open(marker_path(path), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise QueueError(f"cannot open {marker_path(path)}: {exc}") from exc
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if exclusive:
                raise QueueError(
                    f"the queue database {path} is in use (hato serve, hato worker or"
                    " another hato queue command): stop them first"
                ) from None
            raise QueueError(
                f"the queue database {path} is being repaired (hato queue check --repair);"
                " start again when it is done"
            ) from None
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor drops the lock


def _lock_name(owner: str) -> str:
    name = quote(owner, safe="@-_.")
    if len(name) > 180:  # file names stop at 255 bytes
        name = name[:100] + "-" + hashlib.sha256(owner.encode()).hexdigest()[:16]
    return name + ".lock"


class OwnerLocks:
    """The lock files of the lease owners of one spool (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self._dir = owners_dir(path)
        self._held: dict[str, int] = {}

    def _file(self, owner: str) -> str:
        return os.path.join(self._dir, _lock_name(owner))

    def hold(self, owner: str) -> None:
        """Take ``owner``'s lock for the life of this process (before its first claim)."""
        if owner in self._held:
            return
        try:
            os.makedirs(self._dir, mode=0o700, exist_ok=True)
            fd = os.open(self._file(owner), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise QueueError(f"cannot create the lease owner's lock file: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise QueueError(
                f"lease owner {owner!r} is in use by another process; owners must be unique"
            ) from None
        self._held[owner] = fd

    def is_gone(self, owner: str) -> bool:
        """True when no process holds ``owner``'s lock: it ended, or never took one."""
        if owner in self._held:
            return False
        try:
            fd = os.open(self._file(owner), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return True
        except OSError as exc:
            # Cannot tell (permissions): keep the lease; it still expires on its own.
            return exc.errno == errno.ENAMETOOLONG
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        else:
            # A dead owner's file: nobody will take that owner name again.
            with contextlib.suppress(OSError):
                os.unlink(self._file(owner))
            return True
        finally:
            os.close(fd)

    def sweep(self) -> None:
        """Delete the lock files of owners that are gone (crashed processes leave them)."""
        try:
            names = os.listdir(self._dir)
        except OSError:
            return
        for name in names:
            if not name.endswith(".lock") or name in {_lock_name(o) for o in self._held}:
                continue
            file = os.path.join(self._dir, name)
            try:
                fd = os.open(file, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(file)
            except OSError:
                pass
            finally:
                os.close(fd)

    def release_all(self) -> None:
        """Give up every owner of this process (the queue closes; its leases are over)."""
        held, self._held = self._held, {}
        for owner, fd in held.items():
            with contextlib.suppress(OSError):
                os.unlink(self._file(owner))
            os.close(fd)
