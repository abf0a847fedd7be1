"""The HTTP side of Hato: health, metrics, the JSON API and the web console.

One Starlette application per process, served in-process beside the SMTP listeners
(:mod:`hato.web.server`). Each part contributes its routes through a ``routes(ctx)``
function taking the one :class:`~hato.web.context.WebContext` that ``app.py`` builds:
:mod:`hato.web.api` (``/api/v1/messages``...), :mod:`hato.web.events_api`
(``/api/v1/events``), :mod:`hato.web.console` (``/``).
"""
