"""The reference row of `make bench`: the 20-line FastAPI pass-through of FIELD-NOTES (uvicorn,
uvloop, httptools, one httpx client on the httpx-aiohttp transport; a stream relayed as it comes),
measured in the same run as tide-vllm so that a slow or busy machine shows in both. It does
nothing a gateway must do (no validation, errors, ids, limits, metrics or logs): it is the floor a
FastAPI app starts from.

    python bench/reference_passthrough.py --upstream http://127.0.0.1:8000 --port 8001
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from httpx_aiohttp import AiohttpTransport
from starlette.background import BackgroundTask

parser = argparse.ArgumentParser()
parser.add_argument("--upstream", required=True)
parser.add_argument("--port", type=int, required=True)
args = parser.parse_args()
clients: list[httpx.AsyncClient] = []


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx.AsyncClient(
        base_url=args.upstream, transport=AiohttpTransport(limits=limits), timeout=60
    ) as client:
        clients.append(client)
        yield


app = FastAPI(lifespan=lifespan)


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "healthy"}


@app.post("/v1/chat/completions")
async def chat(request: Request) -> Response:
    body = await request.body()
    if b'"stream":true' not in body:  # (the bench's requests are compact JSON)
        upstream = await clients[0].post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
        return Response(upstream.content, upstream.status_code, media_type="application/json")
    request_up = clients[0].build_request(
        "POST", "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    upstream = await clients[0].send(request_up, stream=True)
    return StreamingResponse(
        upstream.aiter_raw(),
        upstream.status_code,
        media_type=upstream.headers.get("content-type"),
        background=BackgroundTask(upstream.aclose),
    )


uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False,
            loop="uvloop", http="httptools")  # fmt: skip
