"""One ``/metrics``, console and ``/readyz`` over every process of ``hato serve``.

With ``HATO_PROCESSES`` above 1 the HTTP listener runs in the delivery process only,
while the SMTP counters grow in the intake processes. The pieces:

- :class:`IntakeSockets`: the supervisor binds, before it forks, one listening Unix
  socket per intake slot, in the abstract namespace, named
  ``\\0hato-<supervisor pid>-metrics-<slot>``. The socket belongs to the slot, not to
  the child: a restarted child answers on the same name.
- :class:`IntakeReporter`: each intake child answers a connection on its socket with one
  JSON object (its pid, an incarnation token, its registry's text exposition, and its
  listeners with their open connections) and closes it. Nothing is sent per message:
  the hot path only bumps this process's counters, as with one process.
- :class:`IntakeView`: the delivery process asks every slot at scrape time, all at once,
  each within :data:`ANSWER_TIMEOUT`. A slot that does not answer in time keeps its last
  known values and the operator log says so; the scrape does not fail.
- :func:`merge`: one series per metric and label set. Counters and histograms are
  summed over the delivery process and every slot (``_created`` series: the earliest),
  ``hato_smtp_connections_active`` is summed, every other gauge (the queue gauges,
  ``hato_ready``, ``hato_build_info``, ``hato_last_delivery_timestamp_seconds``) is the
  delivery process's alone.

A restarted intake child starts its counters at 0. Each slot keeps an offset: when the
incarnation a slot answers with changes, the last values read from the previous one are
added to the slot's offset, so the sums never go down. What the previous child counted
after the last scrape before it died is lost (a counter a little low, never lower than
before). A restart of the delivery process itself starts every sum again from the
children's current values: Prometheus sees one counter reset, as with one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

__all__ = [
    "ANSWER_TIMEOUT",
    "Answer",
    "IntakeReporter",
    "IntakeSockets",
    "IntakeView",
    "ListenerState",
    "Parsed",
    "SlotTotals",
    "merge",
    "parse",
    "read_answer",
    "render",
]

# How long the delivery process waits for an intake process's answer at scrape time.
ANSWER_TIMEOUT = 1.0
# The gauge that is summed over the processes (every other gauge is the delivery's).
SUMMED_GAUGES = frozenset({"hato_smtp_connections_active"})

Kind = Literal["counter", "created", "summed", "own"]
# (sample name, sorted label pairs)
Key = tuple[str, tuple[tuple[str, str], ...]]


# --- the merge: pure ----------------------------------------------------------------------


@dataclass
class Family:
    """One metric family as read from a text exposition."""

    name: str
    documentation: str
    type: str
    kind: Kind
    samples: dict[Key, float] = field(default_factory=dict)


Parsed = dict[str, Family]


def parse(text: str) -> Parsed:
    """The families of a text exposition (``prometheus_client``'s, version 0.0.4), each
    with the way it is merged across processes; raises ValueError if it is not one."""
    families = list(text_string_to_metric_families(text))
    sums = {f.name for f in families if f.type in ("counter", "histogram", "summary")}
    parsed: Parsed = {}
    for family in families:
        kind: Kind
        if family.type in ("counter", "histogram", "summary"):
            kind = "counter"
        elif family.name.endswith("_created") and family.name[: -len("_created")] in sums:
            kind = "created"
        elif family.name in SUMMED_GAUGES:
            kind = "summed"
        else:
            kind = "own"
        target = parsed.setdefault(
            family.name, Family(family.name, family.documentation, family.type, kind)
        )
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            target.samples[key] = sample.value
    return parsed


@dataclass
class SlotTotals:
    """What one intake slot adds to the sums, across the restarts of its child."""

    incarnation: str = ""
    last: Parsed = field(default_factory=dict)
    # Counters (and _created minima) of the slot's previous children.
    offset: dict[str, dict[Key, float]] = field(default_factory=dict)

    def update(self, incarnation: str, parsed: Parsed) -> None:
        """Take a new reading; a new incarnation first moves the last one into the offset."""
        if self.incarnation and incarnation != self.incarnation:
            for name, family in self.last.items():
                if family.kind not in ("counter", "created"):
                    continue
                offset = self.offset.setdefault(name, {})
                for key, value in family.samples.items():
                    if family.kind == "counter":
                        offset[key] = offset.get(key, 0.0) + value
                    else:
                        offset[key] = min(offset.get(key, value), value)
        elif incarnation == self.incarnation:
            # The same child: counters only grow. Keep the larger reading, so that an
            # answer overtaken by a later one cannot move a sum back.
            for name, family in parsed.items():
                before = self.last.get(name)
                if family.kind != "counter" or before is None:
                    continue
                for key, value in before.samples.items():
                    if family.samples.get(key, value) < value:
                        family.samples[key] = value
        self.incarnation = incarnation
        self.last = parsed

    def contribution(self) -> Parsed:
        """The slot's share: the last reading, plus the offsets of its previous children."""
        out: Parsed = {}
        for name, family in self.last.items():
            out[name] = Family(
                family.name, family.documentation, family.type, family.kind, dict(family.samples)
            )
        for name, offsets in self.offset.items():
            target = out.get(name)
            if target is None:  # the new child has not created the family (yet)
                continue
            for key, value in offsets.items():
                now = target.samples.get(key)
                if target.kind == "counter":
                    target.samples[key] = value + (now or 0.0)
                else:
                    target.samples[key] = value if now is None else min(now, value)
        return out


def merge(own: Parsed, others: Iterable[Parsed]) -> list[Metric]:
    """One family list: ``own`` (the delivery process's) with ``others`` folded in, one
    sample per name and label set; see the module docstring for what is summed."""
    merged: Parsed = {
        name: Family(f.name, f.documentation, f.type, f.kind, dict(f.samples))
        for name, f in own.items()
    }
    for parsed in others:
        for name, family in parsed.items():
            target = merged.get(name)
            if target is None:
                if family.kind == "own":
                    continue
                target = merged[name] = Family(
                    family.name, family.documentation, family.type, family.kind
                )
            if target.kind == "own":
                continue
            for key, value in family.samples.items():
                now = target.samples.get(key)
                if target.kind == "created":
                    target.samples[key] = value if now is None else min(now, value)
                else:
                    target.samples[key] = value + (now or 0.0)
    result = []
    for family in merged.values():
        metric = Metric(family.name, family.documentation, family.type)
        for (sample_name, labels), value in family.samples.items():
            metric.add_sample(sample_name, dict(labels), value)
        result.append(metric)
    return result


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def render(families: list[Metric]) -> bytes:
    """The Prometheus text exposition of ``families``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


# --- the sockets: bound by the supervisor -------------------------------------------------


class IntakeSockets:
    """One listening Unix socket per intake slot, bound by the supervisor before it forks
    (abstract namespace: nothing on disk, gone with the last process holding it)."""

    def __init__(self, slots: Sequence[int], owner: int | None = None) -> None:
        self.owner = owner if owner is not None else os.getpid()
        self.slots = list(slots)
        self.sockets: dict[int, socket.socket] = {}
        self.mine: socket.socket | None = None  # in an intake child: its slot's

    def address(self, slot: int) -> str:
        return f"\0hato-{self.owner}-metrics-{slot}"

    def addresses(self) -> dict[int, str]:
        return {slot: self.address(slot) for slot in self.slots}

    def bind(self) -> None:
        for slot in self.slots:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(self.address(slot))
                sock.listen(16)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
            self.sockets[slot] = sock

    def attach(self, slot: int) -> None:
        """In a child: keep the socket of ``slot`` (an intake's own), close the others."""
        for other, sock in self.sockets.items():
            if other != slot:
                sock.close()
        self.mine = self.sockets.get(slot)

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()


# --- the intake side ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenerState:
    """One SMTP listener of one process, as the console and /readyz show it."""

    role: str
    host: str
    port: int
    name: str  # "role=host:port", the label of the metrics
    serving: bool
    active: int


class IntakeReporter:
    """Answers each connection on an intake slot's socket with the process's state."""

    def __init__(
        self,
        sock: socket.socket,
        registry: CollectorRegistry,
        listeners: Callable[[], list[ListenerState]],
    ) -> None:
        self.sock = sock
        self.registry = registry
        self.listeners = listeners
        self.incarnation = f"{os.getpid()}-{time.time_ns()}"

    def answer(self) -> bytes:
        return json.dumps(
            {
                "pid": os.getpid(),
                "incarnation": self.incarnation,
                "metrics": generate_latest(self.registry).decode(),
                "listeners": [
                    [s.role, s.host, s.port, s.name, s.serving, s.active] for s in self.listeners()
                ],
            }
        ).encode()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(self.answer())
            await asyncio.wait_for(writer.drain(), ANSWER_TIMEOUT * 5)
        except (OSError, TimeoutError):  # the asker gave up: nothing to do
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def run(self) -> None:
        """Answer until cancelled."""
        server = await asyncio.start_unix_server(self._answer, sock=self.sock)
        async with server:
            await server.serve_forever()


# --- the delivery side ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """What an intake process answered (:meth:`IntakeReporter.answer`)."""

    pid: int
    incarnation: str  # changes when the slot's child is restarted (a reused pid too)
    metrics: Parsed
    listeners: list[ListenerState]


def read_answer(data: bytes) -> Answer:
    """An intake process's answer; ValueError when ``data`` is not one."""
    try:
        raw: Any = json.loads(data)
        return Answer(
            pid=int(raw["pid"]),
            incarnation=str(raw["incarnation"]),
            metrics=parse(str(raw["metrics"])),
            listeners=[
                ListenerState(str(r), str(h), int(p), str(n), bool(s), int(a))
                for r, h, p, n, s, a in raw["listeners"]
            ],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not an intake process's answer: {exc}") from exc


@dataclass
class _Slot:
    address: str
    totals: SlotTotals = field(default_factory=SlotTotals)
    pid: int = 0
    listeners: list[ListenerState] = field(default_factory=list)
    answering: bool = False


class IntakeView:
    """The delivery process's view of the intake processes, refreshed by :meth:`poll`."""

    def __init__(
        self,
        addresses: dict[int, str],
        *,
        warn: Callable[[str], None],
        timeout: float = ANSWER_TIMEOUT,
    ) -> None:
        self.slots = {slot: _Slot(address) for slot, address in addresses.items()}
        self.warn = warn
        self.timeout = timeout
        self._lock = asyncio.Lock()

    async def _ask(self, address: str) -> bytes:
        # Connected here, not by open_unix_connection(path): uvloop takes an abstract
        # name (a leading NUL) for an empty path and refuses it.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        try:
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return data

    async def _poll_one(self, number: int, slot: _Slot) -> None:
        try:
            answer = read_answer(await asyncio.wait_for(self._ask(slot.address), self.timeout))
        except TimeoutError:
            why = f"no answer within {self.timeout:g}s"
        except (OSError, ValueError) as exc:
            why = f"{type(exc).__name__}: {exc}"
        else:
            slot.totals.update(answer.incarnation, answer.metrics)
            slot.pid, slot.listeners, slot.answering = answer.pid, answer.listeners, True
            return
        slot.answering = False
        who = f"intake process {slot.pid}" if slot.pid else "intake process"
        self.warn(f"{who} (slot {number}) did not answer ({why}); its last known values are used")

    async def poll(self) -> None:
        """Ask every slot at once. A poll already under way serves the callers that
        come meanwhile (they wait for it instead of asking again)."""
        if self._lock.locked():
            async with self._lock:
                return
        async with self._lock:
            await asyncio.gather(*(self._poll_one(n, s) for n, s in self.slots.items()))

    # What the routes read, as of the last poll.

    def render(self, own: CollectorRegistry) -> bytes:
        """``own`` (the delivery process's registry) merged with every slot's counts."""
        others = [slot.totals.contribution() for slot in self.slots.values()]
        return render(merge(parse(generate_latest(own).decode()), others))

    def answering(self) -> tuple[int, int]:
        """How many intake processes answered the last poll, of how many."""
        return sum(slot.answering for slot in self.slots.values()), len(self.slots)

    def listeners(self) -> list[tuple[str, str, int]]:
        """(role, host, port) of each SMTP listener, once (every slot has the same)."""
        seen: dict[tuple[str, str, int], None] = {}
        for slot in self.slots.values():
            for s in slot.listeners:
                seen.setdefault((s.role, s.host, s.port))
        return list(seen)

    def active_connections(self) -> dict[str, int]:
        """Open connections per listener name, summed over the intake processes."""
        active: dict[str, int] = {}
        for slot in self.slots.values():
            for s in slot.listeners:
                active[s.name] = active.get(s.name, 0) + s.active
        return active

    def serving(self) -> list[tuple[str, bool]]:
        """Each listener: serving in every intake process that answered (and in one)."""
        state: dict[str, bool] = {}
        for slot in self.slots.values():
            if slot.answering:
                for s in slot.listeners:
                    state[s.name] = state.get(s.name, True) and s.serving
        return list(state.items())
