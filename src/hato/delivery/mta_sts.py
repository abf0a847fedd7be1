"""MTA-STS (RFC 8461): the policy a recipient domain publishes for TLS towards its MX hosts.

For a destination domain ``D``:

1. The TXT record of ``_mta-sts.D`` (``v=STSv1; id=...;``) says a policy exists and
   names its version (:func:`parse_record`). Several STSv1 records, or a broken one,
   mean no policy.
2. The policy is fetched from ``https://mta-sts.D/.well-known/mta-sts.txt``
   (:meth:`MTASTS.fetch`) with httpx: the certificate verified against the system's CAs
   plus ``HATO_MX_TLS_CA_FILE``, no redirects, at most 64 KiB, ``text/plain``, bounded
   in time. ``mta-sts.D`` is resolved through Hato's own :class:`~hato.dns.Resolver`
   (never the system's): the connection goes to that address with SNI and ``Host`` set
   to the name. Addresses in private space are refused unless ``allow_private``, as for
   MX hosts. The port is ``HATO_MTA_STS_PORT`` (443; tests change it).
3. The policy text is parsed by :func:`parse_policy` (version ``STSv1``, ``mode``
   ``enforce``/``testing``/``none``, ``mx`` patterns, ``max_age`` at most 31557600).
4. Policies are cached on disk (one JSON file per domain under the data directory) with
   their id and ``max_age``. A cached, unexpired policy is used when the TXT record
   keeps its id, when DNS fails or the record disappears, and when a new policy cannot
   be fetched (RFC 8461 §5.1); one past half its ``max_age`` is refreshed in the
   background, so a policy does not lapse while the domain keeps publishing it.

:func:`mx_matches` is §4.1's matching of an MX host name against a policy's ``mx``
pattern (``*.example.com`` covers exactly one label more). How the courier applies a
policy is :mod:`hato.delivery.mx`'s business.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx

from hato.dns import Resolver, is_private
from hato.errors import DeliveryError, TLSPolicyError
from hato.tlsrpt_types import STS_POLICY_FETCH_ERROR, STS_POLICY_INVALID, STS_WEBPKI_INVALID

STSMode = Literal["enforce", "testing", "none"]
MAX_AGE_LIMIT = 31557600  # RFC 8461 §3.2: one year
MAX_POLICY_BYTES = 64 * 1024  # §3.3: senders may limit the size; 64 KiB is the RFC's example
WELL_KNOWN = "/.well-known/mta-sts.txt"
_ID_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")
_MAX_AGE_RE = re.compile(r"^[0-9]{1,10}$")
_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True, slots=True)
class STSPolicy:
    """A parsed MTA-STS policy; ``id`` is the TXT record's id it was fetched under and
    ``text`` the policy as served (for reports)."""

    mode: STSMode
    mx: tuple[str, ...]
    max_age: int
    id: str = ""
    text: str = ""

    def matches(self, host: str) -> bool:
        """Whether the MX host ``host`` is allowed by one of the ``mx`` patterns."""
        return any(mx_matches(pattern, host) for pattern in self.mx)

    @property
    def lines(self) -> tuple[str, ...]:
        """The policy's lines as TLS-RPT lists them (``policy-string``)."""
        return tuple(line.strip() for line in self.text.splitlines() if line.strip())


def parse_record(values: list[str]) -> str | None:
    """The ``id`` of the single ``v=STSv1`` TXT value among ``values``; None when there
    is none, several, or it is broken (RFC 8461 §3.1: then there is no policy)."""
    records = [v for v in values if re.match(r"^v=STSv1\s*(;|$)", v)]
    if len(records) != 1:
        return None
    fields: dict[str, str] = {}
    for part in records[0].split(";"):
        key, sep, value = part.strip().partition("=")
        if not part.strip():
            continue
        if not sep:
            return None
        fields.setdefault(key.strip(), value.strip())
    policy_id = fields.get("id", "")
    return policy_id if _ID_RE.match(policy_id) else None


def parse_policy(text: str, policy_id: str = "") -> STSPolicy:
    """An :class:`STSPolicy` from the policy file; raises
    :class:`~hato.errors.TLSPolicyError` saying what is wrong (§3.2)."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for raw in re.split(r"\r?\n", text):
        line = raw.strip()
        if not line:
            continue
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise TLSPolicyError(f"MTA-STS policy line {line[:80]!r} is not KEY: VALUE")
        if key == "mx":
            mx.append(_mx_pattern(value))
        else:
            fields.setdefault(key, value)  # the first of a repeated field counts
    if fields.get("version") != "STSv1":
        raise TLSPolicyError(f"MTA-STS policy version {fields.get('version')!r}: need STSv1")
    mode = fields.get("mode", "")
    if mode not in ("enforce", "testing", "none"):
        raise TLSPolicyError(f"MTA-STS policy mode {mode!r}: need enforce, testing or none")
    max_age_text = fields.get("max_age", "")
    if not _MAX_AGE_RE.match(max_age_text) or int(max_age_text) > MAX_AGE_LIMIT:
        raise TLSPolicyError(
            f"MTA-STS policy max_age {max_age_text!r}: need an integer from 0 to {MAX_AGE_LIMIT}"
        )
    if mode != "none" and not mx:
        raise TLSPolicyError(f"MTA-STS policy in mode {mode} lists no mx")
    valid: STSMode = "enforce" if mode == "enforce" else "testing" if mode == "testing" else "none"
    return STSPolicy(valid, tuple(mx), int(max_age_text), policy_id, text)


def _mx_pattern(value: str) -> str:
    pattern = value.lower().rstrip(".")
    name = pattern[2:] if pattern.startswith("*.") else pattern
    labels = name.split(".")
    if len(labels) < 2 or not all(_LABEL_RE.match(label) for label in labels):
        raise TLSPolicyError(f"MTA-STS policy mx {value!r} is not a host name or *.domain")
    return pattern


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: ``host`` equals ``pattern``, or ``pattern`` is ``*.rest`` and
    ``host`` is one label followed by ``rest`` (case-insensitive, trailing dots ignored)."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        first, sep, rest = host.partition(".")
        return bool(first) and bool(sep) and rest == pattern[2:]
    return host == pattern


@dataclass(frozen=True, slots=True)
class STSLookup:
    """What :meth:`MTASTS.policy_for` found: a policy (None when there is none to apply)
    and, when a policy exists but could not be had, the TLS-RPT result type and reason."""

    policy: STSPolicy | None
    error: str = ""
    reason: str = ""


class PolicyFetchError(Exception):
    """A policy could not be fetched or parsed; ``result_type`` for TLS-RPT. Private to
    this package: :class:`MTASTS` turns it into an :class:`STSLookup`."""

    def __init__(self, result_type: str, reason: str) -> None:
        super().__init__(reason)
        self.result_type = result_type
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _Cached:
    policy: STSPolicy
    fetched_at: float

    @property
    def expires_at(self) -> float:
        return self.fetched_at + self.policy.max_age


class PolicyCache:
    """MTA-STS policies on disk: ``DIRECTORY/<domain>.json`` holding the policy text,
    its id, ``max_age`` and when it was fetched. Unreadable files count as absent."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, domain: str) -> Path:
        if not domain or "/" in domain or domain.startswith("."):
            raise ValueError(f"bad domain {domain!r}")
        return self.directory / f"{domain}.json"

    def load(self, domain: str) -> _Cached | None:
        try:
            data = json.loads(self._path(domain).read_text("utf-8"))
            policy = parse_policy(str(data["text"]), str(data["id"]))
            return _Cached(policy, float(data["fetched_at"]))
        except (OSError, ValueError, KeyError, TypeError, TLSPolicyError):
            return None

    def store(self, domain: str, cached: _Cached) -> None:
        data = {
            "domain": domain,
            "id": cached.policy.id,
            "fetched_at": cached.fetched_at,
            "max_age": cached.policy.max_age,
            "expires_at": cached.expires_at,
            "text": cached.policy.text,
        }
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(domain))
        except OSError:
            # A cache that cannot be written costs a fetch next time, never a delivery.
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp)


class MTASTS:
    """Finds, fetches, caches and refreshes MTA-STS policies (see the module docstring).

    ``ca_file`` adds a CA to the system's for the policy fetch; ``port`` is the HTTPS
    port; ``timeout`` bounds one fetch as a whole.
    """

    def __init__(
        self,
        resolver: Resolver,
        *,
        cache_dir: Path,
        port: int = 443,
        ca_file: str | None = None,
        allow_private: bool = False,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.resolver = resolver
        self.cache = PolicyCache(cache_dir)
        self.port = port
        self.allow_private = allow_private
        self.timeout = timeout
        self._clock = clock
        self._context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if ca_file:
            self._context.load_verify_locations(cafile=ca_file)
        self._memory: dict[str, _Cached] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}

    # The courier's question.

    async def policy_for(self, domain: str) -> STSLookup:
        """The policy to apply to mail for ``domain`` now (RFC 8461 §5.1)."""
        domain = domain.lower().rstrip(".")
        now = self._clock()
        cached = self._cached(domain, now)
        try:
            policy_id = parse_record(await self.resolver.txt(f"_mta-sts.{domain}"))
        except DeliveryError:
            policy_id = None  # DNS trouble: a cached policy still holds
        if policy_id is None or (cached is not None and cached.policy.id == policy_id):
            if cached is not None:
                self._refresh_later(domain, cached, now)
                return STSLookup(cached.policy)
            return STSLookup(None)
        try:
            fresh = await self.fetch(domain, policy_id)
        except PolicyFetchError as exc:
            if cached is not None:
                return STSLookup(cached.policy)
            return STSLookup(None, exc.result_type, exc.reason)
        self._keep(domain, _Cached(fresh, now))
        return STSLookup(fresh)

    def _cached(self, domain: str, now: float) -> _Cached | None:
        cached = self._memory.get(domain) or self.cache.load(domain)
        if cached is None or now >= cached.expires_at:
            self._memory.pop(domain, None)
            return None
        self._memory[domain] = cached
        return cached

    def _keep(self, domain: str, cached: _Cached) -> None:
        self._memory[domain] = cached
        self.cache.store(domain, cached)

    def _refresh_later(self, domain: str, cached: _Cached, now: float) -> None:
        """Past half its max_age, fetch the policy again in the background (§10.2)."""
        if now < cached.fetched_at + cached.policy.max_age / 2 or domain in self._refreshing:
            return
        task = asyncio.get_running_loop().create_task(self._refresh(domain))
        self._refreshing[domain] = task
        task.add_done_callback(lambda _t: self._refreshing.pop(domain, None))

    async def _refresh(self, domain: str) -> None:
        try:
            policy_id = parse_record(await self.resolver.txt(f"_mta-sts.{domain}"))
            if policy_id is None:
                return
            fresh = await self.fetch(domain, policy_id)
        except (DeliveryError, PolicyFetchError):
            return  # the cached policy stays until it expires
        self._keep(domain, _Cached(fresh, self._clock()))

    async def refreshed(self) -> None:
        """Wait for the background refreshes under way (tests, shutdown)."""
        while self._refreshing:
            await asyncio.gather(*list(self._refreshing.values()), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._refreshing.values()):
            task.cancel()
        await asyncio.gather(*list(self._refreshing.values()), return_exceptions=True)

    # The fetch.

    async def fetch(self, domain: str, policy_id: str = "") -> STSPolicy:
        """Fetch and parse ``domain``'s policy; raises :class:`PolicyFetchError`."""
        host = f"mta-sts.{domain}"
        try:
            addresses = await self.resolver.addresses(host)
        except DeliveryError as exc:
            raise PolicyFetchError(STS_POLICY_FETCH_ERROR, f"{host}: {exc.reply.text}") from exc
        usable = [ip for ip in addresses if self.allow_private or not is_private(ip)]
        if not usable:
            why = "no address" if not addresses else "only private addresses"
            raise PolicyFetchError(STS_POLICY_FETCH_ERROR, f"{host}: {why}")
        failure: PolicyFetchError | None = None
        for ip in usable:
            try:
                text = await asyncio.wait_for(self._get(host, ip), self.timeout)
            except TimeoutError:
                failure = PolicyFetchError(STS_POLICY_FETCH_ERROR, f"{host}[{ip}]: timed out")
                continue
            except PolicyFetchError as exc:
                failure = exc
                if exc.result_type != STS_POLICY_FETCH_ERROR:
                    break  # the server answered: another address would say the same
                continue
            try:
                return parse_policy(text, policy_id)
            except TLSPolicyError as exc:
                raise PolicyFetchError(STS_POLICY_INVALID, str(exc)) from exc
        assert failure is not None
        raise failure

    async def _get(self, host: str, ip: str) -> str:
        literal = f"[{ip}]" if ":" in ip else ip
        port = "" if self.port == 443 else f":{self.port}"
        url = f"https://{literal}{port}{WELL_KNOWN}"
        where = f"https://{host}{port}{WELL_KNOWN}"
        try:
            async with (
                httpx.AsyncClient(
                    verify=self._context,
                    follow_redirects=False,
                    trust_env=False,
                    timeout=httpx.Timeout(self.timeout),
                ) as client,
                client.stream(
                    "GET",
                    url,
                    headers={"Host": f"{host}{port}", "Accept": "text/plain"},
                    extensions={"sni_hostname": host},
                ) as response,
            ):
                if response.status_code != 200:
                    raise PolicyFetchError(
                        STS_POLICY_FETCH_ERROR,
                        f"{where}: HTTP {response.status_code} (redirects are not followed)",
                    )
                kind = response.headers.get("content-type", "")
                if kind.split(";")[0].strip().lower() != "text/plain":
                    raise PolicyFetchError(
                        STS_POLICY_INVALID, f"{where}: media type {kind!r}, not text/plain"
                    )
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_POLICY_BYTES:
                        raise PolicyFetchError(
                            STS_POLICY_INVALID,
                            f"{where}: policy larger than {MAX_POLICY_BYTES} bytes",
                        )
        except httpx.HTTPError as exc:
            if _cert_problem(exc):
                raise PolicyFetchError(
                    STS_WEBPKI_INVALID, f"{where}: certificate not valid: {_reason(exc)}"
                ) from exc
            raise PolicyFetchError(STS_POLICY_FETCH_ERROR, f"{where}: {_reason(exc)}") from exc
        try:
            return bytes(body).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PolicyFetchError(STS_POLICY_INVALID, f"{where}: not UTF-8") from exc


def _causes(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(out) < 10:
        out.append(seen)
        seen = seen.__cause__ or seen.__context__
    return out


def _cert_problem(exc: BaseException) -> bool:
    return any(isinstance(e, ssl.SSLCertVerificationError) for e in _causes(exc))


def _reason(exc: BaseException) -> str:
    for e in _causes(exc):
        if isinstance(e, ssl.SSLCertVerificationError):
            return str(e.verify_message or e)
    return str(exc) or type(exc).__name__
