"""A FastAPI app that sends a sign-up mail from a request handler, through Hato's outbox.

The handler never talks SMTP: ``AsyncMailer.send`` stores the message in the queue and
returns its id in about a millisecond; ``hato worker`` delivers it, with retries, and
``GET /mail/{id}`` shows what became of it.

Run it (SQLite outbox here; ``postgresql://…`` or ``redis://…`` work the same)::

    pip install 'hato[fast]' fastapi uvicorn
    export HATO_QUEUE_URL=sqlite:///$PWD/outbox.db HATO_DEFAULT_FROM=noreply@dbmx.net
    uvicorn fastapi_signup:app --app-dir examples            # the web app
    HATO_SMTP_HOST=127.0.0.1 HATO_SMTP_PORT=2525 hato worker  # the mail worker

    curl -s localhost:8000/signup -H 'content-type: application/json' \\
         -d '{"email": "taro@example.net", "name": "Taro"}'
    curl -s localhost:8000/mail/<id from the answer>

A second sign-up with the same address within the same day returns the first message's
id and stores nothing: the idempotency key makes a double-clicked form or a retried
request send one mail.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, Field

import hato


class SignUp(BaseModel):
    email: str = Field(max_length=254)
    name: str = Field(min_length=1, max_length=100)


class Queued(BaseModel):
    message_id: str


class MailStatus(BaseModel):
    message_id: str
    state: str  # queued, sending, deferred, sent, failed
    reply: str
    attempts: int


WELCOME_TEXT = """\
Hello {name},

welcome to Fakebook! Confirm your address with this link:

    https://fakebook.example/confirm?email={email}

If you did not sign up, ignore this mail.
"""


def create_app(queue_url: str | None = None, *, default_from: str | None = None) -> FastAPI:
    """The app. Without arguments the mailer reads HATO_QUEUE_URL and HATO_DEFAULT_FROM."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One mailer per event loop, opened once: connections are reused by every request.
        async with hato.AsyncMailer(queue_url, default_from=default_from) as mailer:
            app.state.mailer = mailer
            yield

    app = FastAPI(title="Fakebook sign-up", lifespan=lifespan)

    @app.post("/signup", status_code=202)
    async def signup(form: SignUp, request: Request) -> Queued:
        mailer: hato.AsyncMailer = request.app.state.mailer
        today = datetime.date.today().isoformat()
        try:
            message_id = await mailer.send(
                form.email,
                "Welcome to Fakebook",
                WELCOME_TEXT.format(name=form.name, email=form.email),
                idempotency_key=f"signup:{form.email.lower()}:{today}",
            )
        except hato.AddressError as exc:  # a bad address, or CR/LF smuggled into a field
            raise HTTPException(status_code=422, detail=str(exc)) from None
        except hato.QueueError as exc:  # the outbox is down: the client may retry
            raise HTTPException(status_code=503, detail=str(exc)) from None
        return Queued(message_id=message_id)

    @app.get("/mail/{message_id}")
    async def mail_status(message_id: str, request: Request) -> MailStatus:
        mailer: hato.AsyncMailer = request.app.state.mailer
        try:
            status = await mailer.status(message_id)
        except hato.MessageNotFound:
            raise HTTPException(status_code=404, detail="no such message") from None
        return MailStatus(
            message_id=status.id, state=status.state, reply=status.reply, attempts=status.attempts
        )

    return app


app = create_app()
