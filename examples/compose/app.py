"""The compose example's web app: a sign-up stores the user and queues its welcome mail in one transaction.

``POST /signup`` inserts the user into PostgreSQL and enqueues the mail with
``hato.Mailer.send(..., connection=conn)`` on the same connection, so both commit
together: a sign-up that fails (the address is taken, the address is malformed) leaves
neither a user nor a mail behind, and a committed one always gets its mail. The
``mailworker`` service (``hato worker``) delivers it through the ``smtp`` service
(``hato serve``, the local relay). ``GET /mail/{id}`` shows the message's state.

Settings come from the environment: ``DATABASE_URL`` for the app's own tables, and
Hato's ``HATO_QUEUE_URL`` / ``HATO_DEFAULT_FROM`` for the mailer (the outbox tables may
live in the same database, as here, and must for ``connection=``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
from fastapi import FastAPI, HTTPException, Request
from psycopg import errors as pg_errors
from pydantic import BaseModel, Field

import hato

WELCOME = """\
Hello {name},

welcome to Fakebook! Confirm your address with this link:

    https://fakebook.example/confirm?email={email}
"""


class SignUp(BaseModel):
    email: str = Field(max_length=254)
    name: str = Field(min_length=1, max_length=100)


def create_app(
    database_url: str | None = None,
    queue_url: str | None = None,
    *,
    default_from: str | None = None,
) -> FastAPI:
    """The app; arguments left out come from DATABASE_URL, HATO_QUEUE_URL, HATO_DEFAULT_FROM."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        dsn = database_url or os.environ["DATABASE_URL"]
        mailer = hato.Mailer(queue_url, default_from=default_from)
        mailer.open()  # creates the outbox tables if they are missing (hato queue init)
        with psycopg.connect(dsn) as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS users ("
                " id bigserial PRIMARY KEY, email text UNIQUE NOT NULL, name text NOT NULL,"
                " welcome_mail text NOT NULL)"
            )
        app.state.dsn, app.state.mailer = dsn, mailer
        try:
            yield
        finally:
            mailer.close()

    app = FastAPI(title="Fakebook", lifespan=lifespan)

    # Plain ``def`` handlers run in FastAPI's thread pool; hato.Mailer is thread-safe.
    @app.post("/signup", status_code=201)
    def signup(form: SignUp, request: Request) -> dict[str, str]:
        mailer: hato.Mailer = request.app.state.mailer
        try:
            # One transaction: committed when the block ends, rolled back on any error.
            with psycopg.connect(request.app.state.dsn) as conn:
                message_id = mailer.send(
                    form.email,
                    "Welcome to Fakebook",
                    WELCOME.format(name=form.name, email=form.email),
                    connection=conn,
                )
                conn.execute(
                    "INSERT INTO users (email, name, welcome_mail) VALUES (%s, %s, %s)",
                    (form.email.lower(), form.name, message_id),
                )
        except pg_errors.UniqueViolation:
            raise HTTPException(status_code=409, detail="this address is signed up") from None
        except hato.AddressError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        return {"email": form.email, "message_id": message_id}

    @app.get("/mail/{message_id}")
    def mail_status(message_id: str, request: Request) -> dict[str, str | int]:
        mailer: hato.Mailer = request.app.state.mailer
        try:
            status = mailer.status(message_id)
        except hato.MessageNotFound:
            raise HTTPException(status_code=404, detail="no such message") from None
        return {"state": status.state, "reply": status.reply, "attempts": status.attempts}

    return app


app = create_app()
