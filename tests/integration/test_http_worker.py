"""``hato worker``'s HTTP listener (off unless HATO_HTTP_LISTEN is set): readiness with
the SMTP host as its relay check, metrics of the deliveries, and a clean stop."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hato import AsyncMailer
from hato.app import work
from hato.config import Settings, load_settings
from peers.asyncsinks import HOST, Sink, wait_until

FROM = "noreply@app.example"


@pytest.fixture(autouse=True)
def clean_cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)


def _settings(tmp_path: Path, port: int, **extra: object) -> Settings:
    return load_settings(
        queue_url=f"sqlite:///{tmp_path / 'outbox.db'}",
        fsync=False,
        smtp_host=HOST,
        smtp_port=port,
        smtp_tls="none",
        hostname="worker.test",
        retry_min_delay=0.2,
        retry_max_delay=0.5,
        **extra,
    )


async def test_worker_http_is_off_by_default(tmp_path: Path) -> None:
    async with Sink() as sink:
        settings = _settings(tmp_path, sink.port, http_listen=None)
        stop = asyncio.Event()
        lines: list[str] = []
        task = asyncio.create_task(work(settings, stop=stop, say=lines.append))
        await wait_until(lambda: "ready" in lines or task.done(), 10)
        stop.set()
        await asyncio.wait_for(task, 15)
    assert not any(line.startswith("http on") for line in lines)


async def test_worker_serves_health_and_metrics(tmp_path: Path) -> None:
    async with Sink() as sink:
        settings = _settings(tmp_path, sink.port, http_listen="127.0.0.1:0")
        async with AsyncMailer(settings.queue_url, default_from=FROM, fsync=False) as mailer:
            await mailer.send("user@example.net", "Hi", text="x")
            stop = asyncio.Event()
            lines: list[str] = []
            task = asyncio.create_task(work(settings, stop=stop, say=lines.append))
            await wait_until(lambda: "ready" in lines or task.done(), 10)
            [http] = [m for line in lines if (m := re.fullmatch(r"http on (\S+):(\d+)", line))]
            url = f"http://{http.group(1)}:{http.group(2)}"
            await wait_until(lambda: len(sink.handler.messages) == 1, 15)
            async with httpx.AsyncClient(base_url=url) as client:
                ready = await client.get("/readyz")
                assert ready.status_code == 200, ready.text
                checks = ready.json()["checks"]
                assert checks["relay"]["ok"] is True
                assert f"{HOST}:{sink.port}" in checks["relay"]["detail"]
                assert not any(name.startswith("listener") for name in checks)

                async def sent() -> float:
                    text = (await client.get("/metrics")).text
                    for family in text_string_to_metric_families(text):
                        for s in family.samples:
                            if s.name == "hato_deliveries_total" and s.labels == {
                                "route": "relay",
                                "status": "sent",
                            }:
                                return s.value
                    return 0.0

                async with asyncio.timeout(15):
                    while await sent() != 1:
                        await asyncio.sleep(0.05)
                metrics = (await client.get("/metrics")).text
                assert 'hato_build_info{role="worker",version="0.1.0"} 1.0' in metrics
            stop.set()
            await asyncio.wait_for(task, 15)
    assert lines[-1] == "stopped"
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/healthz")  # the listener went with the worker
