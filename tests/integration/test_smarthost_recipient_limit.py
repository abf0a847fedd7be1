"""A next hop's recipient limit: after ``452 4.5.3``, the rest go in further transactions at once.

Peers: an aiosmtpd sink that takes a few RCPTs per transaction, and Debian's Postfix with
``smtpd_recipient_limit`` relaying to a recording sink. Every recipient is delivered (or
refused) in the one delivery attempt, over one connection.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from hato.delivery.base import Result
from hato.delivery.smarthost import SmarthostConfig, SmarthostCourier
from peers.asyncsinks import HOST, Handler, Sink
from peers.postfix import PostfixInstance
from peers.sinks import RecordingSink

MSG = b"From: a@example.org\r\nTo: list@example.net\r\nSubject: many\r\n\r\nHello all.\r\n"


class LimitedHandler(Handler):
    """Takes at most ``limit`` recipients per transaction, like Postfix's smtpd."""

    def __init__(self, limit: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.limit = limit

    async def handle_RCPT(
        self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if len(envelope.rcpt_tos) >= self.limit:
            self._note(server, session, "RCPT", address)
            return "452 4.5.3 Error: too many recipients"
        return await super().handle_RCPT(server, session, envelope, address, options)


def courier(port: int) -> SmarthostCourier:
    return SmarthostCourier(SmarthostConfig(host=HOST, port=port, tls="none", timeout=30.0))


async def test_the_rest_go_in_further_transactions_on_the_same_connection() -> None:
    handler = LimitedHandler(3, rcpt_replies={"r4@example.net": "550 5.1.1 User unknown"})
    rcpts = [f"r{n}@example.net" for n in range(10)]
    async with Sink(handler) as sink:
        c = courier(sink.port)
        results = await c.deliver("a@example.org", rcpts, MSG)
        await c.close()
    assert [r.recipient for r in results] == rcpts
    assert [r.result for r in results] == [
        Result.PERMANENT if r == "r4@example.net" else Result.OK for r in rcpts
    ]
    assert results[4].reply.text == "User unknown"
    assert [m.rcpt_tos for m in sink.handler.messages] == [
        ["r0@example.net", "r1@example.net", "r2@example.net"],
        ["r3@example.net", "r5@example.net", "r6@example.net"],
        ["r7@example.net", "r8@example.net", "r9@example.net"],
    ]
    assert sink.connections == 1
    assert c.connections_opened == 1
    assert sink.handler.verbs().count("MAIL") == 3
    assert "RSET" not in sink.handler.verbs()


async def test_a_452_for_one_mailbox_is_not_a_limit() -> None:
    handler = Handler(rcpt_replies={"full@example.net": "452 4.2.2 Mailbox full"})
    rcpts = ["ok@example.net", "full@example.net", "ok2@example.net"]
    async with Sink(handler) as sink:
        c = courier(sink.port)
        results = await c.deliver("a@example.org", rcpts, MSG)
        await c.close()
    assert [r.result for r in results] == [Result.OK, Result.TEMPORARY, Result.OK]
    assert [m.rcpt_tos for m in sink.handler.messages] == [["ok@example.net", "ok2@example.net"]]


async def test_a_limit_of_nothing_defers_the_rest() -> None:
    handler = LimitedHandler(0)
    async with Sink(handler) as sink:
        c = courier(sink.port)
        results = await c.deliver("a@example.org", ["x@example.net", "y@example.net"], MSG)
        await c.close()
    assert [r.result for r in results] == [Result.TEMPORARY, Result.TEMPORARY]
    assert {(r.reply.code, r.reply.enhanced) for r in results} == {(452, "4.5.3")}
    assert sink.handler.verbs().count("MAIL") == 1
    assert "DATA" not in sink.handler.verbs()


@pytest.fixture
def limited_postfix(
    postfix_relay_with: Callable[[Mapping[str, str]], PostfixInstance],
) -> PostfixInstance:
    return postfix_relay_with(
        {
            "smtpd_recipient_limit": "4",
            "smtpd_recipient_restrictions": (
                "check_recipient_access inline:{ bad@example.net=REJECT }, "
                "permit_mynetworks, reject"
            ),
        }
    )


async def test_postfix_recipient_limit(
    limited_postfix: PostfixInstance, recording_sink: RecordingSink
) -> None:
    rcpts = [f"u{n:02}@example.net" for n in range(18)]
    rcpts[5] = "bad@example.net"
    c = courier(limited_postfix.port("smtp"))
    results = await c.deliver("a@example.org", rcpts, MSG)
    await c.close()
    assert [r.result for r in results] == [
        Result.PERMANENT if r == "bad@example.net" else Result.OK for r in rcpts
    ]
    assert (results[5].reply.code, results[5].reply.enhanced) == (554, "5.7.1")
    good = sorted(r for r in rcpts if r != "bad@example.net")
    recording_sink.wait_for(
        lambda got: sorted(r for m in got for r in m.rcpt_tos) == good,
        what="every accepted recipient relayed",
    )
    log = limited_postfix.log()
    assert c.connections_opened == 1
    # One SMTP session (the other is the readiness probe, which sends no MAIL) with five
    # transactions: 17 accepted recipients, four at a time.
    assert re.findall(r"disconnect from .* mail=(\d+)", log) == ["5"]
    assert re.findall(r"nrcpt=(\d+)", log) == ["4", "4", "4", "4", "1"]
