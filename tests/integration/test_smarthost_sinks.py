"""Tests of the in-loop SMTP peers in :mod:`peers.asyncsinks`."""

from __future__ import annotations

import aiosmtplib

from peers.asyncsinks import HOST, RawServer, Sink


async def test_sink_records_a_plain_message() -> None:
    async with Sink() as sink:
        client = aiosmtplib.SMTP(hostname=HOST, port=sink.port, start_tls=False)
        await client.connect()
        await client.sendmail("a@example.org", ["b@example.net"], b"Subject: x\r\n\r\nhi\r\n")
        await client.quit()
    assert sink.connections == 1
    [msg] = sink.handler.messages
    assert (msg.mail_from, msg.rcpt_tos, msg.tls) == ("a@example.org", ["b@example.net"], False)
    assert msg.data == b"Subject: x\r\n\r\nhi\r\n"


async def test_raw_server_records_the_wire() -> None:
    async with RawServer() as raw:
        client = aiosmtplib.SMTP(hostname=HOST, port=raw.port, start_tls=False)
        await client.connect()
        await client.sendmail("a@example.org", ["b@example.net"], b"x\r\n")
        await client.quit()
    assert raw.data_chunks == [b"x\r\n.\r\n"]
    assert raw.wire.startswith(b"EHLO ")
