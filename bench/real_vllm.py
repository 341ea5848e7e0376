"""tide-vllm in front of a real vLLM: how much of a real request's time the gateway adds.

Given a running vLLM and a tide-vllm in front of it, this sends the same chat request
(temperature 0, top_p 1, `max_tokens` 32 by default) `--runs` times straight to vLLM and
through tide-vllm, alternating which goes first, one request at a time, after a warm-up; then it
prints the medians and the difference in ms and %, and whether the answers were the same text.
The Tide shape (`{"prompt": …}` to /chat/completions, no system prompt, so the same messages)
is measured too, against the same direct OpenAI call.

In auto-start mode tide-vllm gives vLLM a bearer key; choose it yourself so that the direct
calls can send it too (`TIDE_VLLM__VLLM__API_KEY=…` when starting tide-vllm, the same value in
`--vllm-api-key` or the environment variable BENCH_VLLM_API_KEY here):

    TIDE_VLLM__VLLM__API_KEY=bench TIDE_VLLM__WEB__BIND_ADDRESS__PORT=10002 \\
        TIDE_VLLM__VLLM__PORT=8000 .venv/bin/python cmd/tide-vllm/main.py -c conf/tide-vllm.cpu.yaml
    .venv/bin/python bench/real_vllm.py --tide-url http://127.0.0.1:10002 \\
        --vllm-url http://127.0.0.1:8000 --vllm-api-key bench
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from bench_report import machine_info, write_json

RESULTS = Path(__file__).resolve().parent / "results" / "real_vllm.json"


@dataclass
class Series:
    name: str
    seconds: list[float] = field(default_factory=list)
    texts: set[str] = field(default_factory=set)
    tokens: list[int] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.seconds) * 1000 if self.seconds else 0.0


def served_model(client: httpx.Client, vllm_url: str, headers: dict[str, str]) -> str:
    models = client.get(vllm_url + "/v1/models", headers=headers).raise_for_status().json()
    return str(models["data"][0]["id"])


def requests_for(model: str, args: argparse.Namespace) -> dict[str, tuple[str, dict[str, Any]]]:
    # What reaches vLLM must be the same on every path: greedy sampling, no seed (the Tide shape
    # has none), and top_p 1 (else the Tide shape sends the configured vllm.top_p, and vLLM's
    # top-p filtering is slower: the Tide path measured +2.1…3.8 % with it, +1.0 % without).
    messages = [{"role": "user", "content": args.prompt}]
    openai = {
        "model": model,
        "messages": messages,
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "top_p": 1.0,
    }
    tide = {
        "prompt": args.prompt,
        "system_prompt": "",
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "top_p": 1.0,
    }
    return {
        "direct": (args.vllm_url + "/v1/chat/completions", openai),
        "through_openai": (args.tide_url + "/v1/chat/completions", openai),
        "through_tide": (args.tide_url + "/chat/completions", tide),
    }


def answer_text(body: dict[str, Any]) -> tuple[str, int]:
    if "choices" in body:
        text = body["choices"][0]["message"].get("content") or ""
    else:
        text = body.get("content") or ""
    return text, int((body.get("usage") or {}).get("completion_tokens") or 0)


def timed(
    client: httpx.Client, url: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    response = client.post(url, json=body, headers=headers)
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    return elapsed, response.json()


def measure(args: argparse.Namespace) -> dict[str, Series]:
    key = {"Authorization": f"Bearer {args.vllm_api_key}"} if args.vllm_api_key else {}
    with httpx.Client(timeout=args.timeout) as client:
        model = served_model(client, args.vllm_url, key)
        targets = requests_for(model, args)
        headers = {name: key if name == "direct" else {} for name in targets}
        series = {name: Series(name) for name in targets}
        for _ in range(args.warmup):
            for name, (url, body) in targets.items():
                timed(client, url, body, headers[name])
        names = list(targets)
        for i in range(args.runs):
            order = names if i % 2 == 0 else names[::-1]  # alternate who goes first
            for name in order:
                url, body = targets[name]
                seconds, answer = timed(client, url, body, headers[name])
                text, tokens = answer_text(answer)
                series[name].seconds.append(seconds)
                series[name].texts.add(text)
                series[name].tokens.append(tokens)
    return series


def paired_ms(series: Series, direct: Series) -> list[float]:
    """Per round, this path minus the direct call (rounds alternate who goes first), in ms:
    the machine's drift cancels out, so the median of these is the steadier estimate."""
    return [(a - b) * 1000 for a, b in zip(series.seconds, direct.seconds, strict=True)]


def report(series: dict[str, Series], out: Callable[[str], None] = print) -> dict[str, Any]:
    direct = series["direct"]
    rows: dict[str, Any] = {}
    heads = ("median", 12), ("added", 12), ("added %", 10), ("paired", 12), ("± sem", 10)
    out(" " * 16 + "".join(f"{h:>{w}}" for h, w in heads) + f"{'tokens':>8}")
    for name, s in series.items():
        added = s.median_ms - direct.median_ms
        pct = added / direct.median_ms * 100 if direct.median_ms else 0.0
        diffs = paired_ms(s, direct)
        paired = statistics.median(diffs) if diffs else 0.0
        sem = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
        tokens = statistics.median(s.tokens) if s.tokens else 0
        out(
            f"{name:16}{s.median_ms:>9.2f} ms{added:>+9.2f} ms{pct:>+9.2f}%"
            f"{paired:>+9.2f} ms{sem:>7.2f} ms{tokens:>8.0f}"
        )
        rows[name] = {
            **asdict(s),
            "texts": sorted(s.texts),
            "median_ms": s.median_ms,
            "added_ms": added,
            "added_pct": pct,
            "paired_median_ms": paired,
            "paired_sem_ms": sem,
        }
    same = all(s.texts == direct.texts for s in series.values())
    out("added: difference of the medians; paired: median of the per-round differences")
    out(f"same answer text on every path: {'yes' if same else 'NO'}")
    rows["same_text"] = same
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tide-url", required=True, help="e.g. http://127.0.0.1:10002")
    parser.add_argument("--vllm-url", required=True, help="e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--vllm-api-key",
        default=os.environ.get("BENCH_VLLM_API_KEY"),
        help="bearer key for the direct calls (default: $BENCH_VLLM_API_KEY)",
    )
    parser.add_argument("--runs", type=int, default=20, help="requests per path (default 20)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.tide_url, args.vllm_url = args.tide_url.rstrip("/"), args.vllm_url.rstrip("/")
    series = measure(args)
    rows = report(series)
    machine = machine_info(Path(__file__).resolve().parent.parent)
    settings = {k: str(v) for k, v in vars(args).items() if k != "vllm_api_key"}
    write_json(args.output, {"machine": machine, "args": settings, "results": rows})
    print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
