"""The synchronous ``Mailer``: a facade over :class:`AsyncMailer` running on a private loop thread.

:class:`MailerBase` is the sending API every synchronous mailer shares (``send``,
``send_many``, ``send_template``, ``compose``, ``wait``): it composes in the calling
thread and hands the result to its subclass's ``enqueue``. :class:`Mailer` stores into a
queue; :class:`hato.testing.CaptureMailer` keeps the messages in a list.

:class:`Mailer` runs an :class:`AsyncMailer` on a private event loop in a daemon thread,
because the PostgreSQL and Redis queue objects belong to the loop they were opened on;
``send`` builds the message in the calling thread, hands the enqueue to that loop and
waits for it (tens of microseconds on top of the queue's own round trip). Build one
``Mailer`` per process and share it between threads; a forked child (``gunicorn
--preload``) starts its own loop and connections on first use. ``send(connection=...)``
needs no loop: the INSERT runs in the calling thread on the caller's connection.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import inspect
import os
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Self, TypeVar

from hato.clock import Clock
from hato.errors import HatoError, QueueError
from hato.events import DeliveryEvent
from hato.mailer.addresses import AddressLike
from hato.mailer.async_mailer import (
    AsyncMailer,
    MessageId,
    State,
    Status,
    TemplateSource,
    caller_transaction,
    templates_of,
)
from hato.mailer.composition import Composed, Composer, Email
from hato.queue import redact_url

if TYPE_CHECKING:
    from hato.mailer.transaction import CallerTransaction
    from hato.templates import Templates

__all__ = ["Mailer", "MailerBase"]

T = TypeVar("T")
P = ParamSpec("P")


def blocking_twin(
    twin: Callable[Concatenate[Any, P], Coroutine[Any, Any, T]],
) -> Callable[[Callable[..., T]], Callable[Concatenate[Any, P], T]]:
    """Give a blocking method the parameters of its asyncio twin (``AsyncMailer``'s): one
    signature for both APIs, checked by mypy at the call site and shown by ``help()``."""

    def decorate(method: Callable[..., T]) -> Callable[Concatenate[Any, P], T]:
        method.__signature__ = inspect.signature(twin)  # type: ignore[attr-defined]
        return method

    return decorate


class MailerBase(Composer, abc.ABC):
    """The synchronous sending API, built on a subclass's :meth:`enqueue`,
    :meth:`enqueue_many` and :meth:`status`.

    ``default_from`` is the sender of messages without ``from_``; ``templates`` the folder
    (or :class:`~hato.templates.Templates`) :meth:`send_template` renders from; ``clock``
    dates the messages.
    """

    def __init__(
        self, *, default_from: str | None, templates: TemplateSource, clock: Clock
    ) -> None:
        self.default_from = default_from
        self._templates_arg = templates
        self._templates: Templates | None = None
        self._clock = clock

    # What a subclass provides.

    @abc.abstractmethod
    def enqueue(self, composed: Composed, *, connection: object | None = None) -> MessageId:
        """Store a message built by :meth:`compose`; its id."""

    @abc.abstractmethod
    def enqueue_many(
        self, composed: Sequence[Composed], *, connection: object | None = None
    ) -> list[MessageId]:
        """Store messages built by :meth:`compose`; their ids in order."""

    @abc.abstractmethod
    def status(self, message_id: MessageId) -> Status:
        """The message's state and last reply (see :class:`Status`)."""

    @abc.abstractmethod
    def open(self) -> None:
        """Get ready to store (connect), to fail early on bad settings. Idempotent."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release what :meth:`open` took. Idempotent."""

    # The API on top.

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @blocking_twin(AsyncMailer.send)
    def send(self, *args: Any, connection: object | None = None, **options: Any) -> MessageId:
        """Enqueue one message and return its id once it is durable.

        ``connection``: a psycopg ``Connection`` with an open transaction (PostgreSQL
        queues only): the INSERT runs on it, in the calling thread, and is not committed
        here; the caller's commit makes the message exist, a rollback discards it.
        """
        return self.enqueue(self.compose(*args, **options), connection=connection)

    def send_many(
        self, messages: Iterable[Email | Mapping[str, Any]], *, connection: object | None = None
    ) -> list[MessageId]:
        """Enqueue several messages; see :meth:`AsyncMailer.send_many`."""
        composed = self.compose_all(messages)
        return self.enqueue_many(composed, connection=connection)

    def send_template(
        self,
        name: str,
        *,
        to: AddressLike | Iterable[AddressLike],
        context: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> MessageId:
        """Render template ``name`` and send it; see :meth:`AsyncMailer.send_template`."""
        if self._templates is None:
            self._templates = templates_of(self._templates_arg)
        rendered = self._templates.render(name, context or {})
        return self.send(to, rendered.subject, rendered.text, rendered.html, **kwargs)

    def wait(
        self,
        message_id: MessageId,
        *,
        states: Sequence[State] = ("sent", "delivered", "bounced", "failed"),
        timeout: float = 30.0,
        interval: float = 0.05,
    ) -> Status:
        """Poll :meth:`status` until its state is one of ``states`` (by default those of
        :attr:`Status.done`: the outbox is through with it; pass ``states=("delivered",
        "bounced", "failed")`` to wait for the last hop's word); raise
        :class:`TimeoutError` (with the last status) at the deadline. For scripts and tests."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(message_id)
            if status.state in states:
                return status
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{message_id} is still {status.state} ({status.reply})")
            time.sleep(min(interval, left))


class _LoopThread:
    """An event loop running forever in a daemon thread; coroutines are submitted to it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a Mailer method was called from inside its own event loop")
        if self.loop.is_closed() or not self._thread.is_alive():
            coro.close()
            raise QueueError("this mailer is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise QueueError(
                f"the queue did not answer within {timeout:g} s; the message may or may not "
                "be stored (send again with the same idempotency_key to be sure)"
            ) from None

    def stop(self) -> None:
        if self._thread.is_alive() and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
            if threading.current_thread() is not self._thread:
                self._thread.join(10)


def _shutdown(runner: _LoopThread, inner: AsyncMailer, timeout: float) -> None:
    """Close the queue on the private loop, then stop the loop (also at interpreter exit)."""
    with contextlib.suppress(HatoError, RuntimeError):
        runner.call(inner.aclose(), timeout)
    runner.stop()


class Mailer(MailerBase):
    """Enqueue mail from synchronous code (Django, Flask, scripts) and read its status.

    ``queue_url`` and ``default_from`` fall back to ``HATO_QUEUE_URL`` (else an SQLite
    file in ``HATO_DATA_DIR``) and ``HATO_DEFAULT_FROM``. ``templates`` is the folder for
    :meth:`send_template` (default ``HATO_TEMPLATE_DIR`` or ``./templates``). ``timeout``
    bounds each queue operation. Thread-safe.
    """

    def __init__(
        self,
        queue_url: str | None = None,
        *,
        default_from: str | None = None,
        templates: TemplateSource = None,
        timeout: float = 30.0,
        clock: Clock = time.time,
        fsync: bool = True,
    ) -> None:
        self._inner = AsyncMailer(
            queue_url, default_from=default_from, templates=templates, clock=clock, fsync=fsync
        )
        super().__init__(
            default_from=self._inner.default_from,
            templates=self._inner._templates_arg,
            clock=clock,
        )
        self.queue_url = self._inner.queue_url
        self.timeout = timeout
        self._fsync = fsync
        self._transaction: CallerTransaction | None = None
        self._lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        self._pid = os.getpid()
        self._runner = _LoopThread("hato-mailer")
        self._finalizer = weakref.finalize(self, _shutdown, self._runner, self._inner, self.timeout)

    def _after_fork(self) -> None:
        """A forked child (gunicorn, celery prefork) has no copy of the loop thread: start
        a new loop and queue connection, and leave the parent's connections alone."""
        with self._lock:
            if self._pid == os.getpid():
                return
            self._finalizer.detach()
            self._inner = AsyncMailer(
                self.queue_url,
                default_from=self.default_from,
                templates=self._templates_arg,
                clock=self._clock,
                fsync=self._fsync,
            )
            self._start()

    def __repr__(self) -> str:
        return f"Mailer({redact_url(self.queue_url)!r})"

    def _run(self, make: Callable[[AsyncMailer], Coroutine[Any, Any, T]]) -> T:
        """Run ``make(inner)`` on the private loop (built after a fork check, so the
        coroutine belongs to this process's loop)."""
        if self._pid != os.getpid():
            self._after_fork()
        return self._runner.call(make(self._inner), self.timeout)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the private loop (for tests and tools)."""
        return self._run(lambda _inner: coro)

    def open(self) -> None:
        """Connect now instead of on the first call (to fail early on a bad URL)."""
        self._run(lambda inner: inner.open())

    def close(self) -> None:
        """Close the queue connections and stop the private loop. Idempotent."""
        self._finalizer()

    def enqueue(self, composed: Composed, *, connection: object | None = None) -> MessageId:
        """Store a message built by :func:`~hato.mailer.compose`."""
        if connection is not None:
            # In the calling thread, on the caller's connection: its transaction decides.
            return self._caller_transaction().enqueue_sync(connection, composed)
        return self._run(lambda inner: inner.enqueue(composed))

    def enqueue_many(
        self, composed: Sequence[Composed], *, connection: object | None = None
    ) -> list[MessageId]:
        """Store messages built by :func:`~hato.mailer.compose`; their ids in order."""
        if connection is not None:
            transaction = self._caller_transaction()
            return [transaction.enqueue_sync(connection, c) for c in composed]
        return self._run(lambda inner: inner.enqueue_many(composed))

    def _caller_transaction(self) -> CallerTransaction:
        if self._transaction is None:
            self._transaction = caller_transaction(self.queue_url, self._clock)
        return self._transaction

    def status(self, message_id: MessageId) -> Status:
        """The message's state and last reply (see :class:`Status`)."""
        return self._run(lambda inner: inner.status(message_id))

    def record_events(self, events: Sequence[DeliveryEvent]) -> int:
        """Store delivery events another node reported (see
        :meth:`AsyncMailer.record_events`); how many were new."""
        return self._run(lambda inner: inner.record_events(events))
