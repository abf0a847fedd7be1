"""A wire tap: a loopback TCP forwarder that records the bytes a client sends a server.

Put between a real client and a real server (``Tap(target_port)``), it shows what went
over the wire (BDAT or DATA, the MAIL parameters) without standing in for either side.
It works in the asyncio loop of the test (``async with``) or in a thread of its own
(``with``, for a client in another process, such as Postfix).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

HOST = "127.0.0.1"


class Tap:
    def __init__(self, target_port: int, target_host: str = HOST) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._wire = bytearray()
        self._lock = threading.Lock()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()

    @property
    def wire(self) -> bytes:
        """Everything clients sent so far, all connections in order of arrival."""
        with self._lock:
            return bytes(self._wire)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if record:
                    with self._lock:
                        self._wire += data
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        await asyncio.gather(
            self._pipe(reader, up_writer, True), self._pipe(up_reader, writer, False)
        )

    def _spawn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._client(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> Tap:
        self._server = await asyncio.start_server(self._spawn, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Tap:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # In a thread of its own.

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        loop.run_until_complete(self.start())
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self.stop())
        loop.close()

    def __enter__(self) -> Tap:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("tap did not start within 10s")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
