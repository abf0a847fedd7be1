"""The delivery worker: claim → route → deliver → record → reschedule or bounce.

One loop claims due messages from the queue under a lease, splits each message's pending
recipients by route, hands each group to its courier, and records one outcome per
recipient. A temporary failure is retried on the retry schedule until the message is too
old, then it fails like a permanent one: a DSN goes to a non-empty envelope sender, queued
in the same queue with the null sender (so a bounce is never bounced). Held recipients
stay in the queue as ``held``. With ``bounces=False`` (``hato worker``) no DSN is
sent: failures are only recorded, for ``Mailer.status`` and the log.

DSNs follow RFC 3461: each recipient's NOTIFY (default FAILURE and DELAY) says which
reports it gets. A failure report as above; one ``delayed`` report per recipient once the
message has waited ``delay_warning`` (the ``delayed`` delivery event recorded with it is
what keeps it to once); for NOTIFY=SUCCESS a ``relayed`` report when the next hop does not
offer DSN (one that does got NOTIFY passed on and reports itself) and a ``delivered``
report for our own Maildir. Never for NOTIFY=NEVER or a null sender. The message's
ENVID (or, with ``envid_from_id`` — ``hato worker`` — its own queue id) goes on to the
next hop with the other DSN parameters, into every event and the log lines.

Order of writes, for at-least-once: the DSN is enqueued before the outcome that causes it
is recorded (a crash in between gives the same DSN id back, through its idempotency key,
instead of losing it), and the outcome is recorded only after the remote reply.

Fresh mail skips the claim (issue 11): :meth:`Worker.enqueue_fresh` stores a message the
intake just accepted already leased to this worker, in the same durable commit as the
enqueue, and hands it straight to delivery; a relayed message then costs one durable
commit (the enqueue) plus the record, which no backend fsyncs on its own. The handoff
channel is bounded (``concurrency + handoff_limit`` messages in flight or waiting): when
it is full, or the worker does not run, the message is enqueued plainly and the claim
loop takes it. A crash loses nothing: the lease is one like any claimed lease, given back
when this process is known dead (its liveness signal ends with it) or runs out.

``stop()`` stops claiming; deliveries in flight may finish until ``stop_timeout``, the
rest are cancelled and their leases released, and ``run()`` returns. Nothing that goes
wrong inside one delivery ends the loop: unknown errors count as temporary failures.

A queue that fails to hand out work is not kept quiet, nor shouted about once a second:
each of the first ``UNHEALTHY_AFTER - 1`` failed claims in a row is one log line (never a
traceback: a full disk or a database restarting is not a bug), the next one turns
:attr:`Worker.health` to unhealthy and says so once, and the first claim that works
again says so once. ``/readyz`` reads ``health``. Records the queue quarantines while
this worker claims are logged as ``quarantined`` events with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from hato import events
from hato.clock import Clock
from hato.delivery.base import Courier, DeliveryResult, Result, all_results
from hato.delivery.hold import HoldCourier
from hato.delivery.router import RouteKind, Router
from hato.dsn import Action, FailedRecipient, build_bounce
from hato.dsn_params import NOTIFY_DELAY, NOTIFY_FAILURE, NOTIFY_SUCCESS, DsnRequest, request_of
from hato.errors import HatoError
from hato.events import DeliveryEvent, new_event_id
from hato.maillog import MailLog
from hato.message import META_ENVID, META_REQUIRETLS, Envelope, message_id_of
from hato.observe import NO_OBSERVER, Observer
from hato.queue.base import (
    MessageState,
    Outcome,
    Queue,
    RecipientState,
    RecipientStatus,
    StoredMessage,
)
from hato.queue.retry import RetrySchedule
from hato.reply import Reply
from hato.stages import StageTrace

_debug = logging.getLogger(__name__)

LOCAL_HELD = Reply(250, "2.0.0", "held: local delivery is not available yet")

_STATUS_OF = {
    Result.OK: "sent",
    Result.PERMANENT: "bounced",
    Result.TEMPORARY: "deferred",
    Result.HELD: "held",
}


def _dsn_code(reply: Reply) -> str:
    if reply.enhanced:
        return reply.enhanced
    return f"{reply.code // 100}.0.0" if 200 <= reply.code < 600 else "4.0.0"


def _lifetime(seconds: float) -> str:
    if seconds >= 86_400 and seconds % 86_400 == 0:
        return f"{seconds / 86_400:g} days"
    if seconds >= 3600:
        return f"{seconds / 3600:g} hours"
    return f"{seconds:g} seconds"


# Failed claims in a row after which the worker reports its queue unhealthy.
UNHEALTHY_AFTER = 3


@dataclass(frozen=True, slots=True)
class Health:
    """Can the worker get work from its queue? ``str()`` is ``ok`` or ``unhealthy:
    <reason> (since <UTC time>, <n> failed claims)``, as ``/readyz`` and the log say it."""

    ok: bool = True
    reason: str = ""
    since: float = 0.0
    failures: int = 0

    def __str__(self) -> str:
        if self.ok:
            return "ok"
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since))
        return f"unhealthy: {self.reason} (since {when}, {self.failures} failed claims)"


def _event_name(d: _Decision) -> str:
    """What a decision is as a delivery event: a hand-off to a relay is ``relayed``
    (the next hop tells the rest), to the MX or our own mailbox ``delivered``."""
    if d.outcome.state is RecipientState.SENT:
        return events.DELIVERED if d.kind in (RouteKind.MX, RouteKind.LOCAL) else events.RELAYED
    if d.outcome.state is RecipientState.FAILED:
        return events.EXPIRED if d.expired else events.BOUNCED
    if d.result.result is Result.HELD:
        return events.HELD
    return events.DEFERRED


@dataclass(frozen=True, slots=True)
class _Decision:
    """What the worker makes of one courier result."""

    result: DeliveryResult
    kind: RouteKind
    outcome: Outcome
    status: str
    bounce: bool
    expired: bool


class Worker:
    """Delivers queued mail until stopped. Build one per process (``hato serve`` or
    ``hato worker``); several workers may share a queue, the leases keep them apart."""

    def __init__(
        self,
        queue: Queue,
        couriers: Mapping[RouteKind, Courier],
        router: Router,
        retry: RetrySchedule,
        log: MailLog,
        *,
        hostname: str,
        concurrency: int = 8,
        batch_size: int = 16,
        lease_seconds: float = 300.0,
        clock: Clock = time.time,
        owner: str | None = None,
        rng: random.Random | None = None,
        idle_wait: float = 5.0,
        stop_timeout: float = 10.0,
        error_backoff: float = 1.0,
        bounces: bool = True,
        delay_warning: float = 0.0,
        envid_from_id: bool = False,
        return_path: Callable[[str, str], str] | None = None,
        take_over: Callable[[], Awaitable[int]] | None = None,
        take_over_every: float = 2.0,
        stages: StageTrace | None = None,
        observer: Observer = NO_OBSERVER,
        handoff_limit: int | None = None,
    ) -> None:
        if concurrency < 1 or batch_size < 1:
            raise ValueError("concurrency and batch_size must be at least 1")
        if handoff_limit is not None and handoff_limit < 0:
            raise ValueError("handoff_limit must not be negative")
        self.queue = queue
        self.couriers = dict(couriers)
        self.router = router
        self.retry = retry
        self.log = log
        self.hostname = hostname
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.lease_seconds = lease_seconds
        self.owner = owner or f"{hostname}/{os.getpid()}/{secrets.token_hex(4)}"
        self.idle_wait = idle_wait
        self.stop_timeout = stop_timeout
        self.error_backoff = error_backoff
        # An application outbox (``hato worker``) turns DSNs off: its senders are
        # noreply addresses, and the app reads failures from ``Mailer.status`` instead.
        self.bounces = bounces
        # Seconds in the queue after which a DELAY report goes out (once); 0: never.
        self.delay_warning = delay_warning
        # The outbox (``hato worker``) sends each message with ENVID=<its queue id>.
        self.envid_from_id = envid_from_id
        # (sender, queue id) -> the MAIL FROM of mail leaving this node: a VERP return
        # path (hato.verp) when HATO_VERP is on.
        self.return_path = return_path
        # Shared queues (PostgreSQL): unlease what dead nodes held, every
        # ``take_over_every`` seconds while running (see PostgresQueue.take_over_dead).
        self.take_over = take_over
        self.take_over_every = take_over_every
        # HATO_TRACE_STAGES: per-message stage timestamps (hato.stages), else None.
        self.stages = stages
        self.observer = observer  # told of each recipient's attempt (metrics)
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._local_hold = HoldCourier(LOCAL_HELD)
        self._stop = asyncio.Event()
        self._inflight: dict[asyncio.Task[None], str] = {}
        # The handoff channel: fresh messages leased at enqueue waiting for a free
        # delivery slot, and enqueues under way that will add one (see enqueue_fresh).
        self.handoff_limit = concurrency if handoff_limit is None else handoff_limit
        self._handed: deque[StoredMessage] = deque()
        self._reserved = 0
        self.handoffs = 0  # messages delivered without a claim (for tests and metrics)
        self.running = False
        self.health = Health()
        self._failures = 0
        self._failing_since = 0.0
        # Told of every record the queue quarantines, unless the composition root
        # pointed the queue somewhere else already.
        if queue.on_quarantine is None:
            queue.on_quarantine = self._quarantined

    # The loop.

    def stop(self) -> None:
        """Ask ``run()`` to finish: no more claims, in-flight work drains, then it returns."""
        self._stop.set()

    async def run(self) -> None:
        """Claim and deliver until :meth:`stop` is called (also if it was called before:
        a stop requested during start-up is not lost)."""
        self.running = True
        sweeper = (
            asyncio.create_task(self._take_over_loop(), name="hato-take-over")
            if self.take_over is not None and self.take_over_every > 0
            else None
        )
        try:
            while not self._stop.is_set():
                self._start_handed()
                free = self.concurrency - len(self._inflight)
                if free <= 0:
                    await self._pause(self.idle_wait, watch_queue=False)
                    continue
                try:
                    claimed = await self.queue.claim(
                        owner=self.owner,
                        limit=min(free, self.batch_size),
                        lease_seconds=self.lease_seconds,
                    )
                except Exception as exc:  # the queue is down: wait and try again
                    self._claim_failed(exc)
                    await self._pause(self.error_backoff, watch_queue=False)
                    continue
                self._claim_worked()
                for msg in claimed:
                    if self.stages is not None:
                        self.stages.mark(msg.id, "claimed")
                    self._start(msg)
                if claimed and len(claimed) == min(free, self.batch_size):
                    continue  # there may be more due right now
                await self._pause(self.idle_wait, watch_queue=True)
        finally:
            if sweeper is not None:
                sweeper.cancel()
                await asyncio.gather(sweeper, return_exceptions=True)
            await self._drain()
            self.running = False

    async def _take_over_loop(self) -> None:
        """Every ``take_over_every`` seconds: give dead nodes' leases back to the queue."""
        take_over = self.take_over
        while take_over is not None and not self._stop.is_set():
            try:
                async with asyncio.timeout(self.take_over_every):
                    await self._stop.wait()
                return
            except TimeoutError:
                pass
            try:
                taken = await take_over()
            except Exception as exc:  # the queue is down: the claim loop reports that
                _debug.warning("taking over dead nodes' leases failed: %s", exc)
                continue
            if taken:
                self.log.event(
                    "qmgr", "", status="recovered", detail=f"{taken} message(s) of a dead node"
                )

    def _claim_failed(self, exc: Exception) -> None:
        self._failures += 1
        reason = f"claim failed: {type(exc).__name__}: {exc}"
        if self._failures == 1:
            self._failing_since = self._clock()
            # Hato's own errors say all in their text (the line below); anything else is
            # a bug, and its traceback is worth one debug record per run of failures.
            if not isinstance(exc, HatoError):
                _debug.error("claim failed: %s", exc, exc_info=True)
        if self._failures < UNHEALTHY_AFTER:
            self.log.event("qmgr", "", warning=reason)
            return
        self.health = Health(False, reason, self._failing_since, self._failures)
        if self._failures == UNHEALTHY_AFTER:
            self.log.event(
                "qmgr",
                "",
                status="unhealthy",
                detail=f"{self._failures} claims failed in a row: {reason};"
                " logged again when the queue works",
            )

    def _claim_worked(self) -> None:
        if self._failures >= UNHEALTHY_AFTER:
            took = max(0.0, self._clock() - self._failing_since)
            self.log.event(
                "qmgr",
                "",
                status="healthy",
                detail=f"claims work again after {self._failures} failures in {took:.0f}s",
            )
        self._failures = 0
        if not self.health.ok:
            self.health = Health()

    def _quarantined(self, message_id: str, reason: str) -> None:
        self.log.queue_event(message_id, "quarantined", reason=reason)

    async def run_once(self) -> int:
        """Claim one batch and deliver it completely; the number of messages handled.

        For ``hato queue flush``-style callers and tests; ``run()`` is the daemon loop.
        """
        claimed = await self.queue.claim(
            owner=self.owner, limit=self.batch_size, lease_seconds=self.lease_seconds
        )
        semaphore = asyncio.Semaphore(self.concurrency)

        async def one(msg: StoredMessage) -> None:
            async with semaphore:
                await self.process(msg)

        await asyncio.gather(*(one(m) for m in claimed))
        return len(claimed)

    def _start(self, msg: StoredMessage, *, handed: bool = False) -> None:
        task = asyncio.create_task(self._guarded(msg, handed), name=f"deliver {msg.id}")
        self._inflight[task] = msg.id
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task, None)
        if not self._stop.is_set():
            self._start_handed()

    # The handoff of fresh mail.

    async def enqueue_fresh(
        self, envelope: Envelope, data: bytes, events: Sequence[DeliveryEvent] = ()
    ) -> str:
        """Enqueue a message the intake just accepted (durably, as ``Queue.enqueue``) and
        return its id; when the handoff channel has room, leased to this worker in the
        same commit and delivered without a claim. Raises what ``enqueue`` raises."""
        waiting = len(self._inflight) + len(self._handed) + self._reserved
        if (
            not self.running
            or self._stop.is_set()
            or waiting >= self.concurrency + self.handoff_limit
        ):
            return await self.queue.enqueue(envelope, data, events=events)
        self._reserved += 1
        try:
            now = self._clock()
            message_id = await self.queue.enqueue(
                envelope,
                data,
                events=events,
                lease_owner=self.owner,
                lease_seconds=self.lease_seconds,
            )
        finally:
            self._reserved -= 1
        msg = StoredMessage(
            id=message_id,
            sender=envelope.sender,
            recipients=[RecipientStatus(a) for a in envelope.recipients],
            data=bytes(data),
            state=MessageState.SENDING,
            created_at=now,
            next_attempt_at=now + self.lease_seconds,
            lease_owner=self.owner,
            lease_until=now + self.lease_seconds,
            meta=dict(envelope.meta),
        )
        if self._stop.is_set():
            # Stopping while it was stored: give it back for the next start (or another
            # worker); if that fails, the lease ends with this process.
            try:
                await self.queue.release(message_id, owner=self.owner)
            except Exception as exc:
                _debug.warning("release of %s failed: %s", message_id, exc)
            return message_id
        self._handed.append(msg)
        self.handoffs += 1
        self._start_handed()
        return message_id

    def _start_handed(self) -> None:
        """Start handed-off messages while delivery slots are free."""
        while self._handed and len(self._inflight) < self.concurrency:
            self._start(self._handed.popleft(), handed=True)

    async def _guarded(self, msg: StoredMessage, handed: bool = False) -> None:
        if handed and self.stages is not None:
            # A handed-off message's "claimed": when its delivery starts (after the
            # intake marked it committed).
            self.stages.mark(msg.id, "claimed")
        try:
            await self.process(msg)
        except Exception as exc:  # a bug or the queue failing in record: the lease expires
            _debug.error("processing %s failed", msg.id, exc_info=True)
            self.log.event(
                "qmgr", msg.id, warning=f"processing failed: {type(exc).__name__}: {exc}"
            )

    async def _pause(self, timeout: float, *, watch_queue: bool) -> None:
        """Wait until stop, a delivery finishing, new work (when watched) or ``timeout``."""
        helpers: list[asyncio.Task[object]] = [asyncio.create_task(self._stop.wait())]
        if watch_queue:
            helpers.append(asyncio.create_task(self.queue.wait_for_work(timeout)))
        try:
            await asyncio.wait(
                [*helpers, *self._inflight],
                timeout=timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for helper in helpers:
                helper.cancel()
            for outcome in await asyncio.gather(*helpers, return_exceptions=True):
                if isinstance(outcome, Exception):
                    _debug.warning("waiting for work failed: %s", outcome)
                    # Do not spin on a broken wait: fall back to a plain delay.
                    try:
                        async with asyncio.timeout(self.error_backoff):
                            await self._stop.wait()
                    except TimeoutError:
                        pass

    async def _drain(self) -> None:
        """Let deliveries in flight finish up to ``stop_timeout``; release the rest."""
        while self._handed:  # handed off but not started: give them back at once
            message_id = self._handed.popleft().id
            try:
                await self.queue.release(message_id, owner=self.owner)
            except Exception as exc:  # the lease ends with this process
                _debug.warning("release of %s failed: %s", message_id, exc)
        if not self._inflight:
            return
        tasks = dict(self._inflight)
        _, pending = await asyncio.wait(tasks, timeout=self.stop_timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in pending:
            message_id = tasks[task]
            try:
                await self.queue.release(message_id, owner=self.owner)
            except Exception as exc:  # the lease will expire on its own
                _debug.warning("release of %s failed: %s", message_id, exc)
            else:
                self.log.queue_event(message_id, "released", reason="worker stopping")

    # One message.

    def _courier_for(self, kind: RouteKind) -> Courier | None:
        courier = self.couriers.get(kind)
        if courier is None and kind is RouteKind.LOCAL:
            # Only a worker built without a Maildir courier gets here (app.py builds one
            # whenever HATO_DOMAINS is set, the only case in which its router picks LOCAL):
            # such mail is held rather than failed, and `hato queue release` delivers it
            # once local delivery is configured.
            courier = self.couriers.get(RouteKind.HOLD) or self._local_hold
        return courier

    async def _deliver(
        self,
        kind: RouteKind,
        msg: StoredMessage,
        recipients: Sequence[str],
        dsn: DsnRequest | None = None,
    ) -> list[DeliveryResult]:
        courier = self._courier_for(kind)
        if courier is None:
            reply = Reply(451, "4.3.5", f"no courier is configured for route {kind.value}")
            return all_results(recipients, Result.TEMPORARY, reply)
        sender = msg.sender
        if self.return_path is not None and kind in (RouteKind.RELAY, RouteKind.MX):
            sender = self.return_path(sender, msg.id)
        try:
            if msg.meta.get(META_REQUIRETLS) == "yes":
                results = await courier.deliver(
                    sender, recipients, msg.data, message_id=msg.id, dsn=dsn, require_tls=True
                )
            else:
                results = await courier.deliver(
                    sender, recipients, msg.data, message_id=msg.id, dsn=dsn
                )
        except Exception as exc:  # unknown means temporary: retry rather than drop
            _debug.error("courier %s failed on %s", courier.name, msg.id, exc_info=True)
            reply = Reply(
                451, "4.3.0", f"internal error in {courier.name}: {type(exc).__name__}: {exc}"
            )
            return all_results(recipients, Result.TEMPORARY, reply, courier.name)
        by_address = {r.recipient: r for r in results}
        missing = Reply(451, "4.3.0", f"{courier.name} returned no result for this recipient")
        return [
            by_address.get(rcpt) or DeliveryResult(rcpt, Result.TEMPORARY, missing, courier.name)
            for rcpt in recipients
        ]

    def _decide(self, kind: RouteKind, res: DeliveryResult, expired: bool) -> _Decision:
        text = str(res.reply)
        if res.result is Result.OK:
            state, bounce = RecipientState.SENT, False
        elif res.result is Result.PERMANENT or (res.result is Result.TEMPORARY and expired):
            state, bounce = RecipientState.FAILED, True
        else:
            state, bounce = RecipientState.PENDING, False
        status = "bounced" if bounce else _STATUS_OF[res.result]
        return _Decision(
            res,
            kind,
            Outcome(res.recipient, state, text, res.relay),
            status,
            bounce,
            expired and res.result is Result.TEMPORARY,
        )

    async def process(self, msg: StoredMessage) -> MessageState | None:
        """Deliver one claimed message once and record what happened; the new state, or
        ``None`` when the lease was lost to another worker."""
        groups: dict[RouteKind, list[str]] = {}
        for rcpt in msg.pending:
            groups.setdefault(self.router.route(rcpt), []).append(rcpt)
        envid = self._envid(msg)
        dsn = request_of(msg.meta, envid=envid)
        delivered: list[tuple[RouteKind, DeliveryResult]] = []
        for kind, recipients in groups.items():
            for res in await self._deliver(kind, msg, recipients, dsn):
                delivered.append((kind, res))

        if self.stages is not None:
            self.stages.mark(msg.id, "delivered")
        now = self._clock()
        attempt = msg.attempts + 1
        expired = self.retry.expired(msg.created_at, now)
        decisions = [self._decide(kind, res, expired) for kind, res in delivered]

        bounced = [d for d in decisions if d.bounce]
        # NOTIFY without FAILURE (NEVER, or SUCCESS/DELAY only): the failure is recorded,
        # no report goes out.
        reported = [d for d in bounced if dsn.of(d.result.recipient).wants(NOTIFY_FAILURE)]
        if (
            reported
            and msg.sender
            and self.bounces
            and not await self._send_dsn(msg, reported, now, dsn)
        ):
            # No DSN could be queued: keep those recipients pending rather than fail them
            # silently; the next attempt bounces them again.
            decisions = [
                _Decision(
                    d.result,
                    d.kind,
                    Outcome(
                        d.outcome.address, RecipientState.PENDING, d.outcome.reply, d.outcome.relay
                    ),
                    "deferred",
                    False,
                    False,
                )
                if d.bounce and d in reported
                else d
                for d in decisions
            ]
        warned = await self._delay_warnings(msg, decisions, now, dsn)
        await self._success_reports(msg, decisions, now, dsn)

        pending = [d for d in decisions if d.outcome.state is RecipientState.PENDING]
        retrying = [d for d in pending if d.result.result is not Result.HELD]
        held = bool(pending) and not retrying
        retry_at = now + self.retry.next_delay(attempt, self._rng) if retrying else None
        state = await self.queue.record(
            msg.id,
            [d.outcome for d in decisions],
            owner=self.owner,
            retry_at=retry_at,
            held=held,
            events=self._events(msg, decisions, now, attempt, envid, warned),
        )
        if self.stages is not None:
            self.stages.finish(msg.id)
        if state is None:
            self.log.queue_event(msg.id, "lease lost", owner=self.owner)
        for d in decisions:
            self.observer.delivery(d.kind.value, d.status, max(0.0, now - msg.created_at))
            self.observer.event(_event_name(d))
            detail = str(d.result.reply)
            if d.expired:
                detail = f"gave up after {_lifetime(self.retry.max_lifetime)}: {detail}"
            self.log.delivery(
                msg.id,
                to=d.result.recipient,
                relay=d.result.relay or d.kind.value,
                delay=max(0.0, now - msg.created_at),
                attempts=attempt,
                dsn=_dsn_code(d.result.reply),
                status=d.status,
                detail=detail,
                service=d.kind.value,
                envid=envid,
                tls=(
                    (d.result.tls_version, d.result.tls_verified, d.result.tls_policy)
                    if d.result.relay_host or d.result.tls_policy
                    else None
                ),
            )
        return state

    def _envid(self, msg: StoredMessage) -> str:
        """The ENVID the message travels with: the one it came with, else (outbox) its id."""
        envid = msg.meta.get(META_ENVID, "")
        if not envid and self.envid_from_id:
            return msg.id
        return envid

    async def _delay_warnings(
        self, msg: StoredMessage, decisions: Sequence[_Decision], now: float, dsn: DsnRequest
    ) -> list[_Decision]:
        """Once the message has waited ``delay_warning``: the recipients still being
        retried that were not warned yet. Each gets a ``delayed`` event (recorded with
        the attempt, which keeps this to once) and, if it asked for DELAY, a report; a
        report that cannot be queued is tried again on the next attempt."""
        if self.delay_warning <= 0 or now - msg.created_at < self.delay_warning:
            return []
        waiting = [
            d
            for d in decisions
            if d.outcome.state is RecipientState.PENDING and d.result.result is Result.TEMPORARY
        ]
        if not waiting:
            return []
        try:
            warned = await self._warned(msg.id)
        except Exception as exc:  # unknown: do not warn twice, try on the next attempt
            _debug.warning("reading the events of %s failed: %s", msg.id, exc)
            return []
        due = [d for d in waiting if d.result.recipient not in warned]
        wanted = [d for d in due if dsn.of(d.result.recipient).wants(NOTIFY_DELAY)]
        if (
            wanted
            and msg.sender
            and self.bounces
            and not await self._send_dsn(msg, wanted, now, dsn, action="delayed")
        ):
            return [d for d in due if d not in wanted]
        return due

    async def _warned(self, queue_id: str) -> set[str]:
        """The recipients of ``queue_id`` that have a ``delayed`` event already."""
        warned: set[str] = set()
        cursor = ""
        for _ in range(1000):  # bounded: 100,000 events of one message
            page = await self.queue.events(after=cursor, queue_id=queue_id, limit=100)
            warned.update(e.recipient for e in page.events if e.event == events.DELAYED)
            if not page.events or page.cursor == cursor:
                break
            cursor = page.cursor
        return warned

    async def _success_reports(
        self, msg: StoredMessage, decisions: Sequence[_Decision], now: float, dsn: DsnRequest
    ) -> None:
        """NOTIFY=SUCCESS (RFC 3461 5.2.2): ``delivered`` for our own Maildir, ``relayed``
        for a next hop without DSN; a next hop with DSN got NOTIFY and reports itself."""
        if not (msg.sender and self.bounces):
            return
        delivered = [
            d
            for d in decisions
            if d.outcome.state is RecipientState.SENT
            and not d.result.next_hop_dsn
            and d.result.result is Result.OK
            and dsn.of(d.result.recipient).wants(NOTIFY_SUCCESS)
        ]
        local = [d for d in delivered if d.kind is RouteKind.LOCAL]
        relayed = [d for d in delivered if d.kind is not RouteKind.LOCAL]
        if local:
            await self._send_dsn(msg, local, now, dsn, action="delivered")
        if relayed:
            await self._send_dsn(msg, relayed, now, dsn, action="relayed")

    def _events(
        self,
        msg: StoredMessage,
        decisions: Sequence[_Decision],
        now: float,
        attempt: int,
        envid: str = "",
        warned: Sequence[_Decision] = (),
    ) -> list[DeliveryEvent]:
        """The delivery events of one attempt, one per recipient (see :mod:`hato.events`),
        and a ``delayed`` one for each recipient in ``warned``."""
        message_id = message_id_of(msg.data)
        out = []
        named = [(d, _event_name(d)) for d in decisions]
        named += [(d, events.DELAYED) for d in warned]
        for d, name in named:
            res, reply = d.result, d.result.reply
            out.append(
                DeliveryEvent(
                    event_id=new_event_id(self._clock),
                    event=name,
                    time=now,
                    node=self.hostname,
                    queue_id=msg.id,
                    recipient=res.recipient,
                    envid=envid,
                    message_id=message_id,
                    attempt=attempt,
                    route=d.kind.value,
                    relay_host=res.relay_host,
                    relay_ip=res.relay_ip,
                    reply_code=reply.code,
                    reply_enhanced=reply.enhanced,
                    reply_text=reply.text,
                    tls_version=res.tls_version,
                    tls_verified=res.tls_verified,
                    tls_policy=res.tls_policy,
                )
            )
        return out

    async def _send_dsn(
        self,
        msg: StoredMessage,
        bounced: Sequence[_Decision],
        now: float,
        dsn: DsnRequest | None = None,
        *,
        action: Action = "failed",
    ) -> bool:
        """Queue the DSN (a bounce unless ``action`` says otherwise) for ``bounced``;
        False if it could not be queued."""
        dsn = dsn if dsn is not None else DsnRequest()
        any_expired = any(d.expired for d in bounced)
        reason = (
            f"The message could not be delivered within {_lifetime(self.retry.max_lifetime)} "
            "and was given up."
            if any_expired and action == "failed"
            else ""
        )
        try:
            bounce = build_bounce(
                hostname=self.hostname,
                queue_id=msg.id,
                sender=msg.sender,
                recipients=[
                    FailedRecipient(
                        d.result.recipient,
                        d.result.reply,
                        d.result.relay,
                        action,
                        dsn.of(d.result.recipient).orcpt,
                    )
                    for d in bounced
                ],
                original=msg.data,
                arrival=msg.created_at,
                now=now,
                reason=reason,
                envid=dsn.envid,
                ret=dsn.ret,
            )
            if bounce is None:
                return True
            kind = "dsn" if action == "failed" else f"dsn-{action}"
            dsn_id = await self.queue.enqueue(
                bounce.envelope,
                bounce.data,
                idempotency_key=f"{kind}:{msg.id}:{msg.attempts}",
            )
        except Exception as exc:
            _debug.error("bounce for %s failed", msg.id, exc_info=True)
            self.log.event(
                "bounce", msg.id, warning=f"could not queue DSN: {type(exc).__name__}: {exc}"
            )
            return False
        self.log.event(
            "bounce",
            msg.id,
            notification=dsn_id,
            to=msg.sender,
            action=None if action == "failed" else action,
        )
        return True
