"""The dashboard: static files served at ``/ui`` (README, "Dashboard"). No build step: plain ES
modules, with uPlot, js-yaml and @cfworker/json-schema vendored under ``static/vendor/``."""

from __future__ import annotations

from pathlib import Path

from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC = Path(__file__).parent / "static"

# 'self' only: the page can make no request to another origin (no CDN, no web fonts), and a
# script injected through job data could not send the API key anywhere.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


class DashboardFiles(StaticFiles):
    """StaticFiles (index.html for ``/ui/``) with the headers above on every response."""

    def __init__(self) -> None:
        super().__init__(directory=STATIC, html=True)

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response
