"""Linux inotify(7) through ctypes: be told at once when a file in a directory is replaced.

``hato serve`` re-reads a few files while it runs. Polling their stamps leaves a window in
which a change is not seen; inotify closes it: the kernel queues an event the moment
``hato user add`` renames the new users file into place, before the command returns.
Only what the watchers need is here: one directory, the events that create, replace,
write or remove an entry, and the names they concern. The descriptor is non-blocking, so
the event loop can watch it with ``add_reader`` and drain it without waiting.

:func:`watch_directory` returns ``None`` where inotify cannot be had (not Linux, a
directory that does not exist, the per-user instance limit reached): callers then poll.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys

_IN_CLOSE_WRITE = 0x00000008
_IN_MOVED_FROM = 0x00000040
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_IN_DELETE = 0x00000200
_IN_DELETE_SELF = 0x00000400
_IN_MOVE_SELF = 0x00000800
_MASK = (
    _IN_CLOSE_WRITE
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE
    | _IN_DELETE_SELF
    | _IN_MOVE_SELF
)

# struct inotify_event: int wd; uint32_t mask, cookie, len; char name[len] (NUL padded).
_EVENT = struct.Struct("iIII")


class DirectoryWatch:
    """An inotify descriptor watching one directory."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def changed(self) -> set[str]:
        """Drain the pending events: the names of the entries they concern, ``""`` for
        the directory itself or a queue overflow (anything may have changed). Never
        blocks; an empty set when nothing happened."""
        names: set[str] = set()
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return names
            if not data:
                return names
            offset = 0
            while offset + _EVENT.size <= len(data):
                _wd, _mask, _cookie, length = _EVENT.unpack_from(data, offset)
                start = offset + _EVENT.size
                names.add(os.fsdecode(data[start : start + length].split(b"\0", 1)[0]))
                offset = start + length

    def close(self) -> None:
        os.close(self.fd)


def watch_directory(directory: str | os.PathLike[str]) -> DirectoryWatch | None:
    """Watch ``directory`` for entries created, replaced, written or removed; ``None``
    if inotify is not available here. Looks the path up: call it off the event loop."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        init, add = libc.inotify_init1, libc.inotify_add_watch
    except (OSError, AttributeError):
        return None
    fd = init(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        return None
    if add(fd, os.fsencode(directory), _MASK) < 0:
        os.close(fd)
        return None
    return DirectoryWatch(fd)
