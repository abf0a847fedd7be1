"""Mail templates for ``Mailer.send_template``: subject, text and HTML rendered with Jinja2.

A template ``NAME`` is up to three files in one folder (``HATO_TEMPLATE_DIR``, default
``./templates``)::

    password_reset.subject.txt   required: one line (surrounding whitespace is dropped)
    password_reset.txt           the text part  } at least one of the two
    password_reset.html          the HTML part  } (both: multipart/alternative)

Names may contain folders (``account/welcome``). HTML is rendered with autoescaping on,
subject and text without (they are not HTML). An undefined variable is an error, not an
empty string: a mail that says "Hello ," is worse than one that is not sent. Jinja2 is
an optional dependency (``pip install 'hato[templates]'``), imported on first use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hato.errors import ConfigError, TemplateError

if TYPE_CHECKING:
    import jinja2

__all__ = ["Rendered", "Templates"]


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    text: str | None
    html: str | None


class Templates:
    """A folder of mail templates (or any Jinja2 environment given as ``environment``)."""

    def __init__(
        self,
        directory: str | os.PathLike[str] = "templates",
        *,
        environment: jinja2.Environment | None = None,
    ) -> None:
        self.directory = Path(directory)
        self._env = environment

    def __repr__(self) -> str:
        return f"Templates({str(self.directory)!r})"

    @property
    def environment(self) -> jinja2.Environment:
        if self._env is None:
            try:
                import jinja2
            except ImportError as exc:
                raise ConfigError(
                    "send_template needs Jinja2: pip install 'hato[templates]'"
                ) from exc
            self._env = jinja2.Environment(
                loader=jinja2.FileSystemLoader(self.directory),
                autoescape=jinja2.select_autoescape(
                    enabled_extensions=("html", "htm"), default_for_string=False
                ),
                undefined=jinja2.StrictUndefined,
                keep_trailing_newline=True,
            )
        return self._env

    def _render(self, filename: str, context: dict[str, Any], *, required: bool) -> str | None:
        import jinja2

        env = self.environment
        try:
            template = env.get_template(filename)
        except jinja2.TemplateNotFound:
            if required:
                raise TemplateError(
                    f"template {filename!r} not found in {self.directory}"
                ) from None
            return None
        except jinja2.TemplateError as exc:
            raise TemplateError(f"template {filename!r}: {exc}") from None
        try:
            return template.render(context)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"template {filename!r}: {type(exc).__name__}: {exc}") from None

    def render(self, name: str, context: dict[str, Any] | Any) -> Rendered:
        """Render template ``name`` with ``context``; :class:`~hato.errors.TemplateError`
        if its subject is missing, it has neither text nor HTML, or rendering fails."""
        if not name or name.startswith(("/", "\\")) or ".." in name.split("/"):
            raise TemplateError(f"bad template name {name!r}")
        values = dict(context)
        subject = self._render(f"{name}.subject.txt", values, required=True)
        text = self._render(f"{name}.txt", values, required=False)
        html = self._render(f"{name}.html", values, required=False)
        if text is None and html is None:
            raise TemplateError(
                f"template {name!r} has neither {name}.txt nor {name}.html in {self.directory}"
            )
        assert subject is not None
        return Rendered(subject.strip(), text, html)
