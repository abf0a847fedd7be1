"""Intake limits of a real ``hato serve``, wired from the environment as an operator sets them.

The queue's free space: with ``HATO_QUEUE_MINFREE`` larger than any disk, MAIL is answered
``452 4.3.1`` before the client sends a byte of the message (the SQLite queue's
filesystem is asked); a queue that is not a file (``memory://``) is not checked.
"""

from __future__ import annotations

import smtplib

from peers.hato import HatoFactory

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
