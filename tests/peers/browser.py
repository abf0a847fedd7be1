"""Headless Chromium from Debian, driven by Playwright for Python (no browser download).

``chromium()`` launches ``/usr/bin/chromium`` (``HATO_TEST_CHROMIUM`` overrides the
path) with the flags a CI container needs; a missing browser or Playwright skips, or
fails under ``CI=true`` (:func:`peers.require_tool`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from peers import missing

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
)


def chromium_path() -> str:
    path = os.environ.get("HATO_TEST_CHROMIUM", "/usr/bin/chromium")
    if not (os.path.exists(path) or shutil.which(path)):
        missing(f"{path} not found (apt-get install chromium)")
    return path


@contextmanager
def chromium() -> Iterator[Any]:
    """A launched headless Chromium (Playwright's ``Browser``), closed afterwards."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install -e '.[test]')")
    path = chromium_path()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, headless=True, args=list(CHROMIUM_FLAGS))
        try:
            yield browser
        finally:
            browser.close()


class ConsoleServer:
    """The console and API over a ``hato serve``'s data dir, served by uvicorn in a thread.

    Stands in for ``hato serve``'s own HTTP listener where that is not built in: the
    same routes over the same SQLite queue file, so mail ``hato serve`` accepts shows
    up here as it would there.
    """

    def __init__(self, data_dir: Any) -> None:
        import io
        import threading
        from contextlib import asynccontextmanager

        import uvicorn
        from starlette.applications import Starlette

        from hato.app import build_queue, build_release_courier
        from hato.config import load_settings
        from hato.maillog import MailLog
        from hato.web import api, console
        from hato.web.context import WebContext
        from peers import free_port

        settings = load_settings(data_dir=data_dir)
        queue = build_queue(settings)
        ctx = WebContext(
            settings=settings,
            queue=queue,
            log=MailLog(io.StringIO()),
            clock=__import__("time").time,
            role="serve",
            node="browser.test",
            release_courier=build_release_courier(settings),
        )

        @asynccontextmanager
        async def lifespan(app: Any) -> Any:
            await queue.open()
            try:
                yield
            finally:
                await queue.close()

        app = Starlette(routes=[*api.routes(ctx), *console.routes(ctx)], lifespan=lifespan)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ConsoleServer:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise AssertionError("the console server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
