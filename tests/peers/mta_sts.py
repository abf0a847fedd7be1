"""An HTTPS server on loopback serving MTA-STS policies, by ``Host``, with test-CA certificates.

::

    with PolicyServer(context) as server:          # context: a server SSLContext (trustme)
        server.policy("example.test", "version: STSv1\\nmode: enforce\\n...")
        server.respond("other.test", 302, "text/plain", b"", location="https://x/")
        # courier: MTASTS(..., port=server.port); DNS: mta-sts.example.test A 127.0.0.1

It answers ``GET /.well-known/mta-sts.txt`` for the host ``mta-sts.<domain>`` it was
given a policy for, 404 otherwise; ``requests`` counts the requests per host. The
certificate presented is the one of ``context`` (use SNI-aware contexts or one
certificate covering every ``mta-sts.*`` name the test uses).
"""

from __future__ import annotations

import http.server
import ssl
import threading
from dataclasses import dataclass
from typing import Any


@dataclass
class _Answer:
    status: int
    content_type: str
    body: bytes
    location: str = ""


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        host = (self.headers.get("Host") or "").split(":")[0].lower()
        with self.server.lock:
            self.server.requests[host] = self.server.requests.get(host, 0) + 1
            answer = (
                self.server.answers.get(host) if self.path == "/.well-known/mta-sts.txt" else None
            )
        if answer is None:
            answer = _Answer(404, "text/plain", b"not found\n")
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        if answer.location:
            self.send_header("Location", answer.location)
        self.end_headers()
        self.wfile.write(answer.body)

    def log_message(self, format: str, *args: Any) -> None:
        return None


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.context = context
        self.lock = threading.Lock()
        self.answers: dict[str, _Answer] = {}
        self.requests: dict[str, int] = {}

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        return self.context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False
        ), address

    def handle_error(self, request: Any, client_address: Any) -> None:
        return None  # a client that refused our certificate is a test's expected outcome


class PolicyServer:
    __test__ = False

    def __init__(self, context: ssl.SSLContext) -> None:
        self._server = _Server(context)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> PolicyServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> PolicyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def policy(self, domain: str, text: str) -> None:
        self.respond(domain, 200, "text/plain", text.encode())

    def respond(
        self, domain: str, status: int, content_type: str, body: bytes, *, location: str = ""
    ) -> None:
        with self._server.lock:
            self._server.answers[f"mta-sts.{domain}"] = _Answer(
                status, content_type, body, location
            )

    def requests(self, domain: str) -> int:
        with self._server.lock:
            return self._server.requests.get(f"mta-sts.{domain}", 0)
