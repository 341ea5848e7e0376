"""The web console (`web.console`): a page at `/` and its files under `/console/`, plain HTML,
CSS and JavaScript shipped in the package (web/console/static/), no build step and nothing
fetched from elsewhere; and `/admin/stats`, the chart's samples (web/console_stats.py).

The page and its files are static and open (web/gateway.py lets them through without a key);
every call the page makes goes to the service's own API, with the key the user gives.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from web.console_stats import StatsSampler

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
INDEX = "index.html"
# The page talks to its own origin only; no inline script, no other origin (works offline).
PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def static_files() -> Traversable:
    """The console's files, as installed with the package (pyproject's package-data)."""
    return resources.files("web") / "console" / "static"


@dataclass(frozen=True, slots=True)
class _File:
    body: bytes
    content_type: str
    etag: str


def _load(folder: Traversable) -> dict[str, _File]:
    files = {}
    for entry in folder.iterdir():
        suffix = entry.name[entry.name.rfind(".") :]
        if entry.is_file() and suffix in CONTENT_TYPES:
            body = entry.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
            files[entry.name] = _File(body, CONTENT_TYPES[suffix], etag)
    if INDEX not in files:
        raise RuntimeError(f"the console's {INDEX} is missing from {folder}")
    return files


def console_router(folder: Traversable | None = None) -> APIRouter:
    """`/` and `/console/{name}`, read once from `folder` (by default the package's files).
    `Cache-Control: no-cache`: the browser asks again each time, and an unchanged file is a
    304 (its ETag), so a new release is never hidden behind an old cached file."""
    files = _load(folder or static_files())
    router = APIRouter(include_in_schema=False)

    def answer(request: Request, file: _File, extra: dict[str, str] | None = None) -> Response:
        headers = {
            "cache-control": "no-cache",
            "etag": file.etag,
            "x-content-type-options": "nosniff",
            **(extra or {}),
        }
        if file.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(file.body, media_type=file.content_type, headers=headers)

    @router.get("/")
    async def page(request: Request) -> Response:
        return answer(
            request,
            files[INDEX],
            {"content-security-policy": PAGE_POLICY, "referrer-policy": "no-referrer"},
        )

    @router.get("/console/{name}")
    async def asset(request: Request, name: str) -> Response:
        file = files.get(name)
        if file is None or name == INDEX:
            raise HTTPException(404, f"the console has no file {name!r}")
        return answer(request, file)

    return router


class StatsSample(BaseModel):
    t: float = Field(description="Unix time (seconds) at the end of the interval.")
    requests_per_s: float = Field(
        description="Requests for the model (chat and vLLM's API) per second in the interval."
    )
    ttft_p50_ms: float | None = Field(
        description="Median time to first token of the streams of the interval (bucket "
        "interpolation); null when there were none."
    )


class StatsResponse(BaseModel):
    interval: float = Field(description="Seconds between samples.")
    samples: list[StatsSample] = Field(description="Oldest first: the last 10 minutes.")


stats_router = APIRouter()


@stats_router.get(
    "/admin/stats",
    response_model=StatsResponse,
    summary="Requests/s and time to first token p50, the last 10 minutes (the console's chart)",
)
async def stats(request: Request) -> JSONResponse:
    sampler: StatsSampler = request.app.state.stats
    return JSONResponse(sampler.as_json())
