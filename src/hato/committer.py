"""The committer: intake processes hand accepted mail to the delivery process to commit.

With ``HATO_PROCESSES`` above 1 and ``HATO_INTAKE_COMMIT=delivery`` (the default) the
intake processes do not write the queue. Each accepted message goes over a Unix stream
socket to the one delivery process, which commits it (``Worker.enqueue_fresh``: leased to
its worker in the same commit and delivered without a claim; ``Queue.enqueue`` for held
mail) and answers with the queue id once the commit returned, that is once it is on
stable storage. The intake sends its 250 only after that answer, so one group commit
(one fsync) serves the sessions of every intake process.

The supervisor binds the listening socket before it forks (an abstract name with its
pid) and keeps it: while the delivery process restarts, requests wait in its backlog.
Only a peer of our own uid is served (``SO_PEERCRED``).

Frames, both ways, one per request and one per answer::

    u32 length of what follows | u64 request id | u8 kind | u32 header length
    | header (JSON, ASCII) | body (the message bytes of a commit, else empty)

``COMMIT`` carries the envelope (every field, by name), the ``accepted`` events and
``held``; ``UNSENT`` asks for the unsent messages (intake's flow control). The answer is
``OK`` (``{"id": ...}`` or ``{"unsent": n}``) or ``ERROR`` (``{"error": class name,
"message": text}``), which the intake raises again as the same class of
:mod:`hato.errors`, so its SMTP replies are those of a local queue. Request ids let one
connection carry every concurrent session of an intake process.

Nothing acknowledged is lost: a committer that dies before answering leaves the intake
with :class:`~hato.errors.QueueError` (451 4.3.0, the client sends again); if it died
after its commit the message is queued twice, never lost. The next message connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from hato.errors import HatoError, MessageNotFound, QueueDamaged, QueueError, QueueFullError
from hato.events import DeliveryEvent
from hato.message import Envelope

__all__ = [
    "COMMIT",
    "ERROR",
    "OK",
    "UNSENT",
    "Commit",
    "CommitterClient",
    "CommitterServer",
    "Frame",
    "FrameError",
    "bind_committer",
    "decode_frame",
    "encode_frame",
    "envelope_from_json",
    "envelope_to_json",
    "error_from_json",
    "error_to_json",
]

_debug = logging.getLogger(__name__)

COMMIT = 1
UNSENT = 2
OK = 3
ERROR = 4
_KINDS = {COMMIT, UNSENT, OK, ERROR}

_LENGTH = struct.Struct("!I")
_HEAD = struct.Struct("!QBI")  # request id, kind, header length
# A bound on one frame, against a peer gone mad: far above any message size limit.
MAX_FRAME = 1 << 31
# How long an intake waits for the committer's answer before it answers 451 (the
# message may still be committed: then the client's retry makes a duplicate).
COMMIT_TIMEOUT = 120.0
CONNECT_TIMEOUT = 5.0
# How long a stopping committer waits for the commits it is running.
DRAIN_TIMEOUT = 10.0

# The delivery process's commit: envelope, bytes, the ``accepted`` events, held?
Commit = Callable[[Envelope, bytes, Sequence[DeliveryEvent], bool], Awaitable[str]]
Unsent = Callable[[], Awaitable[int]]

# Errors carried back by name and raised again as the same class in the intake; anything
# else arrives as QueueError (451 4.3.0), which is what a broken queue answers.
_ERRORS: dict[str, type[HatoError]] = {
    cls.__name__: cls
    for cls in (QueueFullError, QueueDamaged, MessageNotFound, QueueError, HatoError)
}


class FrameError(ValueError):
    """A frame or its header that does not parse (never leaves this module's peers)."""


# --- the pure part: frames, envelopes, errors ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    request_id: int
    kind: int
    header: dict[str, Any]
    body: bytes = b""


def encode_frame(request_id: int, kind: int, header: dict[str, Any], body: bytes = b"") -> bytes:
    """The frame's bytes, its length prefix first (the body is copied once; the sockets
    write :func:`frame_parts` instead)."""
    return b"".join(frame_parts(request_id, kind, header, body))


def frame_parts(
    request_id: int, kind: int, header: dict[str, Any], body: bytes = b""
) -> tuple[bytes, bytes]:
    """The frame as (prefix and header, body): two writes, no copy of the message."""
    text = json.dumps(header, separators=(",", ":")).encode("ascii")
    size = _HEAD.size + len(text) + len(body)
    if size > MAX_FRAME:
        raise FrameError(f"frame of {size} bytes is too large")
    return _LENGTH.pack(size) + _HEAD.pack(request_id, kind, len(text)) + text, body


def decode_frame(payload: bytes) -> Frame:
    """A frame from what followed its length prefix. Raises :class:`FrameError`."""
    if len(payload) < _HEAD.size:
        raise FrameError("frame shorter than its head")
    request_id, kind, length = _HEAD.unpack_from(payload)
    if kind not in _KINDS:
        raise FrameError(f"unknown frame kind {kind}")
    end = _HEAD.size + length
    if end > len(payload):
        raise FrameError("header longer than the frame")
    try:
        header = json.loads(payload[_HEAD.size : end].decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FrameError(f"header does not parse: {exc}") from exc
    if not isinstance(header, dict):
        raise FrameError("header is not an object")
    return Frame(request_id, kind, header, bytes(payload[end:]))


def envelope_to_json(envelope: Envelope) -> dict[str, Any]:
    """Every field of the envelope, by name (``tests/unit/test_committer.py`` checks that
    none is missing)."""
    return {
        "sender": envelope.sender,
        "recipients": list(envelope.recipients),
        "client_address": envelope.client_address,
        "client_helo": envelope.client_helo,
        "auth_user": envelope.auth_user,
        "smtputf8": envelope.smtputf8,
        "body_8bit": envelope.body_8bit,
        "meta": dict(envelope.meta),
    }


_ENVELOPE_TYPES: dict[str, type] = {
    "sender": str,
    "recipients": list,
    "client_address": str,
    "client_helo": str,
    "auth_user": str,
    "smtputf8": bool,
    "body_8bit": bool,
    "meta": dict,
}


def envelope_from_json(data: Any) -> Envelope:
    """The envelope :func:`envelope_to_json` wrote. Raises :class:`FrameError`."""
    if not isinstance(data, dict):
        raise FrameError("envelope is not an object")
    values: dict[str, Any] = {}
    for f in fields(Envelope):
        kind = _ENVELOPE_TYPES[f.name]
        value = data.get(f.name)
        if not isinstance(value, kind):
            raise FrameError(f"envelope field {f.name!r} missing or not {kind.__name__}")
        values[f.name] = value
    if not all(isinstance(r, str) for r in values["recipients"]):
        raise FrameError("envelope recipients are not strings")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in values["meta"].items()):
        raise FrameError("envelope meta is not strings")
    return Envelope(**values)


def commit_header(
    envelope: Envelope, events: Sequence[DeliveryEvent], held: bool
) -> dict[str, Any]:
    return {
        "envelope": envelope_to_json(envelope),
        "events": [event.to_json() for event in events],
        "held": held,
    }


def read_commit(header: dict[str, Any]) -> tuple[Envelope, list[DeliveryEvent], bool]:
    """The envelope, events and ``held`` of a ``COMMIT`` header. Raises FrameError."""
    envelope = envelope_from_json(header.get("envelope"))
    events = header.get("events")
    held = header.get("held")
    if not isinstance(events, list) or not isinstance(held, bool):
        raise FrameError("commit without events or held")
    try:
        return envelope, [DeliveryEvent.from_json(e) for e in events], held
    except (TypeError, ValueError) as exc:
        raise FrameError(f"bad event: {exc}") from exc


def error_to_json(exc: BaseException) -> dict[str, str]:
    """The answer that carries ``exc`` back: its nearest class the intake knows."""
    for cls in type(exc).__mro__:
        if cls.__name__ in _ERRORS and isinstance(exc, _ERRORS[cls.__name__]):
            return {"error": cls.__name__, "message": str(exc)}
    return {"error": "QueueError", "message": f"{type(exc).__name__}: {exc}"}


def error_from_json(header: dict[str, Any]) -> HatoError:
    """The exception of an ``ERROR`` answer, of the class it names."""
    cls = _ERRORS.get(str(header.get("error")), QueueError)
    return cls(str(header.get("message", "")))


def bind_committer(backlog: int = 1024) -> tuple[socket.socket, str]:
    """The committer's listening socket (an abstract name, so nothing is left on disk)
    and the address intake processes connect to."""
    address = f"\0hato-committer-{os.getpid()}-{os.urandom(4).hex()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, address


async def _read_frame(reader: asyncio.StreamReader) -> Frame | None:
    """The next frame, or None at a clean end of the stream."""
    try:
        prefix = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise FrameError("stream ended inside a frame") from exc
        return None
    (size,) = _LENGTH.unpack(prefix)
    if size > MAX_FRAME:
        raise FrameError(f"frame of {size} bytes is too large")
    try:
        return decode_frame(await reader.readexactly(size))
    except asyncio.IncompleteReadError as exc:
        raise FrameError("stream ended inside a frame") from exc


# --- the delivery process's side ----------------------------------------------------------


class CommitterServer:
    """Serves the intake processes on the supervisor's listening socket: each ``COMMIT``
    through ``commit``, each ``UNSENT`` through ``unsent``, concurrently."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        commit: Commit,
        unsent: Unsent,
        drain_timeout: float = DRAIN_TIMEOUT,
    ) -> None:
        self.sock = sock
        self.drain_timeout = drain_timeout
        self.commit = commit
        self.unsent = unsent
        self.server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._requests: set[asyncio.Task[None]] = set()
        self.commits = 0  # answered with an id (for tests and metrics)

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, sock=self.sock)

    def close(self) -> None:
        """Take no new connection (the supervisor's socket stays open: a next delivery
        process takes them); the connections keep being served until :meth:`aclose`."""
        if self.server is not None:
            self.server.close()

    async def aclose(self) -> None:
        """Finish the commits that run (at most ``drain_timeout`` seconds), then hang up."""
        self.close()
        if self._requests:
            await asyncio.wait(set(self._requests), timeout=self.drain_timeout)
        for task in self._requests:
            task.cancel()
        await asyncio.gather(*self._requests, return_exceptions=True)
        for writer in self._connections:  # their readers see the end and return
            writer.close()
        await asyncio.sleep(0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        write_lock = asyncio.Lock()
        try:
            if not _same_user(writer.get_extra_info("socket")):
                _debug.warning("committer: refused a peer of another user")
                return
            while True:
                frame = await _read_frame(reader)
                if frame is None:
                    return
                request = asyncio.create_task(self._answer(frame, writer, write_lock))
                self._requests.add(request)
                request.add_done_callback(self._requests.discard)
        except (FrameError, OSError) as exc:
            _debug.warning("committer: dropped a connection: %s", exc)
        finally:
            self._connections.discard(writer)
            writer.close()

    async def _answer(
        self, frame: Frame, writer: asyncio.StreamWriter, write_lock: asyncio.Lock
    ) -> None:
        header: dict[str, Any]
        try:
            if frame.kind == COMMIT:
                envelope, events, held = read_commit(frame.header)
                header = {"id": await self.commit(envelope, frame.body, events, held)}
                self.commits += 1
            elif frame.kind == UNSENT:
                header = {"unsent": await self.unsent()}
            else:
                raise FrameError(f"a request of kind {frame.kind}")
            kind = OK
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # carried back: the intake answers 4xx with it
            if not isinstance(exc, HatoError):
                _debug.exception("committer: unexpected error")
            header, kind = error_to_json(exc), ERROR
        prefix, _ = frame_parts(frame.request_id, kind, header)
        async with write_lock:
            if writer.is_closing():
                return
            writer.write(prefix)
            with contextlib.suppress(OSError):
                await writer.drain()


def _same_user(sock: Any) -> bool:
    """Whether the peer of a Unix socket (asyncio's wrapper of it) runs as our user."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return bool(uid == os.getuid())


# --- an intake process's side -------------------------------------------------------------


class _Link:
    """One connection and the requests waiting for an answer on it."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.pending: dict[int, asyncio.Future[Frame]] = {}
        self.reading: asyncio.Task[None] | None = None
        self.write_lock = asyncio.Lock()

    def fail(self, exc: QueueError) -> None:
        """The connection is gone: every request on it fails."""
        self.writer.close()
        for answer in self.pending.values():
            if not answer.done():
                answer.set_exception(exc)


class CommitterClient:
    """One connection to the committer, carrying every concurrent request of this
    process; made again for the next request once it is lost."""

    def __init__(self, address: str, *, timeout: float = COMMIT_TIMEOUT) -> None:
        self.address = address
        self.timeout = timeout
        self._link: _Link | None = None
        self._next_id = 1
        self._connecting = asyncio.Lock()

    async def commit(
        self, envelope: Envelope, data: bytes, events: Sequence[DeliveryEvent], held: bool
    ) -> str:
        """Have the message committed; its queue id once it is durable. Raises what the
        committer's enqueue raised, or QueueError if the committer cannot be reached."""
        answer = await self._request(COMMIT, commit_header(envelope, events, held), data)
        queue_id = answer.get("id")
        if not isinstance(queue_id, str) or not queue_id:
            raise QueueError("the committer answered without a queue id")
        return queue_id

    async def unsent(self) -> int:
        """The unsent messages of the queue (flow control)."""
        count = (await self._request(UNSENT, {})).get("unsent")
        if not isinstance(count, int):
            raise QueueError("the committer answered without a count")
        return count

    async def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.fail(QueueError("the committer connection was closed"))
            if link.reading is not None:
                link.reading.cancel()
                await asyncio.gather(link.reading, return_exceptions=True)

    async def _request(
        self, kind: int, header: dict[str, Any], body: bytes = b""
    ) -> dict[str, Any]:
        link = await self._connect()
        request_id = self._next_id
        self._next_id += 1
        answer: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        link.pending[request_id] = answer
        try:
            prefix, body = frame_parts(request_id, kind, header, body)
            async with link.write_lock:
                link.writer.write(prefix)
                if body:
                    link.writer.write(body)
                await link.writer.drain()
            frame = await asyncio.wait_for(asyncio.shield(answer), self.timeout)
        except (OSError, FrameError) as exc:
            self._lost(link)
            raise QueueError(f"the committer cannot be reached: {exc}") from exc
        except TimeoutError as exc:
            raise QueueError(f"the committer did not answer in {self.timeout:g} s") from exc
        finally:
            link.pending.pop(request_id, None)
        if frame.kind == ERROR:
            raise error_from_json(frame.header)
        return frame.header

    async def _connect(self) -> _Link:
        async with self._connecting:
            link = self._link
            if link is not None and not link.writer.is_closing():
                return link
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                # Connected by hand: uvloop's create_unix_connection refuses an abstract
                # name. The supervisor's backlog is far larger than the intake processes,
                # so this connect does not wait.
                sock.settimeout(CONNECT_TIMEOUT)
                sock.connect(self.address)
                sock.setblocking(False)
                reader, writer = await asyncio.open_unix_connection(sock=sock)
            except OSError as exc:
                sock.close()
                raise QueueError(f"the committer cannot be reached: {exc}") from exc
            link = self._link = _Link(writer)
            link.reading = asyncio.create_task(self._read(reader, link))
            return link

    async def _read(self, reader: asyncio.StreamReader, link: _Link) -> None:
        try:
            while True:
                frame = await _read_frame(reader)
                if frame is None:
                    break
                answer = link.pending.get(frame.request_id)
                if answer is not None and not answer.done():
                    answer.set_result(frame)
        except (FrameError, OSError) as exc:
            _debug.warning("committer connection lost: %s", exc)
        self._lost(link)

    def _lost(self, link: _Link) -> None:
        """The connection is gone: its requests fail, the next one connects again."""
        if self._link is link:
            self._link = None
        link.fail(QueueError("the committer (the delivery process) went away"))
