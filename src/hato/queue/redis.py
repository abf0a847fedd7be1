"""The Redis queue backend: a hash per message, sorted sets of due and leased ids, Lua scripts.

Layout under the key prefix ``P`` (``?prefix=`` in the URL, default ``hato:``)::

    P m:<id>        hash: sender, rcpts (JSON), data, sum (CRC-32 of data), created, next,
                    attempts, last_reply, owner, until, held, idem, meta (JSON), state,
                    nonce (tells a retried enqueue from an id clash), quarantine_reason
    P due           sorted set: ids waiting for an attempt, scored by next_attempt_at
    P leases        sorted set: ids claimed by a worker, scored by lease_until
    P all           sorted set: every id, scored by created_at (listing, recovery scan)
    P s:<state>     sorted set per state, scored by created_at (counts, listing by state)
    P i:<key>       string: idempotency key -> id (``SET NX`` inside the enqueue script)
    P wake          pub/sub channel: published whenever an id becomes due
    P alive:<owner> string with a short TTL: the lease owner runs (a heartbeat renews it)

Every change that touches more than one key is one Lua script, so a claim, a record or
a release is all-or-nothing and two claimers can never lease the same id. Times come from
the injected clock (passed to the scripts), never from the Redis server, so tests can
drive time.

Durability is the server's: ``enqueue`` returns once Redis has executed the script, which
is on disk only as far as ``appendonly``/``appendfsync`` say (see ``docs/redis.md``).
``?wait_aof=1`` adds ``WAITAOF`` (Redis >= 7.2) after every write so the reply waits for
the local AOF fsync; ``?wait_replicas=N`` waits for N replicas (``WAIT``, or ``WAITAOF``
with ``wait_aof``); ``?wait_timeout=MS`` bounds either wait (default 5000). Records
(delivery outcomes) are bookkeeping: those arriving together go in one pipeline (one
round trip) and are not waited for. At-least-once holds: a record the server loses
leaves its message ``sending`` under the old lease, given back by recovery (the
owner's heartbeat key ends with it) or when it runs out, so the message is delivered
once more, never lost. An ``enqueue(lease_owner=...)`` stores the message leased to a
live owner (heartbeat key first) in the same script, so fresh mail needs no claim.

Commands that meet a broken connection are retried on a new one for about two seconds
(a restart). A retried enqueue is recognised by its nonce and stores nothing twice; a
retried claim whose first reply was lost leaves those messages leased until the lease
ends; a retried record or release whose first run went through returns "not the owner".

One record that cannot be read never stops the rest: a hash whose fields do not decode
(bytes that are not UTF-8, JSON of another shape or too deep for Python, numbers that
are not) is quarantined with the reason, and a key of another type where a hash should
be is set aside; the scripts check what they rely on before they use it, so one such
key cannot fail a whole claim, record or recovery.

Liveness: each lease owner of this process keeps ``P alive:<owner>`` alive with a TTL
(30 s) renewed three times per TTL. When the process dies the key runs out; ``recover``
gives back at once the leases of owners without a key (so within the TTL of a crash,
instead of when the leases end). A clean close deletes the keys.

One Redis primary (optionally with replicas) is supported, not Redis Cluster: the
scripts build their key names from the prefix.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import secrets
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from hato.clock import Clock
from hato.errors import ConfigError, MessageNotFound, QueueError, QueueFullError
from hato.events import DeliveryEvent, EventPage, matches, stamped
from hato.events import decode as decode_event
from hato.events import encode as encode_event
from hato.message import Envelope
from hato.queue.base import (
    MessageState,
    Outcome,
    QuarantineHook,
    RecipientState,
    RecipientStatus,
    RecoveryReport,
    StoredMessage,
    check_enqueue_lease,
    last_reply_of,
    new_message_id,
)

# The most records one pipeline carries.
_MAX_RECORDS = 256

_OUR_PARAMS = ("prefix", "wait_aof", "wait_replicas", "wait_timeout")
_STATES = tuple(s.value for s in MessageState)
# Fields read for listings: everything but the message bytes.
_META_FIELDS = (
    "quarantine_reason",
    "sender",
    "rcpts",
    "created",
    "next",
    "attempts",
    "last_reply",
    "owner",
    "until",
    "idem",
    "meta",
    "state",
)
_RECOVER_BATCH = 500
_STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")


def _stream_after(sid: str, cursor: str) -> bool:
    """Whether stream entry ``sid`` comes after ``cursor`` (both ``ms-seq``)."""
    a, b = sid.split("-"), cursor.split("-")
    return (int(a[0]), int(a[1])) > (int(b[0]), int(b[1]))


_QUARANTINED = MessageState.QUARANTINED.value.encode()

# Shared head of every script: ARGV[1] is always the key prefix.
_PRELUDE = """
local P = ARGV[1]
local function mkey(id) return P .. 'm:' .. id end
local function setstate(id, old, new, created)
  if old == new then return end
  if old then redis.call('ZREM', P .. 's:' .. old, id) end
  -- A damaged 'created' must not stop the script: it only orders the listing.
  redis.call('ZADD', P .. 's:' .. new, tonumber(created) or 0, id)
  redis.call('HSET', mkey(id), 'state', new)
end
local function wake() redis.call('PUBLISH', P .. 'wake', '1') end
-- Delivery events from ARGV[first] on, five per event: event_id, queue_id, envid, time,
-- body (JSON). One copy per event_id (a marker key lives as long as events are kept);
-- the stream orders them, and a list per queue id and per envid finds them.
local EVENT_TTL = 1209600
local function addevents(first)
  local n = 0
  for i = first, #ARGV - 4, 5 do
    if redis.call('SET', P .. 'ev:' .. ARGV[i], '1', 'NX', 'EX', EVENT_TTL) then
      local q, e = ARGV[i + 1], ARGV[i + 2]
      local sid = redis.call('XADD', P .. 'events', '*', 'q', q, 'e', e, 't', ARGV[i + 3],
        'b', ARGV[i + 4])
      redis.call('RPUSH', P .. 'evq:' .. q, sid)
      redis.call('EXPIRE', P .. 'evq:' .. q, EVENT_TTL)
      if e ~= '' then
        redis.call('RPUSH', P .. 'eve:' .. e, sid)
        redis.call('EXPIRE', P .. 'eve:' .. e, EVENT_TTL)
      end
      n = n + 1
    end
  end
  return n
end
local function waiting(attempts)
  if (tonumber(attempts) or 0) > 0 then return 'deferred' end
  return 'queued'
end
-- A key that is not a hash (written by someone else) is no message: every command on
-- a hash would fail on it, so scripts check first.
local function ishash(h) return redis.call('TYPE', h).ok == 'hash' end
local function setaside(id, states)
  -- Out of circulation: the due and lease sets no longer name it; listed as quarantined.
  redis.call('ZREM', P .. 'due', id)
  redis.call('ZREM', P .. 'leases', id)
  for i = 1, #states do redis.call('ZREM', P .. 's:' .. states[i], id) end
  redis.call('ZADD', P .. 's:quarantined', tonumber(redis.call('ZSCORE', P .. 'all', id)) or 0, id)
end
"""

# ARGV: P, id, sender, rcpts, data, sum, created, next, held, idem, meta, state, nonce,
# lease owner ('' = none), lease until, then the accepted events (see addevents). With an
# owner the message is stored leased (state sending, next = until).
# Returns the stored (or, for a known idempotency key, the earlier) id; 0 on an id clash.
_ENQUEUE = """
local id, idem = ARGV[2], ARGV[10]
if idem ~= '' then
  local ik = P .. 'i:' .. idem
  if not redis.call('SET', ik, id, 'NX') then
    return redis.call('GET', ik)
  end
end
local h = mkey(id)
local nonce = redis.call('HGET', h, 'nonce')
if nonce == ARGV[13] then
  -- This very call, retried after its reply was lost: it is stored already.
  return id
elseif nonce then
  -- Another message took this id (same microsecond, same random part): pick again.
  if idem ~= '' then redis.call('DEL', P .. 'i:' .. idem) end
  return 0
end
redis.call('HSET', h, 'sender', ARGV[3], 'rcpts', ARGV[4], 'data', ARGV[5], 'sum', ARGV[6],
  'created', ARGV[7], 'next', ARGV[8], 'attempts', '0', 'last_reply', '', 'owner', '',
  'until', '0', 'held', ARGV[9], 'idem', idem, 'meta', ARGV[11], 'state', ARGV[12],
  'nonce', ARGV[13])
redis.call('ZADD', P .. 'all', ARGV[7], id)
redis.call('ZADD', P .. 's:' .. ARGV[12], ARGV[7], id)
if ARGV[14] ~= '' then
  redis.call('HSET', h, 'owner', ARGV[14], 'until', ARGV[15])
  redis.call('ZADD', P .. 'leases', ARGV[15], id)
elseif ARGV[9] ~= '1' then
  redis.call('ZADD', P .. 'due', ARGV[8], id)
  wake()
end
addevents(16)
return id
"""

# ARGV: P, owner, now, lease_until, limit, states... Returns {rows, damaged}: rows are
# {id, field, value, ...}; damaged are the ids of keys that are not hashes (set aside).
_CLAIM = """
local owner, now, untl, limit = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local due = redis.call('ZRANGEBYSCORE', P .. 'due', '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
local expired = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
local cand = {}
for i = 1, #due, 2 do cand[#cand + 1] = {due[i], tonumber(due[i + 1])} end
for i = 1, #expired, 2 do cand[#cand + 1] = {expired[i], tonumber(expired[i + 1])} end
if #due > 0 and #expired > 0 then
  table.sort(cand, function(a, b) return a[2] < b[2] end)
end
local out, damaged = {}, {}
local states = {}
for i = 6, #ARGV do states[#states + 1] = ARGV[i] end
for i = 1, math.min(limit, #cand) do
  local id = cand[i][1]
  local h = mkey(id)
  redis.call('ZREM', P .. 'due', id)
  if redis.call('EXISTS', h) == 0 then
    redis.call('ZREM', P .. 'leases', id)
  elseif not ishash(h) then
    setaside(id, states)
    damaged[#damaged + 1] = id
  else
    local cur = redis.call('HMGET', h, 'state', 'created')
    redis.call('ZADD', P .. 'leases', untl, id)
    redis.call('HSET', h, 'owner', owner, 'until', untl, 'next', untl)
    setstate(id, cur[1], 'sending', cur[2])
    local row = redis.call('HGETALL', h)
    table.insert(row, 1, id)
    out[#out + 1] = row
  end
end
return {out, damaged}
"""

# ARGV: P, id, owner, now, outcomes JSON, retry_at ('' = none), held ('1'/'0'),
# last_reply ('' = keep), then the attempt's events. Returns the new state; nil when owner does not hold the lease;
# -1 for an outcome naming an unknown recipient; -2 when recipients stay pending without
# retry_at. Both refusals come before any write.
_RECORD = """
local id, owner, now = ARGV[2], ARGV[3], ARGV[4]
local h = mkey(id)
if not ishash(h) then return false end
local cur = redis.call('HMGET', h, 'owner', 'state', 'rcpts', 'attempts', 'created')
if cur[1] ~= owner or cur[2] ~= 'sending' then return false end
local rcpts = cjson.decode(cur[3])
local index = {}
for _, r in ipairs(rcpts) do index[r.a] = true end
local outs = cjson.decode(ARGV[5])
for _, o in ipairs(outs) do
  if not index[o.a] then return -1 end
end
for _, o in ipairs(outs) do
  for _, r in ipairs(rcpts) do
    if r.a == o.a then
      r.s = o.s; r.r = o.r; r.l = o.l; r.n = r.n + 1
    end
  end
end
local pending, failed = false, false
for _, r in ipairs(rcpts) do
  if r.s == 'pending' then pending = true elseif r.s == 'failed' then failed = true end
end
local held = ARGV[7] == '1'
local at = ARGV[6]
if pending and not held and at == '' then return -2 end
if at == '' then at = now end
local enc = '[]'
if #rcpts > 0 then enc = cjson.encode(rcpts) end
redis.call('HSET', h, 'rcpts', enc, 'attempts', (tonumber(cur[4]) or 0) + 1, 'owner', '',
  'until', '0', 'next', at)
if ARGV[8] ~= '' then redis.call('HSET', h, 'last_reply', ARGV[8]) end
redis.call('ZREM', P .. 'leases', id)
local new
if pending and held then
  new = 'held'
  redis.call('HSET', h, 'held', '1')
elseif pending then
  new = 'deferred'
  redis.call('ZADD', P .. 'due', at, id)
  wake()
elseif failed then
  new = 'failed'
else
  new = 'sent'
end
setstate(id, cur[2], new, cur[5])
addevents(9)
return new
"""

# ARGV: P, id, outcomes JSON ({a, r, l} of the failed recipients), then events (see
# addevents). Returns the state after; nil when the message is absent (nothing stored).
_RECORD_BOUNCE = """
local id = ARGV[2]
local h = mkey(id)
if redis.call('EXISTS', h) == 0 then return false end
local state = 'quarantined'
if ishash(h) then
  local cur = redis.call('HMGET', h, 'state', 'rcpts', 'created')
  if not cur[1] then return false end
  state = cur[1]
  local ok, rcpts = pcall(cjson.decode, cur[2] or '')
  if state ~= 'quarantined' and ok and type(rcpts) == 'table' and #rcpts > 0 then
    local changed = false
    for _, o in ipairs(cjson.decode(ARGV[3])) do
      for _, r in ipairs(rcpts) do
        if r.a == o.a and r.s == 'sent' then
          r.s = 'failed'; r.r = o.r; r.l = o.l; changed = true
        end
      end
    end
    if changed then
      redis.call('HSET', h, 'rcpts', cjson.encode(rcpts))
      if state == 'sent' then
        setstate(id, state, 'failed', cur[3])
        state = 'failed'
      end
    end
  end
end
addevents(4)
return state
"""

# ARGV: P, id, owner, now. Returns 1 when released.
_RELEASE = """
local id, owner, now = ARGV[2], ARGV[3], ARGV[4]
local h = mkey(id)
if not ishash(h) then return 0 end
local cur = redis.call('HMGET', h, 'owner', 'state', 'attempts', 'created')
if cur[1] ~= owner or cur[2] ~= 'sending' then return 0 end
redis.call('ZREM', P .. 'leases', id)
redis.call('HSET', h, 'owner', '', 'until', '0', 'next', now)
redis.call('ZADD', P .. 'due', now, id)
setstate(id, cur[2], waiting(cur[3]), cur[4])
wake()
return 1
"""

# ARGV: P, id, now. Returns -1 when absent, 1 when made due, 0 when not requeueable.
_REQUEUE = """
local id, now = ARGV[2], ARGV[3]
local h = mkey(id)
if redis.call('EXISTS', h) == 0 then return -1 end
if not ishash(h) then return 0 end
local cur = redis.call('HMGET', h, 'state', 'attempts', 'created')
if not cur[1] then return -1 end
if cur[1] ~= 'held' and cur[1] ~= 'deferred' and cur[1] ~= 'queued' then return 0 end
redis.call('HSET', h, 'held', '0', 'next', now)
redis.call('ZADD', P .. 'due', now, id)
setstate(id, cur[1], waiting(cur[2]), cur[3])
wake()
return 1
"""

# ARGV: P, then events (see addevents). Returns how many were new.
_ADD_EVENTS = """
return addevents(2)
"""

# ARGV: P, id, states... Returns 0 when absent.
_DELETE = """
local id = ARGV[2]
local h = mkey(id)
local found = redis.call('EXISTS', h)
local idem = found == 1 and ishash(h) and redis.call('HGET', h, 'idem')
if idem and idem ~= '' and redis.call('GET', P .. 'i:' .. idem) == id then
  redis.call('DEL', P .. 'i:' .. idem)
end
redis.call('DEL', h)
redis.call('ZREM', P .. 'due', id)
redis.call('ZREM', P .. 'leases', id)
redis.call('ZREM', P .. 'all', id)
for i = 3, #ARGV do redis.call('ZREM', P .. 's:' .. ARGV[i], id) end
return found
"""

# ARGV: P, now, batch. Expired leases go back to due now; returns how many.
_EXPIRE = """
local now = ARGV[2]
local ids = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  local h = mkey(id)
  redis.call('ZREM', P .. 'leases', id)
  local cur = {}
  if ishash(h) then cur = redis.call('HMGET', h, 'state', 'attempts', 'created') end
  if cur[1] == 'sending' then
    redis.call('HSET', h, 'owner', '', 'until', '0', 'next', now)
    redis.call('ZADD', P .. 'due', now, id)
    setstate(id, cur[1], waiting(cur[2]), cur[3])
  end
end
if #ids > 0 then wake() end
return #ids
"""

# ARGV: P, id, reason, states... Takes the id out of circulation; returns 0 when absent.
_QUARANTINE = """
local id = ARGV[2]
local h = mkey(id)
redis.call('ZREM', P .. 'due', id)
redis.call('ZREM', P .. 'leases', id)
for i = 4, #ARGV do redis.call('ZREM', P .. 's:' .. ARGV[i], id) end
if redis.call('EXISTS', h) == 0 then
  redis.call('ZREM', P .. 'all', id)
  return 0
end
local created = tonumber(redis.call('ZSCORE', P .. 'all', id)) or 0
if ishash(h) then
  redis.call('HSET', h, 'state', 'quarantined', 'owner', '', 'until', '0',
    'quarantine_reason', ARGV[3])
end
redis.call('ZADD', P .. 's:quarantined', created, id)
return 1
"""

# ARGV: P, now, owner, ids... Gives back the leases of ``owner`` (gone) among ``ids``.
_TAKE_OVER = """
local now, owner = ARGV[2], ARGV[3]
local n = 0
for i = 4, #ARGV do
  local id = ARGV[i]
  local h = mkey(id)
  if ishash(h) then
    local cur = redis.call('HMGET', h, 'owner', 'state', 'attempts', 'created')
    if cur[1] == owner and cur[2] == 'sending' then
      redis.call('ZREM', P .. 'leases', id)
      redis.call('HSET', h, 'owner', '', 'until', '0', 'next', now)
      redis.call('ZADD', P .. 'due', now, id)
      setstate(id, cur[2], waiting(cur[3]), cur[4])
      n = n + 1
    end
  end
end
if n > 0 then wake() end
return n
"""


class _Unreadable(ValueError):
    """A stored record that cannot be turned back into a message."""


def _checksum(data: bytes) -> str:
    return f"{zlib.crc32(data):08x}"


def _num(value: float) -> str:
    # repr keeps every bit of a float, so a score read back compares equal.
    return repr(float(value))


def _text(raw: dict[str, bytes], name: str) -> str:
    value = raw.get(name)
    if value is None:
        raise _Unreadable(f"field {name!r} missing")
    try:
        return value.decode()
    except UnicodeDecodeError as exc:
        raise _Unreadable(f"field {name!r} is not UTF-8") from exc


def _float(raw: dict[str, bytes], name: str) -> float:
    try:
        value = float(_text(raw, name))
    except ValueError as exc:
        raise _Unreadable(f"field {name!r} is not a number") from exc
    if not math.isfinite(value):
        raise _Unreadable(f"field {name!r} is not finite")
    return value


def _recipients(text: str) -> list[RecipientStatus]:
    try:
        items = json.loads(text)
        # cjson writes an empty Lua table as {}.
        if items == {}:
            return []
        if not isinstance(items, list):
            raise _Unreadable("recipients are not a list")
        return [
            RecipientStatus(
                address=str(item["a"]),
                state=RecipientState(item["s"]),
                reply=str(item["r"]),
                relay=str(item["l"]),
                attempts=int(item["n"]),
            )
            for item in items
        ]
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise _Unreadable(f"recipients unreadable: {type(exc).__name__}: {exc}") from None


def _decode(message_id: str, raw: dict[str, bytes], *, with_data: bool) -> StoredMessage:
    """Rebuild a message from its hash; raises :class:`_Unreadable` on any damage."""
    data = b""
    if with_data:
        stored = raw.get("data")
        if stored is None:
            raise _Unreadable("message bytes missing")
        if _text(raw, "sum") != _checksum(stored):
            raise _Unreadable("checksum mismatch")
        data = stored
    try:
        meta = json.loads(_text(raw, "meta"))
        state = MessageState(_text(raw, "state"))
        attempts = int(_text(raw, "attempts"))
    except (ValueError, RecursionError) as exc:
        raise _Unreadable(f"{type(exc).__name__}: {exc}") from None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _Unreadable("meta is not a string mapping")
    idem = _text(raw, "idem")
    return StoredMessage(
        id=message_id,
        sender=_text(raw, "sender"),
        recipients=_recipients(_text(raw, "rcpts")),
        data=data,
        state=state,
        created_at=_float(raw, "created"),
        next_attempt_at=_float(raw, "next"),
        attempts=attempts,
        last_reply=_text(raw, "last_reply"),
        lease_owner=_text(raw, "owner"),
        lease_until=_float(raw, "until"),
        idempotency_key=idem or None,
        meta=meta,
    )


def _str(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _str_lenient(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _salvage(message_id: str, raw: dict[str, bytes]) -> StoredMessage:
    """What can still be read of a quarantined record, for the operator to look at."""

    def text(name: str) -> str:
        return raw.get(name, b"").decode(errors="replace")

    def number(name: str) -> float:
        try:
            return _float(raw, name)
        except _Unreadable:
            return 0.0

    try:
        recipients = _recipients(text("rcpts"))
    except _Unreadable:
        recipients = []
    return StoredMessage(
        id=message_id,
        sender=text("sender"),
        recipients=recipients,
        data=raw.get("data", b""),
        state=MessageState.QUARANTINED,
        created_at=number("created"),
        next_attempt_at=number("next"),
        last_reply=f"quarantined: {text('quarantine_reason') or 'the record is unreadable'}",
        idempotency_key=text("idem") or None,
    )


def _as_fields(items: Sequence[bytes]) -> dict[str, bytes]:
    # A field name that is not UTF-8 is none of ours: kept under a name nobody reads.
    return {items[i].decode(errors="replace"): items[i + 1] for i in range(0, len(items) - 1, 2)}


def _id(raw: object) -> tuple[str, bytes]:
    """An id from a sorted set or a script, as text for the caller and as the bytes the
    scripts need (an id that is not UTF-8 is shown escaped, and addressed by its bytes)."""
    value = raw if isinstance(raw, bytes) else str(raw).encode()
    return value.decode(errors="backslashreplace"), value


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True


def _event_args(events: Sequence[DeliveryEvent]) -> list[str]:
    """The events as the scripts take them (see ``addevents``)."""
    return [
        value
        for e in events
        for value in (e.event_id, e.queue_id, e.envid, _num(e.time), encode_event(e))
    ]


class RedisQueue:
    """The :class:`hato.queue.base.Queue` protocol on Redis (redis-py asyncio)."""

    def __init__(self, url: str, *, clock: Clock, owner_ttl: float = 30.0) -> None:
        self.url = url
        self.on_quarantine: QuarantineHook | None = None
        self._clock = clock
        parts = urlsplit(url)
        ours: dict[str, str] = {}
        theirs: list[tuple[str, str]] = []
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name in _OUR_PARAMS:
                ours[name] = value
            else:
                theirs.append((name, value))  # redis-py's own options, passed through
        self._server_url = urlunsplit(parts._replace(query=urlencode(theirs)))
        self.prefix = ours.get("prefix", "hato:")
        if not self.prefix:
            raise ConfigError(f"queue URL {url!r}: prefix must not be empty")
        try:
            self._wait_aof = ours.get("wait_aof", "0") not in ("0", "", "false", "no")
            self._wait_replicas = int(ours.get("wait_replicas", "0"))
            self._wait_timeout_ms = int(ours.get("wait_timeout", "5000"))
        except ValueError as exc:
            raise ConfigError(f"queue URL {url!r}: {exc}") from exc
        if self._wait_replicas < 0 or self._wait_timeout_ms < 0:
            raise ConfigError(f"queue URL {url!r}: wait_replicas and wait_timeout must be >= 0")
        self._client: aioredis.Redis | None = None
        self._listener: asyncio.Task[None] | None = None
        self._work = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._scripts: dict[str, Any] = {}
        # Lease owners of this process, each with a heartbeat key (see the docstring).
        self._owners: set[str] = set()
        self._ttl_ms = max(1, int(owner_ttl * 1000))
        self._heartbeat: asyncio.Task[None] | None = None
        # Records waiting for the next pipeline (see the module docstring).
        self._to_record: list[tuple[tuple[str | bytes | int, ...], asyncio.Future[Any]]] = []
        self._recorder: asyncio.Task[None] | None = None

    # -- plumbing ---------------------------------------------------------------------

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Translate redis-py and socket errors into the hato tree."""
        try:
            yield
        except rexc.ResponseError as exc:
            text = str(exc)
            if text.startswith("OOM") or "maxmemory" in text:
                raise QueueFullError(f"redis queue full while {doing}: {text}") from exc
            raise QueueError(f"redis error while {doing}: {text}") from exc
        except (TimeoutError, rexc.RedisError, OSError) as exc:
            raise QueueError(f"redis unavailable while {doing}: {exc}") from exc

    @property
    def _redis(self) -> aioredis.Redis:
        if self._client is None:
            raise QueueError("redis queue is not open")
        return self._client

    async def _run(self, name: str, *args: str | bytes | int) -> Any:
        client = self._redis  # raises when not open
        return await self._scripts[name](args=(self.prefix, *args), client=client)

    async def _write(self, name: str, *args: str | bytes | int) -> Any:
        """Run a script that changes state, then wait for AOF/replicas if configured.

        The wait must go on the connection that did the write, hence one pipeline.
        """
        if not (self._wait_aof or self._wait_replicas):
            return await self._run(name, *args)
        pipe = self._redis.pipeline(transaction=False)
        await self._scripts[name](args=(self.prefix, *args), client=pipe)
        if self._wait_aof:
            pipe.waitaof(1, self._wait_replicas, self._wait_timeout_ms)
        else:
            pipe.wait(self._wait_replicas, self._wait_timeout_ms)
        result, acked = await pipe.execute()
        self._check_acked(acked)
        return result

    async def _record_grouped(self, *args: str | bytes | int) -> Any:
        """Run the record script in the next pipeline of records; its reply."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._to_record.append((args, future))
        if self._recorder is None or self._recorder.done():
            self._recorder = asyncio.create_task(self._record_groups(), name="hato-redis-record")
        return await future

    async def _record_groups(self) -> None:
        while self._to_record:
            group = self._to_record[:_MAX_RECORDS]
            del self._to_record[:_MAX_RECORDS]
            try:
                pipe = self._redis.pipeline(transaction=False)
                for args, _ in group:
                    await self._scripts["record"](args=(self.prefix, *args), client=pipe)
                replies = await pipe.execute(raise_on_error=False)
            except Exception as exc:
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), reply in zip(group, replies, strict=True):
                if future.done():  # the caller was cancelled
                    continue
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    def _check_acked(self, acked: Any) -> None:
        if self._wait_aof:
            local, replicas = int(acked[0]), int(acked[1])
            if local < 1 or replicas < self._wait_replicas:
                raise QueueError(
                    f"redis did not confirm the write on disk in {self._wait_timeout_ms} ms "
                    f"(local fsync {local}/1, replicas {replicas}/{self._wait_replicas})"
                )
        elif int(acked) < self._wait_replicas:
            raise QueueError(
                f"redis write reached {int(acked)} of {self._wait_replicas} replicas "
                f"in {self._wait_timeout_ms} ms"
            )

    # -- lifecycle --------------------------------------------------------------------

    async def open(self) -> None:
        if self._client is not None:
            return
        try:
            # A bounded pool that makes callers wait for a free connection, so a burst of
            # concurrent enqueues queues up instead of failing ("?max_connections=" and
            # "?timeout=" in the URL override the defaults).
            pool = aioredis.BlockingConnectionPool.from_url(
                self._server_url,
                max_connections=50,
                timeout=20.0,
                decode_responses=False,
                socket_connect_timeout=5.0,
                socket_timeout=30.0,
                # Rides out a server restart: a command that hits a dead connection
                # reconnects and retries for about two seconds before failing.
                retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), retries=8),
                retry_on_error=[rexc.ConnectionError, rexc.TimeoutError],
            )
            client = aioredis.Redis(connection_pool=pool)
        except ValueError as exc:
            raise ConfigError(f"bad redis queue URL {self.url!r}: {exc}") from exc
        scripts = {
            "enqueue": _ENQUEUE,
            "claim": _CLAIM,
            "record": _RECORD,
            "record_bounce": _RECORD_BOUNCE,
            "release": _RELEASE,
            "requeue": _REQUEUE,
            "delete": _DELETE,
            "expire": _EXPIRE,
            "quarantine": _QUARANTINE,
            "take_over": _TAKE_OVER,
            "add_events": _ADD_EVENTS,
        }
        self._scripts = {n: client.register_script(_PRELUDE + s) for n, s in scripts.items()}
        try:
            with self._errors("connecting"):
                await client.ping()
                if self._wait_aof or self._wait_replicas:
                    await self._probe_wait(client)
        except BaseException:
            await client.aclose()
            await pool.aclose()
            raise
        self._client = client
        self._work = asyncio.Event()
        self._subscribed = asyncio.Event()

    async def _probe_wait(self, client: aioredis.Redis) -> None:
        """Fail at start, with a clear reason, if the server cannot give the asked-for wait."""
        if not self._wait_aof:
            return
        try:
            await client.waitaof(1, 0, 1)
        except rexc.ResponseError as exc:
            info = await client.info("server")
            version = info.get("redis_version", "?")
            text = str(exc)
            if "unknown command" in text.lower():
                raise ConfigError(
                    f"queue URL asks for wait_aof but this Redis ({version}) has no WAITAOF: "
                    "it needs Redis >= 7.2; drop wait_aof and use appendfsync always instead "
                    "(see docs/redis.md)"
                ) from exc
            raise ConfigError(
                f"queue URL asks for wait_aof but Redis {version} refuses WAITAOF ({text}); "
                "set appendonly yes (see docs/redis.md)"
            ) from exc

    async def close(self) -> None:
        recorder = self._recorder
        if recorder is not None:
            await asyncio.wait([recorder])  # records in flight finish (or fail) first
        listener, client = self._listener, self._client
        self._listener, self._client = None, None
        if listener is not None:
            listener.cancel()
            with suppress(asyncio.CancelledError):
                await listener
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.cancel()
            with suppress(asyncio.CancelledError):
                await heartbeat
        owners, self._owners = self._owners, set()
        if client is not None and owners:
            # Our leases end with us: without the keys, the next recovery gives them back.
            with suppress(TimeoutError, rexc.RedisError, OSError):
                await client.delete(*(self._alive_key(o) for o in owners))
        if client is not None:
            # Closing connections to a server that is gone has nothing left to do.
            with suppress(rexc.RedisError, OSError):
                await client.aclose()
                await client.connection_pool.aclose()

    # -- writing ----------------------------------------------------------------------

    async def enqueue(
        self,
        envelope: Envelope,
        data: bytes,
        *,
        held: bool = False,
        not_before: float | None = None,
        idempotency_key: str | None = None,
        meta: dict[str, str] | None = None,
        events: Sequence[DeliveryEvent] = (),
        lease_owner: str | None = None,
        lease_seconds: float = 0.0,
    ) -> str:
        if not envelope.recipients:
            raise ValueError("a message needs at least one recipient")
        check_enqueue_lease(
            lease_owner,
            lease_seconds,
            held=held,
            not_before=not_before,
            idempotency_key=idempotency_key,
        )
        if lease_owner is not None:
            # Before the lease is stored: its heartbeat key says the owner runs.
            await self._hold(lease_owner)
        now = self._clock()
        rcpts = [{"a": r, "s": "pending", "r": "", "l": "", "n": 0} for r in envelope.recipients]
        state = MessageState.HELD if held else MessageState.QUEUED
        if lease_owner is not None:
            state = MessageState.SENDING
            not_before = now + lease_seconds
        fixed = (
            envelope.sender,
            json.dumps(rcpts),
            data,
            _checksum(data),
            _num(now),
            _num(now if not_before is None else not_before),
            "1" if held else "0",
            idempotency_key or "",
            json.dumps({**envelope.meta, **(meta or {})}),
            state.value,
            secrets.token_hex(8),
            lease_owner or "",
            _num(not_before) if lease_owner is not None and not_before is not None else "0",
        )
        with self._errors("enqueueing"):
            for _ in range(100):  # a clash needs the same microsecond and 20 random bits
                message_id = new_message_id(lambda: now)
                stored = await self._write(
                    "enqueue", message_id, *fixed, *_event_args(stamped(events, message_id))
                )
                if stored != 0:
                    break
            else:
                raise QueueError("no free message id after 100 tries")
        return _str(stored)

    async def claim(self, *, owner: str, limit: int, lease_seconds: float) -> list[StoredMessage]:
        if limit <= 0:
            return []
        now = self._clock()
        # Before the first lease of this owner: from then on its heartbeat key says the
        # owner runs, for recovery in any other process.
        await self._hold(owner)
        with self._errors("claiming"):
            rows, damaged = await self._write(
                "claim", owner, _num(now), _num(now + lease_seconds), limit, *_STATES
            )
        claimed: list[StoredMessage] = []
        for row in rows:
            message_id, raw_id = _id(row[0])
            try:
                if not _is_utf8(raw_id):
                    raise _Unreadable("id is not valid UTF-8")
                claimed.append(_decode(message_id, _as_fields(row[1:]), with_data=True))
            except _Unreadable as exc:
                await self._quarantine(raw_id, str(exc))
                self._report(message_id, str(exc))
        for raw in damaged:
            self._report(_id(raw)[0], "the record is not a hash")
        return claimed

    def _report(self, message_id: str, reason: str) -> None:
        if self.on_quarantine is not None:
            self.on_quarantine(message_id, reason)

    async def _hold(self, owner: str) -> None:
        """Start ``owner``'s heartbeat key (see the module docstring)."""
        if owner in self._owners:
            return
        with self._errors("starting a heartbeat"):
            await self._redis.set(self._alive_key(owner), b"1", px=self._ttl_ms)
        self._owners.add(owner)
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._beat(), name="hato-redis-heartbeat")

    async def _beat(self) -> None:
        """Refresh every owner's key a few times per TTL; a Redis away is retried."""
        while True:
            await asyncio.sleep(self._ttl_ms / 3000)
            client = self._client
            if client is None:
                return
            pipe = client.pipeline(transaction=False)
            for owner in self._owners:
                pipe.set(self._alive_key(owner), b"1", px=self._ttl_ms)
            with suppress(TimeoutError, rexc.RedisError, OSError):
                await pipe.execute()

    def _alive_key(self, owner: str) -> str:
        return f"{self.prefix}alive:{owner}"

    async def record(
        self,
        message_id: str,
        outcomes: Sequence[Outcome],
        *,
        owner: str,
        retry_at: float | None,
        held: bool = False,
        events: Sequence[DeliveryEvent] = (),
    ) -> MessageState | None:
        # Same rules as base.apply_outcomes, applied by the script: the last outcome per
        # address wins, and last_reply is base.last_reply_of's.
        by_address = {o.address: o for o in outcomes}
        payload = json.dumps(
            [
                {"a": o.address, "s": RecipientState(o.state).value, "r": o.reply, "l": o.relay}
                for o in by_address.values()
            ]
        )
        with self._errors(f"recording {message_id}"):
            new = await self._record_grouped(
                message_id,
                owner,
                _num(self._clock()),
                payload,
                "" if retry_at is None else _num(retry_at),
                "1" if held else "0",
                last_reply_of(outcomes),
                *_event_args(events),
            )
        if new is None:
            return None
        if isinstance(new, int):
            if new == -1:
                unknown = sorted(by_address)
                raise ValueError(f"outcomes for unknown recipients of {message_id}: {unknown}")
            raise ValueError("retry_at is required while recipients stay pending")
        return MessageState(_str(new))

    async def record_bounce(
        self,
        message_id: str,
        outcomes: Sequence[Outcome],
        *,
        events: Sequence[DeliveryEvent] = (),
    ) -> MessageState | None:
        payload = json.dumps(
            [
                {"a": o.address, "r": o.reply, "l": o.relay}
                for o in outcomes
                if o.state is RecipientState.FAILED
            ]
        )
        with self._errors(f"recording a bounce for {message_id}"):
            new = await self._write("record_bounce", message_id, payload, *_event_args(events))
        return None if new is None else MessageState(_str(new))

    async def release(self, message_id: str, *, owner: str) -> None:
        with self._errors(f"releasing {message_id}"):
            await self._write("release", message_id, owner, _num(self._clock()))

    async def requeue(self, message_id: str) -> None:
        with self._errors(f"requeueing {message_id}"):
            found = await self._write("requeue", message_id, _num(self._clock()))
        if int(found) < 0:
            raise MessageNotFound(message_id)

    async def delete(self, message_id: str) -> None:
        with self._errors(f"deleting {message_id}"):
            found = await self._write("delete", message_id, *_STATES)
        if not int(found):
            raise MessageNotFound(message_id)

    async def _quarantine(self, message_id: str | bytes, reason: str) -> bool:
        with self._errors(f"quarantining {_id(message_id)[0]}"):
            return bool(await self._write("quarantine", message_id, reason, *_STATES))

    # -- reading ----------------------------------------------------------------------

    async def get(self, message_id: str) -> StoredMessage:
        try:
            with self._errors(f"reading {message_id}"):
                raw = await self._redis.hgetall(self.prefix + "m:" + message_id)
        except QueueError as exc:
            if "WRONGTYPE" not in str(exc):
                raise
            await self._quarantine(message_id, "the record is not a hash")
            return _salvage(message_id, {"quarantine_reason": b"the record is not a hash"})
        if not raw:
            raise MessageNotFound(message_id)
        fields = {_str_lenient(k): _bytes(v) for k, v in raw.items()}
        if fields.get("state") == _QUARANTINED:
            return _salvage(message_id, fields)
        try:
            return _decode(message_id, fields, with_data=True)
        except _Unreadable as exc:
            await self._quarantine(message_id, str(exc))
            self._report(message_id, str(exc))
            fields["quarantine_reason"] = str(exc).encode()
            return _salvage(message_id, fields)

    async def find(self, idempotency_key: str) -> str | None:
        with self._errors("looking up an idempotency key"):
            found = await self._redis.get(self.prefix + "i:" + idempotency_key)
        return None if found is None else _str(found)

    async def list(
        self, *, states: Sequence[MessageState] | None = None, limit: int = 100
    ) -> list[StoredMessage]:
        if limit <= 0:
            return []
        with self._errors("listing"):
            if states is None:
                ids = list(await self._redis.zrevrange(self.prefix + "all", 0, limit - 1))
            else:
                pipe = self._redis.pipeline(transaction=False)
                for state in states:
                    pipe.zrevrange(
                        self.prefix + "s:" + MessageState(state).value,
                        0,
                        limit - 1,
                        withscores=True,
                    )
                scored = [(float(s), i) for rows in await pipe.execute() for i, s in rows]
                scored.sort(key=lambda item: item[0], reverse=True)
                ids = [i for _, i in scored[:limit]]
            pipe = self._redis.pipeline(transaction=False)
            for raw in ids:
                pipe.hmget(self._key(raw), _META_FIELDS)
            rows = await pipe.execute(raise_on_error=False)
        listed: list[StoredMessage] = []
        for raw, values in zip(ids, rows, strict=True):
            message_id, raw_id = _id(raw)
            if isinstance(values, Exception):  # not a hash
                listed.append(_salvage(message_id, {"quarantine_reason": b"not a hash"}))
                continue
            fields = {
                n: _bytes(v) for n, v in zip(_META_FIELDS, values, strict=True) if v is not None
            }
            if not fields:
                continue  # deleted between the two reads
            try:
                if fields.get("state") == _QUARANTINED:
                    raise _Unreadable("quarantined")
                if not _is_utf8(raw_id):
                    raise _Unreadable("id is not valid UTF-8")
                listed.append(_decode(message_id, fields, with_data=False))
            except _Unreadable:
                # Shown for what it is; claim, get or recover() quarantines it for good.
                listed.append(_salvage(message_id, fields))
        return listed

    def _key(self, raw_id: object) -> bytes:
        return self.prefix.encode() + b"m:" + _bytes(raw_id)

    async def oldest(self) -> dict[MessageState, float]:
        # Each state's sorted set is scored by the creation time.
        with self._errors("reading the oldest messages"):
            pipe = self._redis.pipeline(transaction=False)
            for state in MessageState:
                pipe.zrange(self.prefix + "s:" + state.value, 0, 0, withscores=True)
            firsts = await pipe.execute()
        return {
            state: float(rows[0][1])
            for state, rows in zip(MessageState, firsts, strict=True)
            if rows
        }

    async def ping(self) -> None:
        with self._errors("probing"):
            await self._redis.set(self.prefix + "probe", repr(self._clock()), ex=60)

    async def counts(self) -> dict[MessageState, int]:
        with self._errors("counting"):
            pipe = self._redis.pipeline(transaction=False)
            for state in MessageState:
                pipe.zcard(self.prefix + "s:" + state.value)
            numbers = await pipe.execute()
        return {state: int(n) for state, n in zip(MessageState, numbers, strict=True)}

    # -- recovery and waiting ---------------------------------------------------------

    async def recover(self) -> RecoveryReport:
        report = RecoveryReport()
        now = _num(self._clock())
        with self._errors("recovering"):
            while True:
                moved = int(await self._write("expire", now, _RECOVER_BATCH))
                report.leases_expired += moved
                if moved < _RECOVER_BATCH:
                    break
            report.leases_expired += await self._take_over(now)
            # Every record's fields are checked once at start, a bounded batch at a time
            # (the hot paths never scan). The bytes are not read here: their checksum is
            # checked wherever they are read (claim, get).
            cursor = 0
            while True:
                cursor, batch = await self._redis.zscan(
                    self.prefix + "all", cursor, count=_RECOVER_BATCH
                )
                ids = [raw for raw, _ in batch]
                pipe = self._redis.pipeline(transaction=False)
                for raw in ids:
                    pipe.hmget(self._key(raw), _META_FIELDS)
                    pipe.hexists(self._key(raw), "data")
                rows = await pipe.execute(raise_on_error=False)
                for n, raw in enumerate(ids):
                    message_id, raw_id = _id(raw)
                    values, has_data = rows[2 * n], rows[2 * n + 1]
                    hashed = not isinstance(values, Exception)
                    fields = {
                        k: _bytes(v)
                        for k, v in zip(_META_FIELDS, values if hashed else (), strict=False)
                        if v is not None
                    }
                    if fields.get("state") == _QUARANTINED:
                        report.quarantined.append(message_id)
                        continue
                    try:
                        if not hashed:
                            raise _Unreadable("the record is not a hash")
                        if not _is_utf8(raw_id):
                            raise _Unreadable("id is not valid UTF-8")
                        if not has_data:
                            raise _Unreadable("message bytes missing")
                        _decode(message_id, fields, with_data=False)
                    except _Unreadable as exc:
                        if await self._quarantine(raw_id, str(exc)):
                            report.quarantined.append(message_id)
                if int(cursor) == 0:
                    break
        return report

    async def _take_over(self, now: str) -> int:
        """Give back the leases of owners whose heartbeat key has run out."""
        leased = list(await self._redis.zrange(self.prefix + "leases", 0, -1))
        if not leased:
            return 0
        pipe = self._redis.pipeline(transaction=False)
        for raw in leased:
            pipe.hget(self._key(raw), "owner")
        by_owner: dict[bytes, list[bytes]] = {}
        for raw, owner in zip(leased, await pipe.execute(raise_on_error=False), strict=True):
            if isinstance(owner, bytes) and owner:
                by_owner.setdefault(owner, []).append(_bytes(raw))
        pipe = self._redis.pipeline(transaction=False)
        for owner in by_owner:
            pipe.exists(self.prefix.encode() + b"alive:" + owner)
        taken = 0
        for (owner, ids), alive in zip(by_owner.items(), await pipe.execute(), strict=True):
            if not int(alive):
                taken += int(await self._write("take_over", now, owner, *ids))
        return taken

    # -- delivery events ---------------------------------------------------------------

    async def add_events(self, events: Sequence[DeliveryEvent]) -> int:
        if not events:
            return 0
        with self._errors("storing events"):
            return int(await self._write("add_events", *_event_args(events)))

    async def events(
        self,
        *,
        after: str = "",
        queue_id: str | None = None,
        envid: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> EventPage:
        start = after or "0-0"
        if not _STREAM_ID.fullmatch(start):
            raise QueueError(f"not an event cursor of this queue: {after!r}")
        stream = f"{self.prefix}events"
        with self._errors("reading events"):
            if queue_id is not None or envid is not None:
                # Few events per message: read its list of stream ids, then those entries.
                key = f"{self.prefix}evq:{queue_id}" if queue_id is not None else ""
                key = key or f"{self.prefix}eve:{envid}"
                ids = [_str(i) for i in await self._redis.lrange(key, 0, -1)]
                ids = [i for i in ids if _stream_after(i, start)]
                pipe = self._redis.pipeline(transaction=False)
                for sid in ids:
                    pipe.xrange(stream, sid, sid)
                entries: Any = [e for found in await pipe.execute() for e in found]
                last = ids[-1] if ids else start
            else:
                entries = await self._redis.xrange(stream, f"({start}", "+", count=limit)
                last = _str(entries[-1][0]) if entries else start
        found: list[DeliveryEvent] = []
        cursor = start
        for sid, fields in entries:
            cursor = _str(sid)
            try:
                event = decode_event(fields[b"b"])
            except (KeyError, ValueError, TypeError):
                continue  # a damaged entry is a lost record, never lost mail
            if matches(event, queue_id=queue_id, envid=envid, since=since):
                found.append(event)
                if len(found) >= limit:
                    break
        if len(found) < limit:
            cursor = last if _stream_after(last, cursor) else cursor
        return EventPage(found, cursor)

    async def prune_events(self, before: float) -> int:
        stream = f"{self.prefix}events"
        dropped, start = 0, "-"
        with self._errors("pruning events"):
            while True:
                entries: Any = await self._redis.xrange(stream, start, "+", count=500)
                old: list[bytes] = []
                for sid, fields in entries:
                    try:
                        when = float(fields[b"t"])
                    except (KeyError, ValueError):
                        when = 0.0
                    if when >= before:
                        break
                    old.append(sid)
                if old:
                    dropped += int(await self._redis.xdel(stream, *old))
                if len(old) < len(entries) or len(entries) < 500:
                    return dropped
                start = f"({_str(old[-1])}"

    async def get_cursor(self, name: str) -> str:
        with self._errors("reading a cursor"):
            value: Any = await self._redis.hget(f"{self.prefix}cursors", name)
        return _str(value) if value is not None else ""

    async def set_cursor(self, name: str, value: str) -> None:
        with self._errors("storing a cursor"):
            await self._redis.hset(f"{self.prefix}cursors", name, value)

    async def wait_for_work(self, timeout: float) -> None:
        """Return when a wake-up was published (enqueue, release, requeue, retry from any
        process), when the earliest due time or lease expiry arrives, or after ``timeout``.

        Wake-ups are hints; the due set is the truth. A background task listens on the
        channel, so any number of coroutines may wait at once, and it resubscribes after
        Redis comes back (then wakes everyone, as anything may have changed meanwhile).
        """
        client = self._redis
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(client), name="hato-redis-wake")
        # Only after the server confirmed SUBSCRIBE is no wake-up missed, so the due
        # check below cannot race an enqueue.
        with suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self._subscribed.wait()
        if not self._work.is_set():
            # If Redis is away, wait out the timeout rather than spin.
            with suppress(TimeoutError, rexc.RedisError, OSError):
                deadline = min(deadline, loop.time() + await self._next_due_in())
            with suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._work.wait()
        self._work.clear()

    async def _listen(self, client: aioredis.Redis) -> None:
        """Turn messages on the wake channel into ``self._work``; reconnect forever."""
        backoff, before = 0.05, False
        while True:
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self.prefix + "wake")
                while True:
                    # Bounded, so a quiet channel never meets the socket timeout.
                    msg = await pubsub.get_message(timeout=10.0)
                    if msg is None:
                        continue
                    if msg.get("type") == "subscribe":
                        # A subscription again (here or inside redis-py's reconnect):
                        # wake-ups may have been missed while it was down.
                        if before:
                            self._work.set()
                        self._subscribed.set()
                        backoff, before = 0.05, True
                    elif msg.get("type") == "message":
                        self._work.set()
            except (TimeoutError, rexc.RedisError, OSError):
                self._subscribed.clear()
            finally:
                with suppress(rexc.RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _next_due_in(self) -> float:
        """Seconds until the earliest due time or lease expiry (inf when nothing waits)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.zrange(self.prefix + "due", 0, 0, withscores=True)
        pipe.zrange(self.prefix + "leases", 0, 0, withscores=True)
        scores = [float(s) for rows in await pipe.execute() for _, s in rows]
        if not scores:
            return math.inf
        return max(0.0, min(scores) - self._clock())
