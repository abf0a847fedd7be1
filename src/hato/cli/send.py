"""``hato send``: a swaks-like test client that sends one message and can show the dialog.

It uses the standard library's smtplib (blocking, one message) on purpose: it is a tool
for people, and smtplib's behaviour is what many applications do. With ``-v`` the dialog
goes to stdout as swaks prints it (verbs in upper case, AUTH arguments masked).
"""

from __future__ import annotations

import contextlib
import smtplib
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import format_datetime, localtime, make_msgid
from typing import Any

import click

from hato.cli import friendly, main
from hato.config import parse_relayhost
from hato.errors import AddressError, ConfigError, HatoError
from hato.message import check_header_value

Trace = Callable[[str], None]


@dataclass
class SendOptions:
    server: str
    sender: str
    recipients: list[str]
    headers: list[str] = field(default_factory=list)
    body: str = "This is a test mailing from hato send."
    starttls: bool = False
    implicit_tls: bool = False
    auth_user: str | None = None
    auth_password: str | None = None
    verify: bool = True
    ca_file: str | None = None
    timeout: float = 30.0


class SendError(HatoError):
    """``hato send`` failed; the message says at which step and the server's reply."""


def build_message(options: SendOptions) -> EmailMessage:
    msg = EmailMessage(policy=SMTP_POLICY)
    custom: dict[str, str] = {}
    for item in options.headers:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise ConfigError(f"--header {item!r} is not 'Name: value'")
        custom[name.strip()] = check_header_value(value.strip(), f"header {name.strip()}")
    msg["From"] = custom.pop("From", options.sender)
    msg["To"] = custom.pop("To", ", ".join(options.recipients))
    msg["Subject"] = custom.pop("Subject", "test " + format_datetime(localtime()))
    msg["Date"] = custom.pop("Date", format_datetime(localtime()))
    msg["Message-ID"] = custom.pop("Message-ID", make_msgid(domain=_domain(options.sender)))
    for name, value in custom.items():
        msg[name] = value
    msg.set_content(options.body)
    return msg


def _domain(address: str) -> str:
    return address.rpartition("@")[2] or "localhost"


class _TracingSMTP(smtplib.SMTP):
    trace: Trace | None = None
    data_reply: str = ""
    ehlo_msg = "EHLO"

    def putcmd(self, cmd: str, args: str = "") -> None:
        # smtplib writes verbs in lower case; the dialog reads like swaks's with upper.
        super().putcmd(cmd.upper(), args)

    def data(self, msg: Any) -> tuple[int, bytes]:
        code, text = super().data(msg)
        self.data_reply = f"{code} {text.decode('utf-8', 'replace')}"
        return code, text

    def send(self, s: Any) -> None:
        if self.trace is not None:
            text = s.decode("utf-8", "replace") if isinstance(s, bytes) else str(s)
            for line in text.rstrip("\r\n").split("\r\n")[:20]:
                self.trace(" -> " + _redact(line))
        super().send(s)

    def getreply(self) -> tuple[int, bytes]:
        code, msg = super().getreply()
        if self.trace is not None:
            for line in msg.decode("utf-8", "replace").split("\n"):
                self.trace(f"<-  {code} {line}")
        return code, msg


class _TracingSMTPSSL(_TracingSMTP, smtplib.SMTP_SSL):
    pass


def _redact(line: str) -> str:
    if line.upper().startswith("AUTH "):
        return " ".join(line.split(" ")[:2]) + " ********"
    return line


def send_test_message(options: SendOptions, *, trace: Trace | None = None) -> str:
    """Send one message; return the server's final reply. Raises SendError/ConfigError."""
    host, port = parse_relayhost(options.server)
    try:
        message = build_message(options)
    except AddressError as exc:
        raise ConfigError(str(exc)) from exc
    context = ssl.create_default_context(cafile=options.ca_file)
    if not options.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    step = "connect"
    client: _TracingSMTP | None = None
    try:
        if options.implicit_tls:
            client = _TracingSMTPSSL(timeout=options.timeout, context=context)
        else:
            client = _TracingSMTP(timeout=options.timeout)
        client.trace = trace
        if trace is not None:
            trace(f"=== Trying {host}:{port}...")
        client.connect(host, port)
        step = "EHLO"
        client.ehlo(socket.gethostname())
        if options.starttls:
            step = "STARTTLS"
            client.starttls(context=context)
            client.ehlo(socket.gethostname())
        if options.auth_user:
            step = "AUTH"
            if not options.auth_password:
                raise ConfigError("--auth-user needs --auth-password or HATO_SEND_PASSWORD")
            client.login(options.auth_user, options.auth_password)
        step = "send"
        refused = client.send_message(message, options.sender, options.recipients)
        if refused:
            details = "; ".join(
                f"<{rcpt}>: {code} {text.decode(errors='replace')}"
                for rcpt, (code, text) in refused.items()
            )
            raise SendError(f"some recipients were refused: {details}")
        reply = client.data_reply or "250 accepted"
        step = "QUIT"
        client.quit()
        return reply
    except smtplib.SMTPResponseException as exc:
        text = (
            exc.smtp_error.decode("utf-8", "replace")
            if isinstance(exc.smtp_error, bytes)
            else str(exc.smtp_error)
        )
        raise SendError(f"{step} failed: {exc.smtp_code} {text}") from None
    except smtplib.SMTPRecipientsRefused as exc:
        details = "; ".join(
            f"<{rcpt}>: {code} {text.decode(errors='replace')}"
            for rcpt, (code, text) in exc.recipients.items()
        )
        raise SendError(f"all recipients refused: {details}") from None
    except smtplib.SMTPNotSupportedError as exc:
        raise SendError(f"{step} failed: {exc}") from None
    except ssl.SSLError as exc:
        raise SendError(f"{step} failed: TLS error: {exc.reason or exc}") from None
    except (OSError, smtplib.SMTPException) as exc:
        raise SendError(f"{step} failed talking to {host}:{port}: {exc}") from None
    finally:
        if client is not None:
            with contextlib.suppress(OSError):
                client.close()


@main.command()
@click.option("--server", default="127.0.0.1:2525", show_default=True, help="HOST:PORT.")
@click.option("--from", "sender", required=True, help="Envelope and From: address.")
@click.option("--to", "recipients", multiple=True, required=True, help="Recipient; repeatable.")
@click.option("--header", "headers", multiple=True, help="'Name: value'; repeatable.")
@click.option("--body", default="This is a test mailing from hato send.", help="Body text.")
@click.option("--starttls", is_flag=True, help="Require STARTTLS.")
@click.option("--tls", "implicit_tls", is_flag=True, help="Implicit TLS (port 465).")
@click.option("--auth-user", help="SASL user.")
@click.option(
    "--auth-password", help="SASL password (or HATO_SEND_PASSWORD).", envvar="HATO_SEND_PASSWORD"
)
@click.option("--insecure", is_flag=True, help="Do not verify the server's certificate.")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False), help="CA bundle.")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds per reply.")
@click.option("-v", "--verbose", is_flag=True, help="Print the SMTP dialog.")
@friendly
def send(
    server: str,
    sender: str,
    recipients: tuple[str, ...],
    headers: tuple[str, ...],
    body: str,
    starttls: bool,
    implicit_tls: bool,
    auth_user: str | None,
    auth_password: str | None,
    insecure: bool,
    ca_file: str | None,
    timeout: float,
    verbose: bool,
) -> None:
    """Send a test message, like swaks."""
    options = SendOptions(
        server=server,
        sender=sender,
        recipients=list(recipients),
        headers=list(headers),
        body=body,
        starttls=starttls,
        implicit_tls=implicit_tls,
        auth_user=auth_user,
        auth_password=auth_password,
        verify=not insecure,
        ca_file=ca_file,
        timeout=timeout,
    )
    trace = click.echo if verbose else None  # the dialog on stdout, as swaks prints it
    reply = send_test_message(options, trace=trace)
    click.echo(f"sent: {reply}")
