"""Screenshots of the web console for the READMEs: docs/console-playground.png and
docs/console-fleet.png, 1280x800, from the real service in front of a scripted fake vLLM.

    .venv/bin/python scripts/console-screenshots.py [--traffic SECONDS]

Run by hand after a change of the console's looks, not in CI. It starts a fake vLLM (answers
streamed token by token, a varying time to first token, prefix-cache counters in its metrics),
tide-vllm in front of it as two engines (gpu0, gpu1), sends chat traffic for --traffic seconds
so that the chart has something to show, then drives Debian's chromium with Playwright (as
tests/integration/test_console_ui.py does) through a conversation in Chinese and English and
onto the fleet view. Chinese glyphs need a CJK font (Debian: `apt-get install fonts-noto-cjk`);
the script stops if fontconfig knows none.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from tests.fakes.upstream import ServerThread  # noqa: E402
from tests.helpers import free_port  # noqa: E402
from tests.service import ServiceProcess  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
MODEL = "Qwen2.5-7B-Instruct"
SYSTEM = "You are a concise assistant. Answer in the user's language."
CONVERSATION = [
    (
        "用一句话介绍一下杭州。",
        "杭州是浙江省省会，以西湖的秀丽风光、悠久的历史文化和蓬勃发展的数字经济而闻名。",
    ),
    (
        "And the same in English, please.",
        "Hangzhou, the capital of Zhejiang province, is famous for the scenery of West Lake, "
        "its long history and culture, and its thriving digital economy.",
    ),
]
TRAFFIC_PROMPT = "Tell me about the tides."
TRAFFIC_ANSWER = "Tides are the rise and fall of the sea, caused by the Moon and the Sun."


def tokens_of(text: str) -> list[str]:
    """Roughly a model's tokens: words with their space, or two CJK characters at a time."""
    if any("\u4e00" <= c <= "\u9fff" for c in text):
        return [text[i : i + 2] for i in range(0, len(text), 2)]
    words = text.split(" ")
    return [words[0]] + [" " + w for w in words[1:]]


def fake_vllm() -> Starlette:
    answers = dict(CONVERSATION)
    queries = [0]

    async def chat(request: Request) -> Response:
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        tokens = tokens_of(answers.get(prompt, TRAFFIC_ANSWER))
        prompt_tokens = sum(len(m["content"]) // 3 + 4 for m in body["messages"])
        queries[0] += prompt_tokens

        def event(data: dict[str, Any]) -> bytes:
            return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return event(
                {
                    "id": "chatcmpl-demo",
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": MODEL,
                    "choices": [choice],
                }
            )

        async def events() -> AsyncIterator[bytes]:
            await asyncio.sleep(random.uniform(0.04, 0.16))  # prefill: the time to first token
            yield chunk({"role": "assistant", "content": ""})
            for token in tokens:
                yield chunk({"content": token})
                await asyncio.sleep(0.025)
            yield chunk({}, finish="stop")
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens),
                "total_tokens": prompt_tokens + len(tokens),
            }
            yield event({"id": "chatcmpl-demo", "object": "chat.completion.chunk",
                         "model": MODEL, "choices": [], "usage": usage})  # fmt: skip
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def metrics(request: Request) -> Response:
        total = queries[0]
        return Response(
            "vllm:num_requests_running 1.0\nvllm:num_requests_waiting 0.0\n"
            "vllm:kv_cache_usage_perc 0.12\n"
            f"vllm:prefix_cache_queries_total {float(total)}\n"
            f"vllm:prefix_cache_hits_total {float(int(total * 0.62))}\n",
            media_type="text/plain; version=0.0.4",
        )

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/models", models),
            Route("/metrics", metrics),
        ]
    )


def traffic(url: str, seconds: float, stop: threading.Event) -> None:
    """Streams at a rate that rises and falls, so that the chart has a shape."""
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    with httpx.Client(base_url=url, timeout=30) as client:
        while time.monotonic() < deadline and not stop.is_set():
            phase = (time.monotonic() - started) / max(seconds, 1)
            rate = 2 + 6 * (1 - abs(2 * phase - 1))  # 2/s, up to 8/s halfway, back to 2/s
            body = {
                "messages": [{"role": "user", "content": TRAFFIC_PROMPT}],
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            thread = threading.Thread(target=_stream, args=(client, body), daemon=True)
            thread.start()
            time.sleep(random.expovariate(rate))


def _stream(client: httpx.Client, body: dict[str, Any]) -> None:
    try:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            for _ in response.iter_bytes():
                pass
    except httpx.HTTPError:
        pass


def playground(page: Page, url: str, path: Path) -> None:
    page.goto(url + "/#playground")
    page.wait_for_selector(f"#model option[value='{MODEL}']", state="attached")
    page.fill("#system", SYSTEM)
    for n, (prompt, answer) in enumerate(CONVERSATION, 1):
        page.fill("#prompt", prompt)
        page.click("#send")
        last = page.locator(".message.assistant").nth(n - 1)
        expect(last).to_have_attribute("data-outcome", "done", timeout=30_000)
        expect(last.locator(".text")).to_have_text(answer)
    page.locator("#prompt").blur()
    page.screenshot(path=str(path))


def fleet(page: Page, url: str, path: Path) -> None:
    page.goto(url + "/#fleet")
    page.wait_for_selector("tr[data-engine]", timeout=15_000)
    expect(page.locator("#chart")).to_have_attribute("data-samples", re.compile(r"^[1-9]"))
    time.sleep(1)
    page.screenshot(path=str(path))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traffic", type=float, default=120, help="seconds of traffic first")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    fonts = subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True).stdout
    if not fonts.strip():
        print("no CJK font: `apt-get install fonts-noto-cjk`, then run again", file=sys.stderr)
        return 1
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is missing: `apt-get install chromium`", file=sys.stderr)
        return 1

    with ServerThread(fake_vllm(), free_port()) as upstream, tempfile.TemporaryDirectory() as tmp:
        config = {
            "web": {"bind_address": {"host": "127.0.0.1", "port": free_port()}},
            "vllm": {"auto_start": False, "host": "127.0.0.1", "port": upstream.port,
                     "model_name": MODEL},
            "engines": [{"name": "gpu0"}, {"name": "gpu1"}],
        }  # fmt: skip
        service = ServiceProcess(config, Path(tmp))
        stop = threading.Event()
        try:
            service.wait_healthy(timeout=30)
            print(f"tide-vllm on {service.url}; {args.traffic:.0f} s of traffic for the chart")
            traffic(service.url, args.traffic, stop)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM)
                context = browser.new_context(
                    viewport={"width": 1280, "height": 800}, locale="en-US"
                )
                page = context.new_page()
                args.out.mkdir(parents=True, exist_ok=True)
                playground(page, service.url, args.out / "console-playground.png")
                fleet(page, service.url, args.out / "console-fleet.png")
                browser.close()
            print(
                f"wrote {args.out / 'console-playground.png'} and {args.out / 'console-fleet.png'}"
            )
        finally:
            stop.set()
            service.terminate()
            service.kill_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
