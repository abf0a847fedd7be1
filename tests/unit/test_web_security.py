"""The HTTP listener's gate (hato.web.security): Host, Origin, token, session, CSRF, throttle.

Driven through httpx's ASGI transport with a chosen client address, against the Guard
and the login routes in front of two small routes; the real listener is tested in
tests/integration/test_http_listener.py.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hato.maillog import MailLog
from hato.smtp.auth import AuthThrottle
from hato.web import security
from hato.web.security import Access, Guard, csrf_token

TOKEN = "s3cret-token-value"


async def _thing(request: Request) -> Response:
    body = (await request.body()).decode()
    return JSONResponse(
        {"auth": security.describe(request.scope), "csrf": csrf_token(request), "body": body}
    )


def _app(access: Access) -> Starlette:
    return Starlette(
        routes=[
            Route("/thing", _thing, methods=["GET", "POST", "DELETE"]),
            Route("/healthz", _thing, methods=["GET"]),
            *security.routes(access),
        ],
        middleware=[Middleware(Guard, access=access)],
    )


def _client(
    access: Access, ip: str = "192.0.2.7", base: str = "http://hato.example"
) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=_app(access), client=(ip, 40000))
    return httpx.AsyncClient(transport=transport, base_url=base)


def _public(**kwargs: object) -> tuple[Access, io.StringIO]:
    log = io.StringIO()
    access = Access(
        token=TOKEN,
        bound_host="0.0.0.0",
        hosts=["hato.example"],
        log=MailLog(log),
        throttle=AuthThrottle(3, 600, base_delay=0.0, max_delay=0.0),
        **kwargs,  # type: ignore[arg-type]
    )
    return access, log


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


@pytest.fixture
def public() -> Iterator[tuple[Access, io.StringIO]]:
    yield _public()


def _problem(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["type"] == "about:blank" and body["title"]
    return dict(body)


# --- Host (DNS rebinding) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:8025", True),
        ("localhost:8025", True),
        ("app.localhost", True),
        ("[::1]:8025", True),
        ("hato.example", True),
        ("HATO.example.:443", True),
        ("evil.example", False),
        ("127.0.0.1.evil.example", False),
        ("", False),
    ],
)
def test_host_names(host: str, allowed: bool) -> None:
    access = Access(token=None, bound_host="127.0.0.1", hosts=["hato.example"])
    assert access.host_allowed(host) is allowed


def test_the_bound_address_is_a_host_but_not_the_wildcard() -> None:
    assert Access(token=TOKEN, bound_host="192.0.2.1").host_allowed("192.0.2.1:8025")
    assert not Access(token=TOKEN, bound_host="0.0.0.0").host_allowed("0.0.0.0:8025")


def test_foreign_host_is_refused_with_a_problem() -> None:
    access = Access(token=None, bound_host="127.0.0.1")

    async def go() -> httpx.Response:
        async with _client(access, "127.0.0.1", "http://rebound.example:8025") as client:
            return await client.get("/thing")

    response = run(go())
    assert isinstance(response, httpx.Response)
    assert "rebound.example" in str(_problem(response, 421)["detail"])


# --- Origin -------------------------------------------------------------------------


def test_cross_origin_state_change_is_refused_on_loopback_too() -> None:
    access = Access(token=None, bound_host="127.0.0.1")

    async def go() -> list[httpx.Response]:
        async with _client(access, "127.0.0.1", "http://127.0.0.1:8025") as client:
            return [
                await client.post("/thing", headers={"Origin": "http://evil.example"}),
                await client.post("/thing", headers={"Origin": "null"}),
                await client.post("/thing", headers={"Origin": "http://127.0.0.1:8025"}),
                await client.post("/thing"),  # curl: no Origin
                await client.get("/thing", headers={"Origin": "http://evil.example"}),
            ]

    cross, null, same, none, read = run(go())  # type: ignore[misc]
    _problem(cross, 403)
    _problem(null, 403)
    assert same.status_code == none.status_code == read.status_code == 200
    assert none.json()["auth"] == "loopback"


# --- token ----------------------------------------------------------------------------


def test_off_loopback_everything_but_health_needs_the_token(
    public: tuple[Access, io.StringIO],
) -> None:
    access, _ = public

    async def go() -> list[httpx.Response]:
        async with _client(access) as client:
            return [
                await client.get("/thing"),
                await client.get("/thing", headers={"Accept": "text/html"}),
                await client.get("/healthz"),
                await client.get("/thing", headers={"Authorization": f"Bearer {TOKEN}"}),
                await client.get("/login"),
            ]

    api, browser, health, bearer, login = run(go())  # type: ignore[misc]
    _problem(api, 401)
    assert api.headers["www-authenticate"].startswith("Bearer")
    assert browser.status_code == 303 and browser.headers["location"] == "/login?next=/thing"
    assert health.status_code == 200
    assert bearer.status_code == 200 and bearer.json()["auth"] == "bearer"
    assert login.status_code == 200 and 'name="token"' in login.text


def test_wrong_tokens_are_logged_without_the_token_and_throttled(
    public: tuple[Access, io.StringIO],
) -> None:
    access, log = public
    failures: list[int] = []
    access.on_failure = lambda: failures.append(1)

    async def go() -> list[httpx.Response]:
        async with _client(access) as client:
            answers = [
                await client.get("/thing", headers={"Authorization": "Bearer wrong-guess-1"}),
                await client.post("/login", data={"token": "wrong-guess-2"}),
                await client.get("/thing", headers={"Authorization": "Bearer wrong-guess-3"}),
                # Blocked now: even the right token waits for the window.
                await client.get("/thing", headers={"Authorization": f"Bearer {TOKEN}"}),
            ]
        async with _client(access, ip="198.51.100.9") as other:
            answers.append(await other.get("/thing", headers={"Authorization": f"Bearer {TOKEN}"}))
        return answers

    first, login, third, blocked, elsewhere = run(go())  # type: ignore[misc]
    _problem(first, 401)
    _problem(login, 401)
    _problem(third, 429)
    _problem(blocked, 429)
    assert elsewhere.status_code == 200
    text = log.getvalue()
    assert text.count("wrong token") == 3
    assert "192.0.2.7" in text
    assert "wrong-guess" not in text and TOKEN not in text
    assert len(failures) == 3
    assert access.throttle.failure_counts["http"] == 3


def test_a_bearer_token_sent_on_loopback_is_still_checked() -> None:
    access = Access(token=TOKEN, bound_host="127.0.0.1")

    async def go() -> list[httpx.Response]:
        async with _client(access, "127.0.0.1", "http://127.0.0.1:8025") as client:
            return [
                await client.get("/thing"),
                await client.get("/thing", headers={"Authorization": "Bearer nope"}),
            ]

    free, wrong = run(go())  # type: ignore[misc]
    assert free.status_code == 200 and free.json()["auth"] == "loopback"
    _problem(wrong, 401)


# --- the browser: login, cookie, CSRF -------------------------------------------------


def test_login_sets_a_strict_httponly_session_and_csrf_guards_its_changes(
    public: tuple[Access, io.StringIO],
) -> None:
    access, _ = public

    async def go() -> dict[str, httpx.Response]:
        async with _client(access) as client:
            login = await client.post(
                "/login",
                data={"token": TOKEN, "next": "/thing"},
                headers={"Origin": "http://hato.example"},
            )
            read = await client.get("/thing")
            token = read.json()["csrf"]
            return {
                "login": login,
                "read": read,
                "no_csrf": await client.post("/thing", content=b"x=1"),
                "wrong_csrf": await client.post("/thing", headers={"X-CSRF-Token": "nope"}),
                "header": await client.delete("/thing", headers={"X-CSRF-Token": token}),
                "form": await client.post(
                    "/thing",
                    data={"csrf_token": token, "action": "retry"},
                ),
                "logout_no_csrf": await client.post("/logout"),
                "logout": await client.post("/logout", data={"csrf_token": token}),
                "after": await client.get("/thing"),
            }

    r = run(go())
    assert isinstance(r, dict)
    login = r["login"]
    assert login.status_code == 303 and login.headers["location"] == "/thing"
    cookie = login.headers["set-cookie"].lower()
    assert cookie.startswith(security.SESSION_COOKIE + "=")
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    assert "secure" not in cookie  # plain HTTP; under HATO_HTTP_TLS it is Secure
    assert r["read"].json()["auth"] == "cookie"
    _problem(r["no_csrf"], 403)
    _problem(r["wrong_csrf"], 403)
    assert r["header"].status_code == 200
    # The form was read for its token and still reaches the route whole.
    assert r["form"].status_code == 200
    assert "action=retry" in r["form"].json()["body"]
    _problem(r["logout_no_csrf"], 403)
    assert r["logout"].status_code == 303
    _problem(r["after"], 401)


def test_login_refuses_a_foreign_next() -> None:
    access, _ = _public()

    async def go() -> httpx.Response:
        async with _client(access) as client:
            return await client.post("/login", data={"token": TOKEN, "next": "//evil.example/"})

    response = run(go())
    assert isinstance(response, httpx.Response)
    assert response.headers["location"] == "/"


def test_session_cookie_is_secure_under_tls() -> None:
    access, _ = _public(tls=True)

    async def go() -> httpx.Response:
        async with _client(access, base="https://hato.example") as client:
            return await client.post("/login", data={"token": TOKEN})

    response = run(go())
    assert isinstance(response, httpx.Response)
    assert "secure" in response.headers["set-cookie"].lower()


def test_sessions_are_bounded_and_expire() -> None:
    now = [0.0]
    sessions = security.Sessions(lifetime=10, clock=lambda: now[0])
    first = sessions.new()
    for _ in range(security.MAX_SESSIONS):
        sessions.new()
    assert sessions.get(first.id) is None  # the oldest went first
    last = sessions.new()
    assert sessions.get(last.id) is last
    now[0] = 11
    assert sessions.get(last.id) is None


def test_the_mta_sts_policy_needs_no_token(public: tuple[Access, io.StringIO]) -> None:
    access, _ = public
    app = Starlette(
        routes=[Route("/.well-known/mta-sts.txt", _thing)],
        middleware=[Middleware(Guard, access=access)],
    )

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=("203.0.113.5", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://hato.example") as c:
            return await c.get("/.well-known/mta-sts.txt")

    response = run(go())
    assert isinstance(response, httpx.Response)
    assert response.status_code == 200 and response.json()["auth"] == "public"
