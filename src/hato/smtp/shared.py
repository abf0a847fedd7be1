"""Connection counts shared by the intake processes of one supervisor.

The per-client connection limit must hold across the processes that share a listening
socket: the kernel spreads one client's connections over all of them. The supervisor
creates one :class:`SharedCounts` before it forks; it is an anonymous shared memory
table (a hash of the key, then one counter per process) guarded by a POSIX record lock
(``lockf``, which Linux releases when its holder dies, so a child killed with the lock
held blocks nobody). Each process writes only its own counter of a key, so a restarted
child zeroes its column (:meth:`attach`) and what a killed child held is forgotten.

A full table (more distinct clients than slots at once) fails open: the connection is
admitted and only the process's own limit applies.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import struct
import tempfile

__all__ = ["SharedCounts"]

_PROBES = 64


class SharedCounts:
    """Counts per key, summed over ``processes`` columns; one column per process."""

    def __init__(self, processes: int, slots: int = 16384) -> None:
        self.processes = processes
        self.slots = slots
        self._entry = struct.Struct(f"<Q{processes}i")
        self._map = mmap.mmap(-1, self._entry.size * slots, flags=mmap.MAP_SHARED)
        self._lock_file = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as we do
        self.column = 0

    def close(self) -> None:
        self._lock_file.close()
        self._map.close()

    def __enter__(self) -> SharedCounts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def attach(self, column: int) -> None:
        """In a child: count in ``column`` from now on, forgetting what it held before
        (a previous child in the same place that died)."""
        self.column = column
        with self._locked():
            for slot in range(self.slots):
                offset = slot * self._entry.size
                values = list(self._entry.unpack_from(self._map, offset))
                if values[0] and values[1 + column]:
                    values[1 + column] = 0
                    self._entry.pack_into(self._map, offset, *values)

    def acquire(self, key: str, limit: int) -> bool:
        """Add one to ``key`` unless its total is already ``limit``; True if added (or if
        the table is full: failing open)."""
        with self._locked():
            found = self._find(key)
            if found is None:
                return True
            offset, values = found
            if sum(values[1:]) >= limit:
                return False
            values[1 + self.column] += 1
            self._entry.pack_into(self._map, offset, *values)
            return True

    def release(self, key: str) -> None:
        """Take back one :meth:`acquire` of ``key`` by this process."""
        with self._locked():
            found = self._find(key, create=False)
            if found is None:
                return
            offset, values = found
            if values[1 + self.column] > 0:
                values[1 + self.column] -= 1
                self._entry.pack_into(self._map, offset, *values)

    def total(self, key: str) -> int:
        with self._locked():
            found = self._find(key, create=False)
            return 0 if found is None else sum(found[1][1:])

    def _find(self, key: str, *, create: bool = True) -> tuple[int, list[int]] | None:
        """The offset and values of ``key``'s entry: an existing one, else (``create``) a
        free or emptied one along the probe sequence."""
        digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
        digest |= 1  # 0 marks a never used slot
        start = digest % self.slots
        reusable: int | None = None
        for probe in range(_PROBES):
            offset = ((start + probe) % self.slots) * self._entry.size
            values = list(self._entry.unpack_from(self._map, offset))
            if values[0] == digest:
                return offset, values
            if values[0] == 0:
                if reusable is None:
                    reusable = offset
                break  # the key is not further along
            if reusable is None and not any(values[1:]):
                reusable = offset
        if not create or reusable is None:
            return None
        fresh = [digest] + [0] * self.processes
        return reusable, fresh

    def _locked(self) -> _Lock:
        return _Lock(self._lock_file.fileno())


class _Lock:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)
