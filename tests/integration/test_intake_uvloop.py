"""The listener under uvloop (the ``fast`` extra): STARTTLS, AUTH, implicit TLS, pipelining.

uvloop's transports are not ``asyncio.Transport`` subclasses and its ``start_tls``
delivers decrypted data on its own schedule, so the glue is checked on it too.
"""

from __future__ import annotations

import asyncio
import io
import ssl
from pathlib import Path

import aiosmtplib
import pytest
import trustme

from hato.maillog import MailLog
from hato.queue.memory import MemoryQueue
from hato.smtp.auth import StaticAuthenticator
from hato.smtp.policy import ListenerConfig, ListenerRole, Policy, parse_networks
from hato.smtp.server import start_listener
from hato.smtp.tls import TLSContextProvider

uvloop = pytest.importorskip("uvloop")


def test_intake_under_uvloop(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "c.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    tls = TLSContextProvider(tmp_path / "c.pem", tmp_path / "k.pem")
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)

    async def scenario() -> list[str]:
        queue = MemoryQueue()
        await queue.open()
        log = MailLog(io.StringIO())
        common = dict(queue=queue, authenticator=StaticAuthenticator({"u": "p"}), tls=tls, log=log)
        submission = await start_listener(
            ListenerConfig("127.0.0.1", 0, ListenerRole.SUBMISSION),
            policy=Policy(role=ListenerRole.SUBMISSION),
            **common,  # type: ignore[arg-type]
        )
        submissions = await start_listener(
            ListenerConfig("127.0.0.1", 0, ListenerRole.SUBMISSIONS),
            policy=Policy(role=ListenerRole.SUBMISSIONS),
            **common,  # type: ignore[arg-type]
        )
        plain = await start_listener(
            ListenerConfig("127.0.0.1", 0),
            policy=Policy(mynetworks=parse_networks(["127.0.0.0/8"])),
            **common,  # type: ignore[arg-type]
        )
        try:
            msg = "From: a@example.com\r\nSubject: x\r\n\r\nhi\r\n"
            await aiosmtplib.send(
                msg,
                sender="a@example.com",
                recipients=["b@example.net"],
                hostname="127.0.0.1",
                port=submission.port,
                start_tls=True,
                tls_context=client_tls,
                username="u",
                password="p",
                timeout=10,
            )
            await aiosmtplib.send(
                msg,
                sender="a@example.com",
                recipients=["b@example.net"],
                hostname="127.0.0.1",
                port=submissions.port,
                use_tls=True,
                tls_context=client_tls,
                username="u",
                password="p",
                timeout=10,
            )
            reader, writer = await asyncio.open_connection("127.0.0.1", plain.port)
            writer.write(
                b"HELO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
            )
            await writer.drain()
            writer.write(b"x\r\n.\r\nQUIT\r\n")
            data = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            return [line.decode() for line in data.splitlines()]
        finally:
            for listener in (submission, submissions, plain):
                await listener.aclose(timeout=2)
            assert len(await queue.list()) == 3

    lines = uvloop.run(scenario())
    assert lines[0].startswith("220 ")
    assert lines[-2].startswith("250 2.0.0 Ok: queued as ")
    assert lines[-1] == "221 2.0.0 Bye"
