"""``hato health``: is the ``hato serve`` (or ``hato worker``) on this machine ready?

Asks its ``/readyz`` and exits 0 (ready) or 1 (not ready, or no answer), with one line
of output: made for a container's ``HEALTHCHECK``. Sends ``HATO_HTTP_TOKEN`` (or the
content of ``HATO_HTTP_TOKEN_FILE``) when set; ``/readyz`` needs none, but a proxy in
front may.
"""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import click
import httpx

from hato.cli import friendly, main, make_settings, settings_options
from hato.config import Settings
from hato.errors import ConfigError
from hato.web.security import is_loopback_host

TIMEOUT = 5.0


def default_url(settings: Settings) -> str:
    """``/readyz`` of this machine's listener, from HATO_HTTP_LISTEN (``hato serve``'s
    default when unset); a wildcard address is asked on loopback."""
    where = settings.http_listener("serve")
    if where is None:
        raise ConfigError("the HTTP listener is off (HATO_HTTP_LISTEN is empty); pass --url")
    host, port = where
    if port == 0:
        raise ConfigError("HATO_HTTP_LISTEN has port 0; pass --url with the bound port")
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    shown = f"[{host}]" if ":" in host else host
    scheme = "https" if settings.http_tls else "http"
    return f"{scheme}://{shown}:{port}/readyz"


def readyz_url(url: str) -> str:
    """A base URL gets ``/readyz``; a URL with a path is asked as it is."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"--url {url!r}: expected http://HOST:PORT or https://HOST:PORT")
    if parts.path in ("", "/"):
        parts = parts._replace(path="/readyz")
    return urlunsplit(parts)


def summary(body: object) -> str:
    """The failing checks of a ``/readyz`` body, as one line."""
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return str(body["detail"])  # a problem body (RFC 9457)
    if not isinstance(body, dict) or not isinstance(body.get("checks"), dict):
        return "unexpected answer"
    failing = [
        f"{name}: {check.get('detail', '')}"
        for name, check in body["checks"].items()
        if isinstance(check, dict) and not check.get("ok")
    ]
    return "; ".join(failing) or str(body.get("status", ""))


@main.command()
@settings_options
@click.option("--url", help="The listener's URL (default: from HATO_HTTP_LISTEN).")
@friendly
def health(
    config_file: Path | None, data_dir: Path | None, queue_url: str | None, url: str | None
) -> None:
    """Exit 0 if the local Hato is ready (its /readyz), else 1; one line of output."""
    settings = make_settings(config_file, data_dir=data_dir, queue_url=queue_url)
    target = readyz_url(url) if url else default_url(settings)
    headers = {"Accept": "application/json"}
    token = settings.http_token_value()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    host = urlsplit(target).hostname or ""
    # Our own process on loopback, perhaps with a self-signed certificate.
    verify = not is_loopback_host(host)
    try:
        response = httpx.get(target, headers=headers, timeout=TIMEOUT, verify=verify)
    except httpx.HTTPError as exc:
        click.echo(f"not ready: {target}: {exc or type(exc).__name__}")
        sys.exit(1)
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code == 200:
        click.echo(f"ready ({target})")
        return
    click.echo(f"not ready: HTTP {response.status_code}: {summary(body)}")
    sys.exit(1)
