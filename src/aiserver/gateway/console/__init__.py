"""The web console: static ES modules and CSS served by the HTTP shim.

The console is one more client of the public API (``/v1/...``, ``/api/...``, ``/artifacts``,
``/variants``, with the caller's own key); these routes serve only its files, under a strict
Content-Security-Policy: no inline script or style, nothing from another origin.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

__all__ = ["SECURITY_HEADERS", "add_console_routes"]

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
}


def _load_static() -> dict[str, tuple[bytes, str]]:
    """Every file of ``static/`` by name, read once: they are small and never change."""
    files: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files(__package__).joinpath("static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in _TYPES:
            files[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    return files


def add_console_routes(app: web.Application) -> None:
    """``/`` and ``/console``: the page; ``/console/static/{name}``: its modules and CSS."""
    files = _load_static()

    def respond(name: str) -> web.Response:
        body, content_type = files[name]
        return web.Response(
            body=body,
            content_type=content_type,
            charset="utf-8",
            headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"},
        )

    async def page(_request: web.Request) -> web.Response:
        return respond("index.html")

    async def static(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in files:
            raise web.HTTPNotFound()
        return respond(name)

    app.router.add_get("/", page)
    app.router.add_get("/console", page)
    app.router.add_get("/console/", page)
    app.router.add_get("/console/static/{name}", static)
