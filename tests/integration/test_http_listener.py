"""The HTTP listener of a real ``hato serve``: health, readiness, metrics as mail flows,
``hato health``, the start-up refusals, and the gate in front of it all.

Each ``hato serve`` gets ``HATO_HTTP_LISTEN=127.0.0.1:0`` from :class:`HatoServe` and
says where it is bound (``hato: http on HOST:PORT``), so parallel runs never collide.
"""

from __future__ import annotations

import shutil
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from peers import free_port, missing
from peers.hato import HatoFactory, HatoServe, operator_setup, run_hato
from peers.sinks import RecordingSink


def _send(serve: HatoServe, recipient: str, subject: str) -> None:
    with smtplib.SMTP(serve.host, serve.port, timeout=30) as client:
        client.sendmail(
            "app@example.com",
            [recipient],
            f"From: app@example.com\r\nTo: {recipient}\r\nSubject: {subject}\r\n\r\nhello\r\n",
        )


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _wait(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_health_readiness_and_problem_bodies(hato_serve: HatoFactory) -> None:
    serve = hato_serve()
    assert serve.http_url.startswith("http://127.0.0.1:")
    assert httpx.get(serve.http_url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(serve.http_url + "/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready"
    checks = body["checks"]
    assert checks["queue"] == {"ok": True, "detail": "writable"}
    assert checks["worker"]["ok"] is True
    assert checks[f"listener smtp=127.0.0.1:{serve.port}"] == {"ok": True, "detail": "bound"}
    assert checks["disk"]["ok"] is True
    assert "relay" not in checks  # the hold route hands nothing on
    missing_page = httpx.get(serve.http_url + "/no/such/page")
    assert missing_page.status_code == 404
    assert missing_page.headers["content-type"] == "application/problem+json"
    assert missing_page.json()["status"] == 404


def test_the_gate_of_a_real_listener(hato_serve: HatoFactory) -> None:
    serve = hato_serve()
    url = serve.http_url
    rebound = httpx.get(url + "/metrics", headers={"Host": "attacker.example"})
    assert rebound.status_code == 421
    assert rebound.json()["title"] == "Misdirected Request"
    cross = httpx.post(url + "/logout", headers={"Origin": "http://attacker.example"})
    assert cross.status_code == 403
    assert cross.headers["content-type"] == "application/problem+json"
    # On loopback the metrics need no token; a wrong one sent anyway is refused and logged.
    assert httpx.get(url + "/metrics").status_code == 200
    wrong = httpx.get(url + "/metrics", headers={"Authorization": "Bearer not-it-at-all"})
    assert wrong.status_code == 401
    serve.wait_for_log(r"hato/http\[\d+\]: warning=\[127\.0\.0\.1\]: wrong token \(bearer\)")
    assert "not-it-at-all" not in serve.log


def test_metrics_follow_the_mail(
    hato_serve: HatoFactory, recording_sink: RecordingSink, tmp_path: Path
) -> None:
    """Send 3, deliver 2, defer 1: the counters say so, and promtool accepts the scrape."""
    recording_sink.fail_rcpt("451 4.7.1 try again later", address="later@example.org")
    serve = hato_serve({"RELAYHOST": recording_sink.relayhost})
    for number, recipient in enumerate(["one@example.org", "two@example.org", "later@example.org"]):
        _send(serve, recipient, f"message {number}")
    recording_sink.wait_for_count(2)

    def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        response = httpx.get(serve.http_url + "/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        return _samples(response.text)

    def settled() -> bool:
        s = scrape()
        return (
            _value(s, "hato_deliveries_total", route="relay", status="sent") == 2
            and _value(s, "hato_deliveries_total", route="relay", status="deferred") >= 1
            and _value(s, "hato_queue_messages", state="sent") == 2
        )

    _wait(settled, "two deliveries and a deferral in /metrics")
    s = scrape()
    listener = f"smtp=127.0.0.1:{serve.port}"
    assert _value(s, "hato_smtp_messages_total", listener=listener, result="accepted") == 3
    assert _value(s, "hato_smtp_messages_total", listener=listener, result="rejected") == 0
    assert _value(s, "hato_smtp_connections_total", listener=listener) == 3
    assert _value(s, "hato_smtp_connections_active", listener=listener) == 0
    assert _value(s, "hato_smtp_auth_failures_total", listener=listener) == 0
    assert _value(s, "hato_deliveries_total", route="relay", status="bounced") == 0
    assert _value(s, "hato_delivery_seconds_count", route="relay") == 2
    assert _value(s, "hato_last_delivery_timestamp_seconds") > 0
    waiting = sum(
        _value(s, "hato_queue_messages", state=state) for state in ("queued", "sending", "deferred")
    )
    assert waiting == 1
    assert _value(s, "hato_queue_messages", state="failed") == 0
    assert _value(s, "hato_events_total", event="accepted") == 3
    assert _value(s, "hato_events_total", event="relayed") == 2
    assert _value(s, "hato_events_total", event="deferred") >= 1
    assert _value(s, "hato_ready") == 1
    assert _value(s, "hato_build_info", version="0.1.0", role="serve") == 1
    # The deferred message is the oldest waiting one; nothing is held.
    assert _value(s, "hato_queue_oldest_age_seconds", state="held") == 0
    relay_check = httpx.get(serve.http_url + "/readyz").json()["checks"]["relay"]
    assert relay_check["ok"] is True and str(recording_sink.port) in relay_check["detail"]

    promtool = shutil.which("promtool")
    if promtool is None:
        missing("promtool (apt package prometheus)")
        return
    text = httpx.get(serve.http_url + "/metrics").text
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_hato_health_exit_status(hato_serve: HatoFactory, tmp_path: Path) -> None:
    ready = hato_serve()
    proc = run_hato(["health", "--url", ready.http_url], data_dir=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ready") and len(proc.stdout.splitlines()) == 1
    # The default URL comes from HATO_HTTP_LISTEN.
    where = ready.http_url.removeprefix("http://")
    by_env = run_hato(["health"], data_dir=tmp_path, env={"HATO_HTTP_LISTEN": where}, check=False)
    assert by_env.returncode == 0, by_env.stdout + by_env.stderr

    # A relay nobody listens on: not ready, and one line saying why.
    dead_relay = free_port()
    unready = hato_serve({"RELAYHOST": f"[127.0.0.1]:{dead_relay}"})
    assert httpx.get(unready.http_url + "/readyz").status_code == 503
    proc = run_hato(["health", "--url", unready.http_url], data_dir=tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stdout.startswith("not ready: HTTP 503: relay: 127.0.0.1:")
    assert len(proc.stdout.splitlines()) == 1 and "Traceback" not in proc.stderr

    # Nobody listening at all.
    unready.stop()
    proc = run_hato(["health", "--url", unready.http_url], data_dir=tmp_path, check=False)
    assert proc.returncode == 1 and proc.stdout.startswith("not ready: ")
    assert "Traceback" not in proc.stderr


def test_refuses_a_public_listener_without_a_token(tmp_path: Path) -> None:
    proc = run_hato(
        ["serve"],
        data_dir=tmp_path,
        env={"HATO_LISTEN": "127.0.0.1:0", "HATO_HTTP_LISTEN": "0.0.0.0:0"},
        check=False,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "HATO_HTTP_TOKEN" in lines[0] and "0.0.0.0:0" in lines[0]
    assert not (tmp_path / "queue.db").exists()  # refused before the queue was touched


def test_a_port_in_use_is_a_one_line_start_up_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = run_hato(
            ["serve"],
            data_dir=tmp_path,
            env={"HATO_LISTEN": "127.0.0.1:0", "HATO_HTTP_LISTEN": f"127.0.0.1:{port}"},
            check=False,
        )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "cannot listen on http" in line]
    assert errors == [f"hato: cannot listen on http 127.0.0.1:{port}: Address already in use"]
    assert "Traceback" not in proc.stderr


def test_https_with_the_listeners_certificate(hato_serve: HatoFactory, tmp_path: Path) -> None:
    data_dir = tmp_path / "tls-data"
    tls_env = operator_setup(data_dir, {})
    serve = hato_serve({**tls_env, "HATO_HTTP_TLS": "true"}, data_dir=data_dir)
    assert serve.http_url.startswith("https://127.0.0.1:")
    assert httpx.get(serve.http_url + "/readyz", verify=False).status_code == 200
    with pytest.raises(httpx.HTTPError):
        httpx.get(serve.http_url.replace("https://", "http://") + "/healthz")
    proc = run_hato(["health", "--url", serve.http_url], data_dir=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_https_without_a_certificate_refuses_to_start(tmp_path: Path) -> None:
    proc = run_hato(
        ["serve"],
        data_dir=tmp_path,
        env={"HATO_LISTEN": "127.0.0.1:0", "HATO_HTTP_LISTEN": "127.0.0.1:0", "HATO_HTTP_TLS": "1"},
        check=False,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "hato: HATO_HTTP_TLS needs HATO_TLS_CERT_FILE and HATO_TLS_KEY_FILE"
    ]


def test_rejections_and_auth_failures_are_counted(hato_serve: HatoFactory, tmp_path: Path) -> None:
    data_dir = tmp_path / "relay-data"
    tls_env = operator_setup(data_dir, {"alice": "right-password"})
    smtp_port, submission_port = free_port(), free_port()
    serve = hato_serve(
        {
            **tls_env,
            "HATO_LISTEN": f"smtp=127.0.0.1:{smtp_port},submission=127.0.0.1:{submission_port}",
            "HATO_MESSAGE_SIZE_LIMIT": "2000",
        },
        data_dir=data_dir,
    )
    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:
        client.ehlo("client.test")
        code, _ = client.docmd("MAIL FROM:<app@example.com>")
        assert code == 250
        assert client.docmd("RCPT TO:<big@example.org>")[0] == 250
        assert client.docmd("DATA")[0] == 354
        client.send(b"Subject: big\r\n\r\n" + b"x" * 3000 + b"\r\n.\r\n")
        code, _ = client.getreply()
        assert code == 552
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", submission_port, timeout=30) as client:
        client.starttls(context=tls)
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("alice", "wrong-password")
    s = _samples(httpx.get(serve.http_url + "/metrics").text)
    smtp = f"smtp=127.0.0.1:{smtp_port}"
    submission = f"submission=127.0.0.1:{submission_port}"
    assert _value(s, "hato_smtp_messages_total", listener=smtp, result="rejected") == 1
    assert _value(s, "hato_smtp_messages_total", listener=smtp, result="accepted") == 0
    # smtplib tries PLAIN, then LOGIN: two failed attempts.
    assert _value(s, "hato_smtp_auth_failures_total", listener=submission) == 2
    assert _value(s, "hato_smtp_auth_failures_total", listener=smtp) == 0
    assert _value(s, "hato_smtp_connections_total", listener=submission) == 1


def test_hato_health_sends_the_token(hato_serve: HatoFactory, tmp_path: Path) -> None:
    serve = hato_serve({"HATO_HTTP_TOKEN": "the-right-token"})
    right = run_hato(
        ["health", "--url", serve.http_url],
        data_dir=tmp_path,
        env={"HATO_HTTP_TOKEN": "the-right-token"},
        check=False,
    )
    assert right.returncode == 0, right.stdout + right.stderr
    # A token sent on loopback is checked: a wrong one shows that it was sent.
    secret = tmp_path / "token"
    secret.write_text("a-wrong-token\n")
    wrong = run_hato(
        ["health", "--url", serve.http_url],
        data_dir=tmp_path,
        env={"HATO_HTTP_TOKEN_FILE": str(secret)},
        check=False,
    )
    assert wrong.returncode == 1
    assert wrong.stdout == "not ready: HTTP 401: wrong token\n"


def test_the_other_parts_routes_are_mounted(hato_serve: HatoFactory) -> None:
    """MTA-STS policy (for mta-sts.DOMAIN, through a proxy) and the TLS-RPT reports API."""
    serve = hato_serve(
        {"HATO_DOMAINS": "example.com", "HATO_MTA_STS_MODE": "testing", "HATO_HOSTNAME": "mx.test"}
    )
    policy = httpx.get(
        serve.http_url + "/.well-known/mta-sts.txt", headers={"Host": "mta-sts.example.com"}
    )
    assert policy.status_code == 200, policy.text
    assert policy.text.startswith("version: STSv1\r\nmode: testing\r\nmx: mx.test\r\n")
    other = httpx.get(
        serve.http_url + "/.well-known/mta-sts.txt", headers={"Host": "mta-sts.example.net"}
    )
    assert other.status_code == 421
    reports = httpx.get(serve.http_url + "/api/v1/tls/reports")
    assert reports.status_code == 200 and reports.json() == {"reports": []}
