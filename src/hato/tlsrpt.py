"""TLS-RPT (RFC 8460): what our deliveries saw, the daily reports about it, and the
reports other servers send us.

Outgoing. The MX courier hands one :class:`TLSResult` per delivery attempt to a
:class:`TLSReporter` (``record(result)``); :class:`TLSReportStore` is the one Hato uses.
It keeps counts in daily (UTC) buckets in an SQLite file in the data directory
(``DATA_DIR/tlsrpt.sqlite3``), so a restart loses nothing. Once a day
:func:`send_reports` builds, for each policy domain of the day before, the aggregate
report of RFC 8460 4.4 (:func:`build_report`), gzips it and sends it to every ``rua``
of the domain's ``_smtp._tls`` TXT record (:func:`parse_tlsrpt_record`): a ``mailto:``
as a message enqueued into our own queue, in the form of RFC 8460 5.3
(:func:`report_message`), an ``https:`` as a POST of ``application/tlsrpt+gzip``. A
day and domain is sent once: its report-id is stored with it.

Incoming. :func:`parse_incoming` reads a report from a message sent to our own rua
address (or from a bare ``.json`` / ``.json.gz``), and the store keeps it
(:meth:`TLSReportStore.add_received`) for ``hato tls reports``.

Building a report and reading one are pure functions; the store is the only I/O besides
the sending, which takes its DNS, queue and HTTP client as arguments.
"""

from __future__ import annotations

import datetime
import email
import email.message
import email.policy
import email.utils
import gzip
import io
import json
import secrets
import sqlite3
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from hato.clock import Clock
from hato.errors import DeliveryError, HatoError
from hato.message import Envelope
from hato.tlsrpt_types import (
    SUCCESS,
    TLSResult,
)

STORE_NAME = "tlsrpt.sqlite3"
MEDIA_TYPE = "application/tlsrpt+gzip"
JSON_MEDIA_TYPE = "application/tlsrpt+json"
MAX_REPORT_BYTES = 10 * 1024 * 1024  # an incoming report larger than this is refused
KEEP_DAYS = 35  # results older than this are dropped after their report is due


class TLSReportError(HatoError):
    """A TLS-RPT record, report or report message cannot be read (the message says why)."""


# --- the _smtp._tls record ----------------------------------------------------------------


def parse_tlsrpt_record(txt: str) -> list[str]:
    """The ``rua`` URIs of a ``v=TLSRPTv1; rua=mailto:a@x,https://...`` record (RFC 8460
    3), in order; :class:`TLSReportError` when it is not such a record."""
    fields = [part.strip() for part in txt.split(";")]
    if not fields or fields[0].replace(" ", "") != "v=TLSRPTv1":
        raise TLSReportError(f"not a TLS-RPT record (must start with v=TLSRPTv1): {txt!r}")
    uris: list[str] = []
    for part in fields[1:]:
        name, sep, value = part.partition("=")
        if sep and name.strip().lower() == "rua":
            for uri in value.split(","):
                uri = uri.strip()
                scheme = uri.partition(":")[0].lower()
                if scheme in ("mailto", "https") and len(uri) > len(scheme) + 1:
                    uris.append(uri)
    if not uris:
        raise TLSReportError(f"TLS-RPT record has no mailto: or https: rua: {txt!r}")
    return uris


def tlsrpt_record(rua: Sequence[str]) -> str:
    """The TXT value of ``_smtp._tls.DOMAIN`` for report addresses (``mailto:``/``https:``
    URIs, or bare mail addresses)."""
    uris = [u if u.lower().startswith(("mailto:", "https:")) else f"mailto:{u}" for u in rua]
    return "v=TLSRPTv1; rua=" + ",".join(uris)


def select_tlsrpt_record(txts: Iterable[str]) -> str | None:
    """The one TLS-RPT record among a name's TXT records (none, or more than one: None)."""
    found = [t for t in txts if t.replace(" ", "").startswith("v=TLSRPTv1")]
    return found[0] if len(found) == 1 else None


# --- building a report --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Row:
    policy_type: str
    policy_strings: tuple[str, ...]
    mx_patterns: tuple[str, ...]
    mx_host: str
    result_type: str  # "" for successes
    sending_ip: str
    receiving_ip: str
    receiving_mx_helo: str
    failure_reason_code: str
    count: int


def _day_bounds(day: datetime.date) -> tuple[datetime.datetime, datetime.datetime]:
    start = datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC)
    return start, start + datetime.timedelta(days=1) - datetime.timedelta(seconds=1)


def _iso(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _mx_patterns(
    policy_type: str, strings: Sequence[str], patterns: Sequence[str], hosts: Iterable[str]
) -> list[str]:
    """RFC 8460 4.4 mx-host: the MX patterns of an MTA-STS policy, else the MX hosts."""
    if patterns:
        return list(patterns)
    if policy_type == "sts":
        patterns = [
            s.partition(":")[2].strip()
            for s in strings
            if s.partition(":")[0].strip().lower() == "mx"
        ]
        if patterns:
            return patterns
    return sorted({h for h in hosts if h})


def build_report(
    *,
    domain: str,
    day: datetime.date,
    rows: Sequence[_Row],
    organization: str,
    contact: str,
    report_id: str,
) -> dict[str, Any]:
    """The RFC 8460 4.4 aggregate report of one policy domain for one UTC day."""
    start, end = _day_bounds(day)
    groups: dict[tuple[str, tuple[str, ...], tuple[str, ...]], list[_Row]] = {}
    for row in rows:
        groups.setdefault((row.policy_type, row.policy_strings, row.mx_patterns), []).append(row)
    policies: list[dict[str, Any]] = []
    for (policy_type, strings, patterns), members in sorted(groups.items()):
        policy: dict[str, Any] = {"policy-type": policy_type, "policy-domain": domain}
        if strings:
            policy["policy-string"] = list(strings)
        mx = _mx_patterns(policy_type, strings, patterns, (r.mx_host for r in members))
        if mx:
            policy["mx-host"] = mx
        failures: dict[tuple[str, ...], int] = {}
        for row in members:
            if row.result_type:
                key = (
                    row.result_type,
                    row.sending_ip,
                    row.receiving_ip,
                    row.mx_host,
                    row.receiving_mx_helo,
                    row.failure_reason_code,
                )
                failures[key] = failures.get(key, 0) + row.count
        ok = sum(r.count for r in members if not r.result_type)
        entry: dict[str, Any] = {
            "policy": policy,
            "summary": {
                "total-successful-session-count": ok,
                "total-failure-session-count": sum(failures.values()),
            },
        }
        details = []
        for (result, sending, receiving, mx_host, helo, code), count in sorted(failures.items()):
            detail: dict[str, Any] = {"result-type": result}
            if sending:
                detail["sending-mta-ip"] = sending
            if receiving:
                detail["receiving-ip"] = receiving
            if mx_host:
                detail["receiving-mx-hostname"] = mx_host
            if helo:
                detail["receiving-mx-helo"] = helo
            detail["failed-session-count"] = count
            if code:
                detail["failure-reason-code"] = code
            details.append(detail)
        if details:
            entry["failure-details"] = details
        policies.append(entry)
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": _iso(start), "end-datetime": _iso(end)},
        "contact-info": contact,
        "report-id": report_id,
        "policies": policies,
    }


def report_filename(submitter: str, domain: str, day: datetime.date, unique: str = "") -> str:
    """RFC 8460 5.1: ``submitter!domain!begin!end[!unique].json.gz`` (epoch seconds)."""
    start, end = _day_bounds(day)
    parts = [submitter, domain, str(int(start.timestamp())), str(int(end.timestamp()))]
    if unique:
        parts.append(unique)
    return "!".join(parts) + ".json.gz"


def gzip_report(report: dict[str, Any]) -> bytes:
    # mtime=0: the same report gzips to the same bytes (a resend is byte-identical).
    return gzip.compress(json.dumps(report, indent=1).encode("utf-8"), mtime=0)


def report_message(
    *,
    report: dict[str, Any],
    gzipped: bytes,
    domain: str,
    submitter: str,
    sender: str,
    recipient: str,
    day: datetime.date,
    now: float,
) -> bytes:
    """The report as a message (RFC 8460 5.3): multipart/report; report-type=tlsrpt with
    a text part and the gzipped JSON as ``application/tlsrpt+gzip``."""
    report_id = str(report["report-id"])
    msg = email.message.EmailMessage(policy=email.policy.SMTP)
    msg["From"] = sender
    msg["To"] = recipient
    msg["Date"] = email.utils.formatdate(now)
    msg["Message-ID"] = email.utils.make_msgid("tlsrpt", domain=submitter)
    msg["Subject"] = f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{report_id}>"
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = submitter
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(
        f"This is an aggregate TLS report (RFC 8460) from {submitter} for {domain}, "
        f"{report['date-range']['start-datetime']} to {report['date-range']['end-datetime']}.\n",
        charset="us-ascii",
        cte="7bit",
    )
    msg.add_attachment(
        gzipped,
        maintype="application",
        subtype="tlsrpt+gzip",
        filename=report_filename(submitter, domain, day),
    )
    msg.replace_header("Content-Type", "multipart/report")
    msg.set_param("report-type", "tlsrpt")
    return msg.as_bytes()


# --- reading a report ---------------------------------------------------------------------


def _decode_report(data: bytes) -> dict[str, Any]:
    if data[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as fh:
                data = fh.read(MAX_REPORT_BYTES + 1)
        except (OSError, EOFError) as exc:
            raise TLSReportError(f"report is not valid gzip: {exc}") from None
        if len(data) > MAX_REPORT_BYTES:
            raise TLSReportError("report is larger than 10 MiB uncompressed")
    try:
        report = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise TLSReportError(f"report is not JSON: {exc}") from None
    if not isinstance(report, dict):
        raise TLSReportError("report is not a JSON object")
    for name in ("organization-name", "date-range", "report-id", "policies"):
        if name not in report:
            raise TLSReportError(f"report lacks {name!r}")
    if not isinstance(report["policies"], list) or not isinstance(report["date-range"], dict):
        raise TLSReportError("report's policies or date-range have the wrong type")
    return report


def parse_incoming(data: bytes) -> dict[str, Any]:
    """The report in a TLS-RPT message (its ``application/tlsrpt+gzip`` or ``+json``
    part), or in bare JSON / gzipped JSON; :class:`TLSReportError` when there is none."""
    if data[:2] == b"\x1f\x8b" or data.lstrip()[:1] == b"{":
        return _decode_report(data)
    msg = email.message_from_bytes(data, policy=email.policy.default)
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype in (MEDIA_TYPE, JSON_MEDIA_TYPE) or (
            ctype in ("application/gzip", "application/octet-stream")
            and str(part.get_filename() or "").endswith(".json.gz")
        ):
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                return _decode_report(payload)
    raise TLSReportError("message holds no application/tlsrpt+gzip or +json part")


@dataclass(frozen=True, slots=True)
class ReceivedSummary:
    """One policy of a received report, as ``hato tls reports`` shows it."""

    organization: str
    report_id: str
    start: str
    end: str
    policy_type: str
    policy_domain: str
    successful: int
    failed: int
    failure_details: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "organization-name": self.organization,
            "report-id": self.report_id,
            "start-datetime": self.start,
            "end-datetime": self.end,
            "policy-type": self.policy_type,
            "policy-domain": self.policy_domain,
            "total-successful-session-count": self.successful,
            "total-failure-session-count": self.failed,
            "failure-details": self.failure_details,
        }


def summarize(report: dict[str, Any]) -> list[ReceivedSummary]:
    """One :class:`ReceivedSummary` per policy of a report."""
    out = []
    dates = report.get("date-range", {})
    for entry in report.get("policies", []):
        if not isinstance(entry, dict):
            continue
        policy = entry.get("policy", {}) or {}
        summary = entry.get("summary", {}) or {}
        details = entry.get("failure-details", []) or []
        out.append(
            ReceivedSummary(
                organization=str(report.get("organization-name", "")),
                report_id=str(report.get("report-id", "")),
                start=str(dates.get("start-datetime", "")),
                end=str(dates.get("end-datetime", "")),
                policy_type=str(policy.get("policy-type", "")),
                policy_domain=str(policy.get("policy-domain", "")),
                successful=int(summary.get("total-successful-session-count", 0) or 0),
                failed=int(summary.get("total-failure-session-count", 0) or 0),
                failure_details=[d for d in details if isinstance(d, dict)],
            )
        )
    return out


# --- the store ----------------------------------------------------------------------------


_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    day TEXT NOT NULL,
    policy_domain TEXT NOT NULL,
    policy_type TEXT NOT NULL,
    policy_strings TEXT NOT NULL,
    mx_patterns TEXT NOT NULL,
    mx_host TEXT NOT NULL,
    result_type TEXT NOT NULL,
    sending_ip TEXT NOT NULL,
    receiving_ip TEXT NOT NULL,
    receiving_mx_helo TEXT NOT NULL,
    failure_reason_code TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (day, policy_domain, policy_type, policy_strings, mx_patterns, mx_host,
                 result_type,
                 sending_ip, receiving_ip, receiving_mx_helo, failure_reason_code)
);
CREATE TABLE IF NOT EXISTS sent (
    day TEXT NOT NULL,
    policy_domain TEXT NOT NULL,
    report_id TEXT NOT NULL,
    status TEXT NOT NULL,
    detail TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (day, policy_domain)
);
CREATE TABLE IF NOT EXISTS imported (
    name TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS received (
    report_id TEXT NOT NULL,
    organization TEXT NOT NULL,
    start TEXT NOT NULL,
    end TEXT NOT NULL,
    report TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (organization, report_id)
);
"""


def _utc_day(moment: float) -> datetime.date:
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).date()


class TLSReportStore:
    """TLS results in daily buckets, the reports sent, and the reports received, in one
    SQLite file. Thread-safe: the courier records from the event loop, the CLI and the
    daily task read from threads."""

    def __init__(self, path: Path, *, clock: Clock) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self.errors = 0  # results that could not be counted (the disk, say)
        self.last_error = ""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise TLSReportError(f"cannot open the TLS-RPT store {self.path}: {exc}") from None

    @classmethod
    def in_data_dir(cls, data_dir: Path, *, clock: Clock) -> TLSReportStore:
        return cls(Path(data_dir) / STORE_NAME, clock=clock)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _execute(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise TLSReportError(f"TLS-RPT store {self.path}: {exc}") from None

    def record(self, result: TLSResult) -> None:
        """Count one attempt in its day's (UTC) bucket of its policy domain. Never raises:
        it runs inline with delivery, and a lost count must not cost a delivery."""
        failed = result.result_type != SUCCESS
        moment = result.time or self._clock()
        try:
            self._execute(
                "INSERT INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,1) ON CONFLICT DO UPDATE "
                "SET count = count + 1",
                (
                    _utc_day(moment).isoformat(),
                    result.policy_domain.lower().rstrip("."),
                    result.policy_type,
                    json.dumps(list(result.policy_strings)),
                    json.dumps(list(result.mx_host_patterns)),
                    result.mx_host.lower().rstrip("."),
                    result.result_type if failed else "",
                    result.sending_ip if failed else "",
                    result.receiving_ip if failed else "",
                    str(getattr(result, "receiving_mx_helo", "")) if failed else "",
                    result.failure_reason if failed else "",
                ),
            )
        except TLSReportError as exc:
            self.errors += 1
            self.last_error = str(exc)

    def domains(self, day: datetime.date) -> list[str]:
        rows = self._execute(
            "SELECT DISTINCT policy_domain FROM results WHERE day = ? ORDER BY 1",
            (day.isoformat(),),
        )
        return [r[0] for r in rows]

    def days_pending(self, before: datetime.date) -> list[datetime.date]:
        """Days before ``before`` with results and no report decided yet, oldest first."""
        rows = self._execute(
            "SELECT DISTINCT r.day FROM results r WHERE r.day < ? AND NOT EXISTS "
            "(SELECT 1 FROM sent s WHERE s.day = r.day AND s.policy_domain = r.policy_domain) "
            "ORDER BY 1",
            (before.isoformat(),),
        )
        return [datetime.date.fromisoformat(r[0]) for r in rows]

    def rows(self, day: datetime.date, domain: str) -> list[_Row]:
        found = self._execute(
            "SELECT policy_type, policy_strings, mx_patterns, mx_host, result_type, "
            "sending_ip, receiving_ip, receiving_mx_helo, failure_reason_code, count "
            "FROM results WHERE day = ? AND policy_domain = ?",
            (day.isoformat(), domain),
        )
        return [
            _Row(
                r[0],
                tuple(json.loads(r[1])),
                tuple(json.loads(r[2])),
                r[3],
                r[4],
                r[5],
                r[6],
                r[7],
                r[8],
                int(r[9]),
            )
            for r in found
        ]

    def report_id(self, day: datetime.date, domain: str, submitter: str) -> str:
        """The report-id of a day and domain: made once, kept (a resend reuses it)."""
        found = self._execute(
            "SELECT report_id FROM sent WHERE day = ? AND policy_domain = ?",
            (day.isoformat(), domain),
        )
        if found:
            return str(found[0][0])
        report_id = f"{day.isoformat()}.{secrets.token_hex(6)}.{domain}@{submitter}"
        self._execute(
            "INSERT INTO sent VALUES (?,?,?,'pending','',?) ON CONFLICT DO NOTHING",
            (day.isoformat(), domain, report_id, self._clock()),
        )
        found = self._execute(
            "SELECT report_id FROM sent WHERE day = ? AND policy_domain = ?",
            (day.isoformat(), domain),
        )
        return str(found[0][0])

    def sent_status(self, day: datetime.date, domain: str) -> tuple[str, str] | None:
        found = self._execute(
            "SELECT status, detail FROM sent WHERE day = ? AND policy_domain = ?",
            (day.isoformat(), domain),
        )
        return (str(found[0][0]), str(found[0][1])) if found else None

    def mark(self, day: datetime.date, domain: str, status: str, detail: str) -> None:
        self._execute(
            "UPDATE sent SET status = ?, detail = ?, at = ? WHERE day = ? AND policy_domain = ?",
            (status, detail, self._clock(), day.isoformat(), domain),
        )

    def prune(self, keep_days: int = KEEP_DAYS) -> None:
        """Drop results and send records older than ``keep_days``."""
        cutoff = (_utc_day(self._clock()) - datetime.timedelta(days=keep_days)).isoformat()
        self._execute("DELETE FROM results WHERE day < ?", (cutoff,))
        self._execute("DELETE FROM sent WHERE day < ?", (cutoff,))

    # Incoming reports.

    def add_received(self, report: dict[str, Any]) -> bool:
        """Keep a received report; False when the same organization's report-id is
        already kept (reporters resend)."""
        dates = report.get("date-range", {})
        with self._lock:
            try:
                cursor = self._db.execute(
                    "INSERT INTO received VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                    (
                        str(report.get("report-id", "")),
                        str(report.get("organization-name", "")),
                        str(dates.get("start-datetime", "")),
                        str(dates.get("end-datetime", "")),
                        json.dumps(report),
                        self._clock(),
                    ),
                )
            except sqlite3.Error as exc:
                raise TLSReportError(f"TLS-RPT store {self.path}: {exc}") from None
            return cursor.rowcount > 0

    def seen(self, name: str) -> bool:
        return bool(self._execute("SELECT 1 FROM imported WHERE name = ?", (name,)))

    def remember(self, name: str) -> None:
        self._execute("INSERT INTO imported VALUES (?) ON CONFLICT DO NOTHING", (name,))

    def received(self) -> list[dict[str, Any]]:
        """The kept reports, newest period first."""
        rows = self._execute("SELECT report FROM received ORDER BY start DESC, organization")
        return [json.loads(r[0]) for r in rows]


def maildir_files(maildir: Path) -> list[Path]:
    """The messages of a Maildir (``new/`` and ``cur/``), oldest name first."""
    out: list[Path] = []
    for sub in ("new", "cur"):
        try:
            out.extend(p for p in (maildir / sub).iterdir() if p.is_file())
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise TLSReportError(f"cannot read {maildir / sub}: {exc.strerror}") from None
    return sorted(out, key=lambda p: p.name)


@dataclass(frozen=True, slots=True)
class ImportOutcome:
    added: int
    duplicates: int
    skipped: list[str]  # files that hold no report, with why


def import_reports(store: TLSReportStore, files: Iterable[Path]) -> ImportOutcome:
    """Read the reports in ``files`` (messages, ``.json``, ``.json.gz``) into the store.
    A Maildir message is read once: its name (the part before ``:2,``) is remembered,
    whatever it held, so later runs skip it."""
    added = duplicates = 0
    skipped: list[str] = []
    for path in files:
        key = f"{path.parent.parent}/{path.name.split(':2,', 1)[0]}"
        if path.parent.name in ("new", "cur") and store.seen(key):
            continue
        try:
            with path.open("rb") as fh:
                data = fh.read(MAX_REPORT_BYTES * 2)  # a report message is far smaller
        except OSError as exc:
            skipped.append(f"{path}: {exc.strerror}")
            continue
        try:
            report = parse_incoming(data)
        except TLSReportError as exc:
            skipped.append(f"{path}: {exc}")
        else:
            if store.add_received(report):
                added += 1
            else:
                duplicates += 1
        if path.parent.name in ("new", "cur"):
            store.remember(key)
    return ImportOutcome(added, duplicates, skipped)


# --- sending ------------------------------------------------------------------------------


TxtLookup = Callable[[str], Awaitable[list[str]]]
Enqueue = Callable[[Envelope, bytes, str], Awaitable[str]]
Sign = Callable[[bytes], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class ReportConfig:
    """Who we say we are in the reports we send."""

    organization: str  # organization-name
    contact: str  # contact-info
    submitter: str  # our host name (TLS-Report-Submitter)
    sender: str  # the From and envelope sender of report messages


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """What happened to one day's report of one domain."""

    domain: str
    day: datetime.date
    status: str  # sent, partial, failed, no-record, empty
    report_id: str
    detail: str


async def _post(
    url: str, body: bytes, verify: ssl.SSLContext | bool, timeout: float
) -> tuple[bool, str]:
    try:
        async with httpx.AsyncClient(verify=verify, timeout=timeout, follow_redirects=False) as c:
            response = await c.post(url, content=body, headers={"Content-Type": MEDIA_TYPE})
    except httpx.HTTPError as exc:
        return False, f"{url}: {type(exc).__name__}: {exc}"
    if 200 <= response.status_code < 300:
        return True, f"{url}: HTTP {response.status_code}"
    return False, f"{url}: HTTP {response.status_code}"


async def send_report(
    store: TLSReportStore,
    config: ReportConfig,
    domain: str,
    day: datetime.date,
    *,
    txt: TxtLookup,
    enqueue: Enqueue,
    sign: Sign | None = None,
    verify: ssl.SSLContext | bool = True,
    http_timeout: float = 30.0,
    now: float,
) -> SendOutcome:
    """Build and send the report of ``domain`` for ``day`` to the rua of its
    ``_smtp._tls`` record; records the outcome in the store."""
    rows = store.rows(day, domain)
    if not rows:
        return SendOutcome(domain, day, "empty", "", "no results that day")
    report_id = store.report_id(day, domain, config.submitter)
    try:
        record = select_tlsrpt_record(await txt(f"_smtp._tls.{domain}"))
    except DeliveryError as exc:
        return SendOutcome(domain, day, "failed", report_id, f"DNS: {exc.reply}")
    if record is None:
        store.mark(day, domain, "no-record", f"no single TLS-RPT record at _smtp._tls.{domain}")
        return SendOutcome(domain, day, "no-record", report_id, "no TLS-RPT record")
    try:
        uris = parse_tlsrpt_record(record)
    except TLSReportError as exc:
        store.mark(day, domain, "no-record", str(exc))
        return SendOutcome(domain, day, "no-record", report_id, str(exc))
    report = build_report(
        domain=domain,
        day=day,
        rows=rows,
        organization=config.organization,
        contact=config.contact,
        report_id=report_id,
    )
    gzipped = gzip_report(report)
    done: list[str] = []
    failed: list[str] = []
    for uri in uris:
        scheme, _, rest = uri.partition(":")
        if scheme.lower() == "mailto":
            address = rest.split("?", 1)[0].split("!", 1)[0].strip()
            message = report_message(
                report=report,
                gzipped=gzipped,
                domain=domain,
                submitter=config.submitter,
                sender=config.sender,
                recipient=address,
                day=day,
                now=now,
            )
            if sign is not None:
                message = await sign(message)
            try:
                queue_id = await enqueue(
                    Envelope(config.sender, [address]), message, f"tlsrpt:{report_id}:{address}"
                )
            except HatoError as exc:
                failed.append(f"{uri}: {exc}")
            else:
                done.append(f"{uri}: queued as {queue_id}")
        else:
            ok, detail = await _post(uri, gzipped, verify, http_timeout)
            (done if ok else failed).append(detail)
    status = "sent" if not failed else ("partial" if done else "failed")
    detail = "; ".join(done + failed)
    if status != "failed":
        store.mark(day, domain, status, detail)
    return SendOutcome(domain, day, status, report_id, detail)


async def send_reports(
    store: TLSReportStore,
    config: ReportConfig,
    *,
    txt: TxtLookup,
    enqueue: Enqueue,
    sign: Sign | None = None,
    verify: ssl.SSLContext | bool = True,
    now: float,
    day: datetime.date | None = None,
    force: bool = False,
) -> list[SendOutcome]:
    """Send the reports of ``day`` (default: every finished day not yet reported).
    A day and domain already sent is skipped unless ``force``."""
    days = [day] if day is not None else store.days_pending(_utc_day(now))
    outcomes = []
    for each in days:
        for domain in store.domains(each):
            state = store.sent_status(each, domain)
            if state is not None and state[0] in ("sent", "partial", "no-record") and not force:
                continue
            outcomes.append(
                await send_report(
                    store,
                    config,
                    domain,
                    each,
                    txt=txt,
                    enqueue=enqueue,
                    sign=sign,
                    verify=verify,
                    now=now,
                )
            )
    return outcomes


def seconds_until_next_run(now: float, *, minute: int = 15) -> float:
    """Seconds from ``now`` to 00:MM UTC of the next day (reports go out once a day)."""
    moment = datetime.datetime.fromtimestamp(now, datetime.UTC)
    next_day = (moment + datetime.timedelta(days=1)).date()
    target = datetime.datetime(
        next_day.year, next_day.month, next_day.day, 0, minute, tzinfo=datetime.UTC
    )
    return max(1.0, (target - moment).total_seconds())
