"""The operator log: one line per mail event, always with the queue id, like Postfix's mail.log.

Lines look like::

    hato/smtpd[1234]: 1A546C5B2807E2A93C4: client=localhost[127.0.0.1], from=<a@b>, size=2048, nrcpt=1
    hato/relay[1234]: 1A546C5B2807E2A93C4: to=<c@d>, relay=mx.d[127.0.0.1]:25, delay=0.21, attempts=1, dsn=2.0.0, status=sent (250 2.0.0 Ok)

With ``json=True`` each line is a JSON object with the same fields. Secrets never go
through here: callers pass user names, never passwords.
"""

from __future__ import annotations

import json as _json
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO


class MailLog:
    """Writes operator events. One instance is built by the composition root."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        json: bool = False,
        clock: Callable[[], float] = time.time,
        enabled: bool = True,
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._json = json
        self._clock = clock
        self._pid = os.getpid()
        self.enabled = enabled

    def event(self, service: str, queue_id: str, **fields: object) -> None:
        """Write one event. ``status``/``detail`` fields render as ``status=x (detail)``."""
        if not self.enabled:
            return
        if self._json:
            record: dict[str, object] = {
                "ts": round(self._clock(), 3),
                "service": service,
                "queue_id": queue_id,
            }
            record.update({k: v for k, v in fields.items() if v is not None})
            line = _json.dumps(record, ensure_ascii=False, default=str)
        else:
            detail = fields.pop("detail", None)
            lead = fields.pop("text", None)
            if lead is not None:  # "connect from x[ip]" reads as Postfix writes it
                fields.pop("event", None)
                fields.pop("client", None)
            parts = []
            for key, value in fields.items():
                if value is None:
                    continue
                if key in ("from", "to", "orig_to"):
                    parts.append(f"{key}=<{value}>")
                else:
                    parts.append(f"{key}={value}")
            text = ", ".join(parts)
            if lead is not None:
                text = f"{lead} {text}".rstrip()
            if detail is not None:
                text += f" ({detail})"
            stamp = time.strftime("%b %d %H:%M:%S", time.localtime(self._clock()))
            prefix = f"{queue_id}: " if queue_id else ""
            line = f"{stamp} hato/{service}[{self._pid}]: {prefix}{text}"
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except (OSError, ValueError):  # closed or broken stream: never take mail down with it
            pass

    # Named events, so call sites read like the log they produce.

    def connect(self, client: str) -> None:
        self.event("smtpd", "", event="connect", client=client, text=f"connect from {client}")

    def disconnect(self, client: str, **counts: object) -> None:
        self.event(
            "smtpd",
            "",
            event="disconnect",
            client=client,
            text=f"disconnect from {client}",
            **counts,
        )

    def rejected(self, client: str, command: str, reply: object, **fields: object) -> None:
        self.event("smtpd", "NOQUEUE", reject=f"{command} from {client}: {reply}", **fields)

    def auth_failed(self, client: str, user: str, mechanism: str) -> None:
        self.event(
            "smtpd",
            "",
            warning=f"{client}: SASL {mechanism} authentication failed",
            sasl_username=user,
        )

    def received(
        self, queue_id: str, *, client: str, sender: str, size: int, nrcpt: int, **fields: object
    ) -> None:
        self.event(
            "smtpd", queue_id, client=client, **{"from": sender}, size=size, nrcpt=nrcpt, **fields
        )

    def delivery(
        self,
        queue_id: str,
        *,
        to: str,
        relay: str,
        delay: float,
        attempts: int,
        dsn: str,
        status: str,
        detail: str,
        service: str = "relay",
    ) -> None:
        self.event(
            service,
            queue_id,
            to=to,
            relay=relay,
            delay=f"{delay:.2f}",
            attempts=attempts,
            dsn=dsn,
            status=status,
            detail=detail,
        )

    def queue_event(self, queue_id: str, what: str, **fields: object) -> None:
        self.event("qmgr", queue_id, **{"event": what}, **fields)
