"""The web console: static pages (shipped in the package, no CDN) over the stack's OpenAI-compatible API.

Served from inference's HTTP port at /console/ beside /v1, so it reaches every API it uses on its
own origin: /v1/fine_tuning/jobs and /v1/files (forwarded to the trainer, or routed there by the
proxy), /v1/models and /v1/chat/completions. It holds no state and no credentials of its own: the
browser signs in with a TuneDock token (kept in the tab's sessionStorage) and every call carries
it, so a user sees exactly what the API lets that token see.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {
    "console.js": "text/javascript",
    "console.css": "text/css",
    "vendor/uPlot.iife.min.js": "text/javascript",  # uPlot 1.6.32 (MIT, vendor/uPlot.LICENSE): the charts
    "vendor/uPlot.min.css": "text/css",
}


def mount(app: FastAPI) -> None:
    """/console/ (the page) and its assets on `app`; `/` redirects there."""

    @app.get("/console", include_in_schema=False)
    @app.get("/console/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    for name, media in ASSETS.items():

        async def asset(name: str = name, media: str = media):
            return FileResponse(STATIC / name, media_type=media, headers={"Cache-Control": "no-cache"})

        app.add_api_route(f"/console/{name}", asset, methods=["GET"], include_in_schema=False)

    @app.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/console/")
