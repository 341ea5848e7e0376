"""The web console (`web.console`) in a real browser: Debian's chromium driven by Playwright,
against the real service process in front of a fake vLLM that streams slowly and records each
request it receives and each stream its client abandoned.

Both are required: a missing chromium or playwright fails these tests (the Makefile's test
targets install chromium with apt-get; playwright is in the `test` extra). The first tests
check the console's HTTP side in-process (the harness of conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomllib
from playwright.sync_api import Browser, Page, expect, sync_playwright
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.upstream import ServerThread
from tests.helpers import ROOT, free_port
from tests.service import ServiceProcess
from tide_vllm_cmd.app.options.plugin_web_handler import build_app

from .conftest import SETTINGS, FakeUpstream, SettableMonitor

CHROMIUM = "/usr/bin/chromium"
STATIC = ROOT / "web" / "console" / "static"
MODEL = "fake-model"
KEY = "console-test-key"
VIEWPORT = {"width": 1280, "height": 800}
SLOW = "please answer slowly"
CHINESE_PROMPT = "用一句话介绍你自己"
CHINESE_ANSWER = ["你好", "！", "我是", "一个", "测试", "用的", "模型", "，", "also English", "。"]
ENGLISH_ANSWER = ["Paris", " is", " the", " capital", " of", " France", "."]


# -- the console's HTTP side, in-process ---------------------------------------------------------


async def test_the_page_is_served_at_the_root_as_utf8_html_that_is_never_cached_stale(harness):
    page = await harness.http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["cache-control"] == "no-cache"
    assert '<meta charset="utf-8">' in page.text
    again = await harness.http.get("/", headers={"if-none-match": page.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("main.js", "text/javascript; charset=utf-8"),
        ("api.js", "text/javascript; charset=utf-8"),
        ("console.css", "text/css; charset=utf-8"),
    ],
)
async def test_the_console_files_have_their_content_types(harness, name, content_type):
    answer = await harness.http.get(f"/console/{name}")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == content_type
    assert answer.headers["cache-control"] == "no-cache"
    assert answer.content == (STATIC / name).read_bytes()


async def test_an_unknown_console_file_is_a_404_in_openais_shape(harness):
    answer = await harness.http.get("/console/nothing.js")
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == 404
    assert harness.upstream.received == []


async def test_with_the_console_off_the_root_is_relayed_to_vllm():
    upstream = FakeUpstream()
    app = build_app(
        SETTINGS, SettableMonitor(), transport=httpx.MockTransport(upstream.handle), console=False
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://tide") as http:
            root = await http.get("/")
            assert root.status_code == 404 and root.json() == {"detail": "Not Found"}  # vLLM's
            assert (await http.get("/console/main.js")).json() == {"detail": "Not Found"}
            assert (await http.get("/admin/stats")).status_code == 200


async def test_with_keys_the_page_loads_without_a_key_and_every_api_call_needs_one():
    app = build_app(SETTINGS, SettableMonitor(), api_keys=[KEY])
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://tide") as http:
            assert (await http.get("/")).status_code == 200
            assert (await http.get("/console/main.js")).status_code == 200
            for path in ("/admin/stats", "/v1/models", "/console-not-a-file", "/admin/engines"):
                assert (await http.get(path)).status_code == 401, path
            keyed = await http.get("/admin/stats", headers={"authorization": f"Bearer {KEY}"})
            assert keyed.status_code == 200


async def test_admin_stats_has_its_interval_and_samples(harness):
    stats = (await harness.http.get("/admin/stats")).json()
    assert stats["interval"] == 5
    assert isinstance(stats["samples"], list)


def test_the_console_files_are_package_data_and_fetch_nothing_from_elsewhere():
    """An installed tide-vllm (not editable: the Docker images) serves them only if pyproject
    declares them; and the console works offline: no URL of another origin in any file."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "web" in setuptools["packages"]
    patterns = setuptools["package-data"]["web"]
    files = sorted(STATIC.iterdir())
    assert {f.name for f in files} >= {"index.html", "main.js", "console.css"}
    for file in files:
        relative = file.relative_to(ROOT / "web").as_posix()
        assert any(fnmatch(relative, pattern) for pattern in patterns), relative
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", file.read_text()), file.name


# -- a fake vLLM for the browser -----------------------------------------------------------------


@dataclass
class Record:
    """What the fake vLLM saw: each request's body, and each stream abandoned by its client."""

    bodies: list[dict[str, Any]] = field(default_factory=list)
    abandoned: list[str] = field(default_factory=list)  # the last user message of each
    cancelled: threading.Event = field(default_factory=threading.Event)

    def clear(self) -> None:
        self.bodies.clear()
        self.abandoned.clear()
        self.cancelled.clear()


def answer_to(prompt: str) -> tuple[list[str], float]:
    """The tokens of the answer to `prompt`, and the pause before each."""
    if prompt == SLOW:
        return [f" token{i}" for i in range(400)], 0.05  # 20 s: long enough to press stop
    if re.search(r"[\u4e00-\u9fff]", prompt):
        return CHINESE_ANSWER, 0.05
    return ENGLISH_ANSWER, 0.08


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    event = {
        "id": "chatcmpl-console",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"


def fake_vllm(record: Record) -> Starlette:
    async def chat(request: Request) -> Response:
        body = await request.json()
        record.bodies.append(body)
        prompt = body["messages"][-1]["content"]
        tokens, pause = answer_to(prompt)
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(tokens)}
            return JSONResponse({"choices": [{"index": 0, "message": message}], "model": MODEL})

        async def events() -> AsyncIterator[bytes]:
            finished = False
            try:
                yield chunk({"role": "assistant", "content": ""})
                for token in tokens:
                    await asyncio.sleep(pause)
                    yield chunk({"content": token})
                yield chunk({}, finish="stop")
                if (body.get("stream_options") or {}).get("include_usage"):
                    n = len(tokens)
                    usage = {"prompt_tokens": 12, "completion_tokens": n, "total_tokens": 12 + n}
                    yield b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
                finished = True
            finally:
                if not finished:
                    record.abandoned.append(prompt)
                    record.cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(request: Request) -> Response:
        model = {"id": MODEL, "object": "model", "owned_by": "vllm", "max_model_len": 4096}
        return JSONResponse({"object": "list", "data": [model]})

    async def metrics(request: Request) -> Response:
        return Response(
            "vllm:num_requests_running 0.0\nvllm:num_requests_waiting 0.0\n"
            "vllm:kv_cache_usage_perc 0.05\n"
            "vllm:prefix_cache_queries_total 1000.0\nvllm:prefix_cache_hits_total 600.0\n",
            media_type="text/plain; version=0.0.4",
        )

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/models", models),
            Route("/metrics", metrics),
        ]
    )


def console_config(upstream_port: int, api_keys: list[str] | None = None) -> dict[str, Any]:
    """Two engines, gpu0 and gpu1, both the fake vLLM (external: manual mode)."""
    return {
        "web": {"bind_address": {"host": "127.0.0.1", "port": free_port()}},
        "vllm": {
            "auto_start": False,
            "host": "127.0.0.1",
            "port": upstream_port,
            "model_name": MODEL,
            "timeout": 60,
        },
        "engines": [{"name": "gpu0"}, {"name": "gpu1"}],
        "auth": {"api_keys": api_keys or []},
    }


# -- fixtures: one fake vLLM, two services (open, with keys), one browser ------------------------


@pytest.fixture(scope="module")
def record() -> Record:
    return Record()


@pytest.fixture(scope="module")
def upstream(record: Record) -> Iterator[ServerThread]:
    with ServerThread(fake_vllm(record), free_port()) as server:
        yield server


def running_service(config: dict[str, Any], tmp_path: Path) -> Iterator[ServiceProcess]:
    service = ServiceProcess(config, tmp_path)
    try:
        service.wait_healthy(timeout=30)
        yield service
        code, _ = service.terminate()
        assert code == 0, service.log()[-3000:]
    finally:
        service.kill_all()


@pytest.fixture(scope="module")
def service(upstream, tmp_path_factory) -> Iterator[ServiceProcess]:
    yield from running_service(console_config(upstream.port), tmp_path_factory.mktemp("open"))


@pytest.fixture(scope="module")
def keyed_service(upstream, tmp_path_factory) -> Iterator[ServiceProcess]:
    config = console_config(upstream.port, api_keys=[KEY])
    yield from running_service(config, tmp_path_factory.mktemp("keyed"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), (
        f"{CHROMIUM} is missing: `apt-get install chromium` (the Makefile's test targets do it)"
    )
    expect.set_options(timeout=10_000)  # a busy CI machine: 10 s, not 5, for what is awaited
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@dataclass
class Tab:
    """A page of a fresh browser context (its own session storage), and every request it made
    with its Authorization header and every answer's status."""

    page: Page
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    statuses: list[tuple[str, int]] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)  # requests to another origin
    errors: list[str] = field(default_factory=list)  # uncaught errors of the page's scripts


@pytest.fixture
def tab(browser: Browser) -> Iterator[Tab]:
    context = browser.new_context(viewport=VIEWPORT, locale="en-US")
    page = context.new_page()
    page.set_default_timeout(10_000)
    tab = Tab(page)

    def on_request(request: Any) -> None:
        tab.requests.append((request.url, request.headers.get("authorization")))
        if not request.url.startswith(("http://127.0.0.1:", "data:")):
            tab.elsewhere.append(request.url)

    page.on("request", on_request)
    page.on("response", lambda response: tab.statuses.append((response.url, response.status)))
    page.on("pageerror", lambda error: tab.errors.append(str(error)))
    page.on(  # what the page's own policy refused (an inline style, an eval, another origin)
        "console",
        lambda message: (
            tab.errors.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    yield tab
    context.close()
    assert tab.errors == [], "the page's scripts failed"
    assert tab.elsewhere == [], "the page fetched from another origin"


def open_console(tab: Tab, service: ServiceProcess, view: str = "playground") -> Page:
    page = tab.page
    page.goto(f"{service.url}/#{view}")
    if view == "playground":
        page.wait_for_selector(f"#model option[value='{MODEL}']", state="attached")
    return page


def send(page: Page, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.click("#send")


def last_answer(page: Page) -> Any:
    return page.locator(".message.assistant").last


def record_answer_texts(page: Page) -> None:
    """Keep every text the last answer shows, as it streams (read back with answer_texts)."""
    page.evaluate(
        """() => {
          window.answerTexts = [];
          new MutationObserver(() => {
            const answers = document.querySelectorAll('.message.assistant .text');
            const last = answers[answers.length - 1];
            if (last && last.textContent !== window.answerTexts.at(-1)) {
              window.answerTexts.push(last.textContent);
            }
          }).observe(document.getElementById('messages'),
                     {childList: true, subtree: true, characterData: true});
        }"""
    )


# -- the browser tests ---------------------------------------------------------------------------


def test_the_answer_streams_into_the_page_token_by_token(browser, tab, service, record):
    record.clear()
    page = open_console(tab, service)
    record_answer_texts(page)
    send(page, "What is the capital of France?")
    answer = last_answer(page)
    expect(answer).to_have_attribute("data-outcome", "done")
    expect(answer.locator(".text")).to_have_text("".join(ENGLISH_ANSWER))
    texts = page.evaluate("window.answerTexts")
    assert len(texts) >= len(ENGLISH_ANSWER) - 1, texts  # shown as it came, not at the end
    assert all("".join(ENGLISH_ANSWER).startswith(text) for text in texts), texts
    meta = answer.locator(".meta").inner_text()
    assert "12 prompt + 7 completion = 19 tokens" in meta and "TTFT" in meta, meta
    body = record.bodies[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == MODEL
    assert tab.elsewhere == [] and tab.errors == []


def test_the_settings_and_the_conversation_go_with_each_message(browser, tab, service, record):
    record.clear()
    page = open_console(tab, service)
    page.fill("#system", "You are terse.")
    page.locator("#temperature").evaluate(  # a range input: set, then tell the page
        "(e) => { e.value = '0.3'; e.dispatchEvent(new Event('input')); }"
    )
    page.fill("#max-tokens", "64")
    send(page, "What is the capital of France?")
    expect(last_answer(page)).to_have_attribute("data-outcome", "done")
    send(page, "And of Italy?")
    expect(page.locator(".message.assistant")).to_have_count(2)
    expect(last_answer(page)).to_have_attribute("data-outcome", "done")
    assert len(record.bodies) == 2
    second = record.bodies[1]
    assert second["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "".join(ENGLISH_ANSWER)},
        {"role": "user", "content": "And of Italy?"},
    ]
    assert second["temperature"] == 0.3 and second["max_tokens"] == 64


def test_a_chinese_answer_shows_as_it_was_written(browser, tab, service, record):
    page = open_console(tab, service)
    assert page.evaluate("document.characterSet") == "UTF-8"
    send(page, CHINESE_PROMPT)
    answer = last_answer(page)
    expect(answer).to_have_attribute("data-outcome", "done")
    expect(answer.locator(".text")).to_have_text("".join(CHINESE_ANSWER))
    expect(page.locator(".message.user .text").last).to_have_text(CHINESE_PROMPT)
    font = page.evaluate("getComputedStyle(document.body).fontFamily")
    assert "Noto Sans CJK SC" in font and "Microsoft YaHei" in font, font  # CJK fallbacks


def test_stop_cancels_the_stream_and_the_upstream_request(browser, tab, service, record):
    record.clear()
    page = open_console(tab, service)
    send(page, SLOW)
    answer = last_answer(page)
    expect(answer.locator(".text")).to_contain_text("token3")
    expect(page.locator("#stop")).to_be_enabled()
    page.click("#stop")
    expect(answer).to_have_attribute("data-outcome", "stopped")
    assert record.cancelled.wait(5), "the fake vLLM's stream was not cancelled"
    assert record.abandoned == [SLOW]
    shown = answer.locator(".text").inner_text()
    time.sleep(0.5)
    assert answer.locator(".text").inner_text() == shown, "the answer went on after stop"
    assert "token399" not in shown
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()


def test_draining_an_engine_shows_its_state_change(browser, tab, service):
    """Needs /admin/engines and its drain and resume (the fleet's routing, on main)."""
    page = open_console(tab, service, "fleet")
    gpu1 = page.locator("tr[data-engine='gpu1']")
    expect(gpu1.locator(".state")).to_have_attribute("data-state", "ready")
    expect(page.locator("tr[data-engine='gpu0'] .state")).to_have_attribute("data-state", "ready")
    gpu1.get_by_role("button", name="Drain").click()
    expect(gpu1.locator(".state")).to_have_attribute("data-state", "draining")
    engines = httpx.get(service.url + "/admin/engines").json()["engines"]
    assert {e["name"]: e["draining"] for e in engines} == {"gpu0": False, "gpu1": True}
    gpu1.get_by_role("button", name="Resume").click()
    expect(gpu1.locator(".state")).to_have_attribute("data-state", "ready")
    expect(page.locator("#fleet-error")).to_be_empty()


def contract_engine(name: str, **changes: Any) -> dict[str, Any]:
    """An engine as /admin/engines describes it."""
    return {
        "name": name, "model": MODEL, "base_url": "http://127.0.0.1:8001", "auto_start": True,
        "state": "ready", "state_seconds": 100.0, "detail": "", "healthy": True,
        "draining": False, "breaker": "closed", "requests_in_flight": 0, "tokens_in_flight": 0,
        "waiting": None, "kv_cache_usage": None, "restarts": 0, "dispatched": 10, "failures": 0,
        "estimated_hit_rate": None, "prefix_cache_hit_rate": None, **changes,
    }  # fmt: skip


def test_each_engine_shows_its_state_load_restarts_and_prefix_cache_hits(browser, tab, service):
    """Every state of /admin/engines' contract, answered here by the test for the page."""
    engines = [
        contract_engine("gpu0", requests_in_flight=3, waiting=2.0, tokens_in_flight=1500,
                        kv_cache_usage=0.25, prefix_cache_hit_rate=0.6),
        contract_engine("gpu1", state="starting", state_seconds=12.5, healthy=False),
        contract_engine("gpu2", state="failed", restarts=3, detail="vLLM exited with code 1"),
        contract_engine("gpu3", state="draining", draining=True),
        contract_engine("gpu4", state="restarting", state_seconds=2.0, restarts=1),
    ]  # fmt: skip
    since = time.monotonic()

    def answer(route: Any) -> None:
        engines[1]["state_seconds"] = 12.5 + time.monotonic() - since  # starting for 12.5 s
        route.fulfill(json={"policy": "prefix", "engines": engines})

    tab.page.route("**/admin/engines", answer)
    page = open_console(tab, service, "fleet")
    row = {e["name"]: page.locator(f"tr[data-engine='{e['name']}']") for e in engines}
    expect(row["gpu0"].locator(".state")).to_have_text("ready")
    expect(row["gpu0"].locator(".load")).to_contain_text("3 running · 2 waiting")
    expect(row["gpu0"].locator(".in-flight")).to_contain_text("3 requests")
    expect(row["gpu0"].locator(".hit-rate")).to_have_text("60.0 %")
    expect(row["gpu0"].locator(".kv")).to_have_text("25.0 %")
    starting = row["gpu1"].locator(".state")
    expect(starting).to_have_text(re.compile(r"^starting · \d+ s$"))
    first = int(starting.inner_text().split(" · ")[1].removesuffix(" s"))
    assert first >= 12
    expect(row["gpu1"].locator(".hit-rate")).to_have_text("–")
    expect(row["gpu2"].locator(".state")).to_have_text("failed")
    expect(row["gpu2"]).to_contain_text("vLLM exited with code 1")
    expect(row["gpu2"].locator(".restarts")).to_have_text("3")
    expect(row["gpu3"].get_by_role("button")).to_have_text("Resume")
    expect(row["gpu0"].get_by_role("button")).to_have_text("Drain")
    expect(row["gpu4"].locator(".state")).to_contain_text("restarting · ")
    # The elapsed time of a starting engine moves on, between polls too (every 3 s).
    expect(starting).to_have_text(re.compile(rf"^starting · (?!{first} s|{first + 1} s)\d+ s$"))
    assert tab.errors == []


def test_the_fleet_view_draws_the_chart_of_admin_stats(browser, tab, service):
    page = open_console(tab, service, "fleet")
    expect(page.locator("#chart")).to_have_attribute("data-samples", re.compile(r"^\d+$"))
    assert (service.url + "/admin/stats", 200) in tab.statuses
    assert tab.errors == []


def test_the_chart_shows_both_series(browser, tab, service):
    """Ten minutes of samples (answered here by the test): both lines are drawn."""
    now = time.time()
    samples = [
        {"t": now - 600 + 5 * i, "requests_per_s": 2 + i % 7, "ttft_p50_ms": 100.0 + i % 50}
        for i in range(1, 121)
    ]
    tab.page.route(
        "**/admin/stats",
        lambda route: route.fulfill(json={"interval": 5, "samples": samples}),
    )
    page = open_console(tab, service, "fleet")
    expect(page.locator("#chart")).to_have_attribute("data-samples", "120")
    expect(page.locator("#now-rps")).to_have_text(f"{samples[-1]['requests_per_s']:.2f}")
    expect(page.locator("#now-ttft")).to_have_text(f"{round(samples[-1]['ttft_p50_ms'])} ms")
    drawn = page.evaluate(
        """() => {
          const canvas = document.getElementById('chart');
          const pixels = canvas.getContext('2d')
            .getImageData(0, 0, canvas.width, canvas.height).data;
          const near = (i, [r, g, b]) => Math.abs(pixels[i] - r)
            + Math.abs(pixels[i + 1] - g) + Math.abs(pixels[i + 2] - b) < 60;
          let rps = 0, ttft = 0;
          for (let i = 0; i < pixels.length; i += 4) {
            if (near(i, [0x1f, 0x6f, 0xeb])) rps += 1;
            if (near(i, [0xe3, 0x62, 0x09])) ttft += 1;
          }
          return {rps, ttft, width: canvas.width};
        }"""
    )
    width = drawn["width"]
    assert drawn["rps"] > width and drawn["ttft"] > width, drawn  # lines across the chart


def test_with_keys_the_page_asks_for_one_and_is_refused_without_it(browser, tab, keyed_service):
    page = tab.page
    page.goto(keyed_service.url + "/")
    expect(page.locator("#key-panel")).to_be_visible()
    expect(page.locator("#key-error")).to_contain_text("401")
    expect(page.locator("main")).to_be_hidden()
    assert (keyed_service.url + "/", 200) in tab.statuses  # the page itself needs no key
    assert (keyed_service.url + "/v1/models", 401) in tab.statuses

    page.fill("#key-input", "not-the-key")
    page.click("#key-submit")
    expect(page.locator("#key-error")).to_contain_text("This key was refused")
    expect(page.locator("main")).to_be_hidden()


def test_with_keys_every_call_carries_the_key_kept_in_the_tabs_session(
    browser, tab, keyed_service, record
):
    page = tab.page
    page.goto(keyed_service.url + "/")
    expect(page.locator("#key-panel")).to_be_visible()
    given = len(tab.requests)
    page.fill("#key-input", KEY)
    page.click("#key-submit")
    page.wait_for_selector(f"#model option[value='{MODEL}']", state="attached")
    assert page.evaluate("sessionStorage.getItem('tide-vllm.api-key')") == KEY
    send(page, "What is the capital of France?")
    expect(last_answer(page)).to_have_attribute("data-outcome", "done")
    page.goto(keyed_service.url + "/#fleet")
    page.reload()  # the key stays for the tab's session: no prompt
    expect(page.locator("#chart")).to_have_attribute("data-samples", re.compile(r"^\d+$"))
    expect(page.locator("#key-panel")).to_be_hidden()

    def is_the_page(path: str) -> bool:
        return path == "/" or path.startswith("/console/")

    calls = [
        (url.removeprefix(keyed_service.url), auth)
        for url, auth in tab.requests[given:]
        if not is_the_page(url.removeprefix(keyed_service.url))
    ]
    paths = {path for path, _ in calls}
    assert {"/v1/models", "/v1/chat/completions", "/admin/stats", "/health"} <= paths, paths
    assert all(auth == f"Bearer {KEY}" for _, auth in calls), calls
