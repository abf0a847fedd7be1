"""The attempt record names the transport policy: the worker's events, the mail log and
``hato queue show`` show ``tls_policy`` and whether the certificate was verified.

The worker runs in-process on an SQLite queue with a scripted courier whose results carry
the hop as an MX session stamps them (the MX courier's own results are tested against real
peers in test_mx_tls_policy.py); ``hato queue show`` runs as a subprocess on that queue.
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
from collections.abc import Sequence
from pathlib import Path

from test_cli import hato

from hato.delivery.base import DeliveryResult, Result
from hato.delivery.router import RouteKind, Router
from hato.dsn_params import DsnRequest
from hato.maillog import MailLog
from hato.message import Envelope
from hato.queue import open_queue
from hato.queue.retry import RetrySchedule
from hato.reply import Reply
from hato.testing import FakeClock, ScriptedCourier
from hato.worker import Worker

MSG = b"From: a@example.org\r\nSubject: t\r\n\r\nbody\r\n"


class PolicyCourier(ScriptedCourier):
    """Answers as an MX session under a transport policy would."""

    def __init__(self, policy: dict[str, tuple[str, bool, str]]) -> None:
        super().__init__(
            "mx",
            lambda r: (
                (Result.OK, Reply(250, "2.0.0", "Ok"))
                if r.startswith("ok")
                else (Result.TEMPORARY, Reply(454, "4.7.5", "TLS failed"))
            ),
        )
        self.policy = policy

    async def deliver(
        self,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        *,
        message_id: str = "",
        dsn: DsnRequest | None = None,
    ) -> list[DeliveryResult]:
        results = await super().deliver(sender, recipients, data, message_id=message_id, dsn=dsn)
        out = []
        for r in results:
            version, verified, policy = self.policy[r.recipient]
            out.append(
                dataclasses.replace(
                    r,
                    relay_host="mx1.example.net" if version else "",
                    relay_ip="192.0.2.1" if version else "",
                    tls_version=version,
                    tls_verified=verified,
                    tls_policy=policy,
                )
            )
        return out


async def test_events_log_and_queue_show_carry_the_tls_policy(tmp_path: Path) -> None:
    clock = FakeClock(1_700_000_000.0)
    queue = open_queue(f"sqlite:///{tmp_path}/queue.db")
    await queue.open()
    out = io.StringIO()
    courier = PolicyCourier(
        {
            "ok-dane@example.net": ("TLSv1.3", True, "dane"),
            "late@example.net": ("", False, "mta-sts-enforce"),
        }
    )
    try:
        worker = Worker(
            queue,
            {RouteKind.MX: courier},  # type: ignore[dict-item]
            Router((), "mx"),
            RetrySchedule(min_delay=60, max_delay=600, max_lifetime=3600),
            MailLog(out, clock=clock),
            hostname="relay.example.org",
            clock=clock,
            rng=random.Random(1),
            bounces=False,
        )
        mid = await queue.enqueue(
            Envelope("a@example.org", ["ok-dane@example.net", "late@example.net"]), MSG
        )
        await worker.run_once()
        events = {e.recipient: e for e in (await queue.events(queue_id=mid)).events}
    finally:
        await queue.close()

    delivered, deferred = events["ok-dane@example.net"], events["late@example.net"]
    assert (delivered.event, delivered.tls_policy, delivered.tls_verified) == (
        "delivered",
        "dane",
        True,
    )
    assert delivered.attempt_record.tls_policy == "dane"
    assert (deferred.event, deferred.tls_policy) == ("deferred", "mta-sts-enforce")

    log = out.getvalue()
    assert (
        "to=<ok-dane@example.net>, relay=mx[192.0.2.1]:25, tls=TLSv1.3 verified=yes policy=dane,"
        in log
    )
    assert (
        "to=<late@example.net>, relay=mx[192.0.2.1]:25, tls=none verified=no policy=mta-sts-enforce,"
        in log
    )

    data_dir = ["--data-dir", str(tmp_path)]
    shown = hato("queue", "show", mid, *data_dir)
    assert shown.returncode == 0, shown.stderr
    assert "tls=TLSv1.3 verified=yes policy=dane" in shown.stdout
    assert "tls=none verified=no policy=mta-sts-enforce" in shown.stdout
    as_json = json.loads(hato("queue", "show", "--json", mid, *data_dir).stdout)
    status = {s["address"]: s for s in as_json["recipient_status"]}
    assert (
        status["ok-dane@example.net"]["tls_policy"],
        status["ok-dane@example.net"]["tls_verified"],
    ) == ("dane", True)
    assert status["late@example.net"]["tls_policy"] == "mta-sts-enforce"


def test_the_json_mail_log_has_separate_fields() -> None:
    out = io.StringIO()
    MailLog(out, json=True, clock=lambda: 0.0).delivery(
        "Q1",
        to="b@example.net",
        relay="mx1[192.0.2.1]:25",
        delay=1.0,
        attempts=1,
        dsn="2.0.0",
        status="sent",
        detail="250 Ok",
        tls=("TLSv1.2", False, "mta-sts-testing"),
    )
    record = json.loads(out.getvalue())
    assert (record["tls"], record["tls_verified"], record["tls_policy"]) == (
        "TLSv1.2",
        False,
        "mta-sts-testing",
    )
