"""DKIM rotation under a running ``hato serve``: it keeps signing with the old key while
the new one is pending, and signs with the new one, without a restart, once ``hato dns
check`` has seen it published."""

from __future__ import annotations

import json
import re
import smtplib
from pathlib import Path

from hato.dkim import generate_key, load_keys
from peers.dns import TestDNS
from peers.hato import HatoFactory, HatoServe

DOMAIN = "example.test"
HOST = "mail.example.test"


def submit_and_selectors(serve: HatoServe, subject: str) -> list[str]:
    """Send one message from a trusted address; the s= of its DKIM signatures."""
    message = (
        f"From: app@{DOMAIN}\r\nTo: someone@example.net\r\nSubject: {subject}\r\n\r\nhello\r\n"
    )
    with smtplib.SMTP(serve.host, serve.port, timeout=10) as client:
        client.sendmail(f"app@{DOMAIN}", ["someone@example.net"], message.encode())
    items = serve.wait_for_queue(
        lambda items: any(subject in json.dumps(serve_show(serve, i["id"])) for i in items),
        what=f"message {subject}",
    )
    for item in items:
        shown = serve_show(serve, item["id"])
        if subject in shown["message"]:
            return re.findall(r"\bs=([A-Za-z0-9_.-]+);", shown["message"])
    raise AssertionError(subject)


def serve_show(serve: HatoServe, message_id: str) -> dict[str, str]:
    shown: dict[str, str] = json.loads(serve.cli("queue", "show", message_id, "--json").stdout)
    return shown


def test_serve_switches_to_the_new_key_once_dns_check_sees_it(
    tmp_path: Path, hato_serve: HatoFactory
) -> None:
    data_dir = tmp_path / "data"
    old = generate_key(DOMAIN, "old", "rsa", directory=data_dir / "dkim", bits=1024)
    with TestDNS() as dns:
        dns.txt(old.name, old.txt)
        env = {"HATO_HOSTNAME": HOST, "HATO_DNS_SERVERS": dns.server, "HATO_FSYNC": "false"}
        serve = hato_serve(env, data_dir=data_dir)
        assert submit_and_selectors(serve, "first") == ["old"]

        rotated = serve.cli("dkim", "rotate", "--domain", DOMAIN, "--bits", "1024")
        [new] = [k for k, st in load_keys(data_dir / "dkim") if st.state.value == "pending"]
        assert new.record.name in rotated.stdout
        mark = serve.mark()
        serve.wait_for_each_process(
            "dkim: keys reloaded; signing with example.test/old", since=mark
        )
        assert submit_and_selectors(serve, "second") == ["old"]  # pending: not yet

        dns.txt(new.record.name, new.record.txt)
        mark = serve.mark()
        check = serve.cli("dns", "check", DOMAIN, "--ip", "192.0.2.25", check=False)
        assert f"; dkim: {DOMAIN} selector {new.selector}: pending -> active" in check.stdout
        serve.wait_for_each_process(
            f"dkim: keys reloaded; signing with example.test/{new.selector}", since=mark
        )
        assert submit_and_selectors(serve, "third") == [new.selector]
