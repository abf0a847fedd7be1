"""``hato dkim rotate`` as an operator runs it: the new key waits until the test DNS
publishes it, ``hato dns check`` switches to it, and ``hato serve``'s watch does too."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from hato.app import build_dkim_rotation_task
from hato.config import load_settings
from hato.dkim import (
    DKIMKeys,
    KeyState,
    KeyStatus,
    generate_key,
    load_keys,
    read_states,
    rotate_key,
    write_states,
)
from hato.maillog import MailLog
from peers.dns import TestDNS

SRC = str(Path(__file__).resolve().parents[2] / "src")
DOMAIN = "example.test"
HOST = "mail.example.test"


def hato(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HATO_", "RELAYHOST"))}
    full_env["PYTHONPATH"] = SRC + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "hato", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def states(dkim_dir: Path) -> dict[str, str]:
    return {k.selector: st.state.value for k, st in load_keys(dkim_dir)}


def test_rotate_then_check_switches_once_published(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    old = generate_key(DOMAIN, "old", "rsa", directory=data_dir / "dkim", bits=1024)
    with TestDNS() as dns:
        dns.txt(old.name, old.txt)
        env = {
            "HATO_DATA_DIR": str(data_dir),
            "HATO_DNS_SERVERS": dns.server,
            "HATO_HOSTNAME": HOST,
        }
        rotated = hato("dkim", "rotate", "--domain", DOMAIN, "--bits", "1024", env=env)
        assert rotated.returncode == 0, rotated.stderr
        [new] = [k for k, st in load_keys(data_dir / "dkim") if st.state.value == "pending"]
        assert f"{new.record.name}. IN TXT" in rotated.stdout
        assert f"hato dns check {DOMAIN}" in rotated.stdout
        assert "7 days" in rotated.stdout

        again = hato("dkim", "rotate", "--domain", DOMAIN, env=env)
        assert again.returncode == 2
        assert "under way" in again.stderr

        # Not published yet: the check says so and nothing switches.
        check = hato("dns", "check", DOMAIN, "--ip", "192.0.2.25", env=env)
        assert f"missing   DKIM  {new.record.name}: no TXT record" in check.stdout
        assert "; dkim:" not in check.stdout
        assert states(data_dir / "dkim") == {"old": "active", new.selector: "pending"}

        # Records show both keys: the next one is published beside the current one.
        records = hato("dns", "records", DOMAIN, env=env)
        assert old.name in records.stdout and new.record.name in records.stdout

        dns.txt(new.record.name, new.record.txt)
        check = hato("dns", "check", DOMAIN, "--ip", "192.0.2.25", env=env)
        assert f"; dkim: {DOMAIN} selector {new.selector}: pending -> active" in check.stdout
        assert f"; dkim: {DOMAIN} selector old: active -> retired" in check.stdout
        assert states(data_dir / "dkim") == {"old": "retired", new.selector: "active"}

        listed = hato("dkim", "list", "--json", env=env)
        assert {(k["selector"], k["state"]) for k in json.loads(listed.stdout)} == {
            ("old", "retired"),
            (new.selector, "active"),
        }
        shown = hato("dkim", "list", env=env)
        assert "retired), key" in shown.stdout and "keep published until at least" in shown.stdout

        # Eight days later the grace period is over: the old record may go.
        states_now = read_states(data_dir / "dkim", DOMAIN)
        states_now["old"] = KeyStatus(KeyState.RETIRED, time.time() - 8 * 86400)
        write_states(data_dir / "dkim", DOMAIN, states_now)
        dns.remove(old.name)
        records = hato("dns", "records", DOMAIN, env=env)
        assert old.name not in records.stdout and new.record.name in records.stdout
        check = hato("dns", "check", DOMAIN, "--ip", "192.0.2.25", "--json", env=env)
        names = {f["name"] for f in json.loads(check.stdout)["findings"] if f["kind"] == "DKIM"}
        assert names == {new.record.name}


async def test_serve_watch_activates_a_published_key_and_signs_with_it(tmp_path: Path) -> None:
    dkim_dir = tmp_path / "dkim"
    generate_key(DOMAIN, "old", "rsa", directory=dkim_dir, bits=1024)
    [new] = rotate_key(dkim_dir, DOMAIN, now=1_700_000_000.0, bits=1024)
    keys = DKIMKeys(dkim_dir)
    said: list[str] = []
    with TestDNS() as dns:
        dns.txt(new.name, new.txt)
        settings = load_settings(dkim_dir=dkim_dir, dns_servers=[dns.server])
        task = asyncio.create_task(
            build_dkim_rotation_task(settings, keys, MailLog(enabled=False), said.append)()
        )
        try:
            async with asyncio.timeout(20):
                while [k.selector for k in keys.signer.keys] != [new.selector]:
                    await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert any("pending -> active" in line for line in said), said
    signed = keys.signer.sign(b"From: a@example.test\r\nSubject: x\r\n\r\nhi\r\n")
    assert f"s={new.selector};".encode() in signed
