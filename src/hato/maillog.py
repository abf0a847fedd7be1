"""The operator log: one line per mail event, always with the queue id, like Postfix's mail.log.

Lines look like::

    hato/smtpd[1234]: 1A546C5B2807E2A93C4: client=localhost[127.0.0.1], from=<a@b>, size=2048, nrcpt=1
    hato/relay[1234]: 1A546C5B2807E2A93C4: to=<c@d>, relay=mx.d[127.0.0.1]:25, delay=0.21, attempts=1, dsn=2.0.0, status=sent (250 2.0.0 Ok)

With ``json=True`` each line is a JSON object with the same fields. Secrets never go
through here: callers pass user names, never passwords.

Nothing a client sends or a remote server answers can forge a line: :meth:`MailLog.event`,
the one place lines are built, escapes every value. In the text log each C0 and C1
control character, DEL, U+2028 and U+2029 becomes ``\\xNN`` or ``\\uNNNN`` and a backslash
becomes ``\\\\`` (so the escaping can be read back unambiguously); in the JSON log the
same characters are JSON escapes. A line of this log therefore never holds a line break
of any kind that the code did not put there. Lone surrogates, which no stream could
encode, are escaped alike.
"""

from __future__ import annotations

import json as _json
import os
import re
import sys
import time
from collections.abc import Callable
from typing import TextIO

# (TLS version or "", certificate verified, tls_policy) of a delivery attempt.
TLSFields = tuple[str, bool, str]

# What may not reach the text log as itself: C0 controls, DEL and the C1 controls, the
# Unicode line and paragraph separators, lone surrogates, and the backslash that starts
# our own escapes.
_TEXT_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\\\u2028\u2029\ud800-\udfff]")
# json.dumps escapes C0, quotes and backslashes itself; with ensure_ascii=False it leaves
# these as they are. Raw, they can only stand inside a JSON string, where \uNNNN is valid.
_JSON_UNSAFE = re.compile(r"[\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _text_escape(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def escape(text: str) -> str:
    """``text`` as the text log writes it: controls, DEL, U+2028/U+2029, lone surrogates
    and the backslash escaped, so that no value can end a line or start one of its own."""
    return _TEXT_UNSAFE.sub(_text_escape, text)


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
            line = _JSON_UNSAFE.sub(
                _json_escape, _json.dumps(record, ensure_ascii=False, default=str)
            )
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
            # Escaping the whole line escapes every value in it: the frame around the
            # values holds no character that escape() changes.
            line = escape(f"{stamp} hato/{service}[{self._pid}]: {prefix}{text}")
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

    def auth_locked(self, user: str, seconds: float) -> None:
        self.event(
            "smtpd",
            "",
            warning=f"SASL login name locked for up to {seconds:g}s after repeated failures",
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
        envid: str = "",
        tls: TLSFields | None = None,
    ) -> None:
        """One delivery outcome. ``tls`` (an SMTP hop's protocol version, whether its
        certificate was verified, the rule that chose the TLS level) is written after
        ``relay=`` as ``tls=TLSv1.3 verified=yes policy=dane`` (``tls=none`` for
        plaintext; no ``policy=`` where no rule chose the level); in the JSON log as
        ``tls``, ``tls_verified`` and ``tls_policy``."""
        extra: dict[str, object] = {}
        if tls is not None:
            version, verified, policy = tls
            if self._json:
                extra = {"tls": version, "tls_verified": verified, "tls_policy": policy}
            else:
                yes = "yes" if verified else "no"
                text = f"{version or 'none'} verified={yes}"
                extra = {"tls": f"{text} policy={policy}" if policy else text}
        self.event(
            service,
            queue_id,
            to=to,
            relay=relay,
            **extra,
            delay=f"{delay:.2f}",
            attempts=attempts,
            dsn=dsn,
            envid=envid or None,
            status=status,
            detail=detail,
        )

    def queue_event(self, queue_id: str, what: str, **fields: object) -> None:
        self.event("qmgr", queue_id, **{"event": what}, **fields)
