"""Intake limits of a real ``hato serve``, wired from the environment as an operator sets them.

The queue's free space: with ``HATO_QUEUE_MINFREE`` larger than any disk, MAIL is answered
``452 4.3.1`` before the client sends a byte of the message (the SQLite queue's
filesystem is asked); a queue that is not a file (``memory://``) is not checked.

Password guessing spread over client addresses: with ``HATO_AUTH_USER_FAILURE_LIMIT``,
failures against one name from several loopback addresses lock the name (``454 4.7.0``),
for a name that exists and one that does not alike.
"""

from __future__ import annotations

import base64
import smtplib
import ssl
from pathlib import Path

from peers import free_port
from peers.hato import HatoFactory, HatoServe, operator_setup

MORE_THAN_ANY_DISK = str(2**62)


def test_queue_minfree_refuses_at_mail(hato_serve: HatoFactory) -> None:
    serve = hato_serve(env={"HATO_QUEUE_MINFREE": MORE_THAN_ANY_DISK, "HATO_FSYNC": "false"})
    with smtplib.SMTP(serve.host, serve.port, timeout=30) as client:
        client.ehlo("app.test")
        assert client.docmd("MAIL", "FROM:<app@example.com> SIZE=1000") == (
            452,
            b"4.3.1 Insufficient system storage",
        )
        assert client.docmd("MAIL", "FROM:<app@example.com>")[0] == 452
    serve.wait_for_log(r"reject=MAIL from unknown\[127\.0\.0\.1\]: 452 4\.3\.1")
    assert serve.queue_list() == []


def test_queue_minfree_does_not_apply_to_a_memory_queue(hato_serve: HatoFactory) -> None:
    serve = hato_serve(
        env={"HATO_QUEUE_MINFREE": MORE_THAN_ANY_DISK, "HATO_QUEUE_URL": "memory://"}
    )
    with smtplib.SMTP(serve.host, serve.port, timeout=30) as client:
        refused = client.sendmail(
            "app@example.com", ["someone@example.net"], b"Subject: x\r\n\r\nx"
        )
        assert refused == {}


def test_default_minimum_lets_mail_in(hato_serve: HatoFactory) -> None:
    # 1.5 x the 10 MiB size limit: any disk these tests run on has that much free.
    serve = hato_serve(env={"HATO_FSYNC": "false"})
    with smtplib.SMTP(serve.host, serve.port, timeout=30) as client:
        refused = client.sendmail(
            "app@example.com", ["someone@example.net"], b"Subject: x\r\n\r\nx"
        )
        assert refused == {}
    assert len(serve.queue_list()) == 1


def auth_plain(serve: HatoServe, source: str, user: str, password: str) -> tuple[int, bytes]:
    """One AUTH PLAIN on the submissions listener, from the loopback address ``source``."""
    host, port = serve.listeners["submissions"]
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP_SSL(
        host, port, context=tls, timeout=30, source_address=(source, 0)
    ) as client:
        client.ehlo("client.test")
        blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return client.docmd("AUTH", f"PLAIN {blob}")


def test_guessing_from_many_addresses_locks_the_user_name(
    hato_serve: HatoFactory, tmp_path: Path
) -> None:
    data = tmp_path / "relay"
    env = operator_setup(data, {"postfix@dbmx.net": "guide-Secret-42"})
    env.update(
        HATO_LISTEN=f"submissions=127.0.0.1:{free_port()}",
        HATO_DOMAINS="dbmx.net",
        HATO_MYNETWORKS="192.0.2.0/24",
        HATO_FSYNC="false",
        HATO_AUTH_USER_FAILURE_LIMIT="3",
        HATO_AUTH_USER_FAILURE_WINDOW="10m",
    )
    serve = hato_serve(env=env, data_dir=data)
    for user, net in (("postfix@dbmx.net", "127.0.5"), ("nobody@dbmx.net", "127.0.6")):
        codes = [auth_plain(serve, f"{net}.{n}", user, f"guess-{n}")[0] for n in range(1, 6)]
        assert codes == [535, 535, 535, 454, 454], user
    assert auth_plain(serve, "127.0.7.1", "postfix@dbmx.net", "guide-Secret-42")[0] == 454
    assert serve.log.count("SASL login name locked") == 2
