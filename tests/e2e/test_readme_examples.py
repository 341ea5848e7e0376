"""The README's first requests run as written, in both languages, against the real service.

The runnable examples are the ```bash and ```python blocks between the README's
`<!-- readme-examples: begin -->` and `<!-- readme-examples: end -->` markers. Each `curl`
command and each Python script is run as it is written, with two changes only: the address
(`http://localhost:10002`) becomes the test service's, and the test service's API key is added
(a header for curl, the SDK's `api_key`). What is checked is what tide-vllm controls (status,
shape, fields, token counts within `max_tokens`), never the model's words, which change with the
CPU's numerics.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest

from tests.helpers import ROOT

from .conftest import API_KEY

pytestmark = pytest.mark.e2e

READMES = ("README.md", "README.zh-CN.md")
BEGIN, END = "<!-- readme-examples: begin -->", "<!-- readme-examples: end -->"
README_URL = "http://localhost:10002"
TIDE_FIELDS = {"request_id", "content", "model", "usage", "finish_reason", "error"}
RUN_TIMEOUT = 240


@dataclass(frozen=True)
class Example:
    readme: str
    language: str  # "bash" (one curl command) or "python" (one script)
    code: str

    @property
    def max_tokens(self) -> int | None:
        found = re.search(r'"max_tokens":\s*(\d+)|max_tokens=(\d+)', self.code)
        return int(found.group(1) or found.group(2)) if found else None


def runnable_examples(readme: str) -> list[Example]:
    text = (ROOT / readme).read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"{readme}: one pair of markers"
    region = text[text.index(BEGIN) : text.index(END)]
    found: list[Example] = []
    for language, block in re.findall(r"^```(\w+)\n(.*?)^```$", region, re.M | re.S):
        assert language in ("bash", "python"), f"{readme}: a ```{language} block among examples"
        if language == "python":
            found.append(Example(readme, language, block))
            continue
        for command in shell_commands(block):
            assert command.startswith("curl "), f"{readme}: not a curl command: {command}"
            found.append(Example(readme, language, command))
    return found


def shell_commands(block: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments and blanks left out."""
    commands, pending = [], ""
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.removesuffix("\\") + ("\n" if line.endswith("\\") else "")
        if not line.endswith("\\"):
            commands.append(re.sub(r"\s*\n\s*", " ", pending).strip())
            pending = ""
    assert not pending, f"a continuation line ends the block: {pending}"
    return commands


def without_comments(code: str) -> str:
    lines = (re.sub(r"\s+#\s.*$", "", line).rstrip() for line in code.splitlines())
    return "\n".join(line for line in lines if line and not line.lstrip().startswith("#"))


EXAMPLES = [example for readme in READMES for example in runnable_examples(readme)]
CURL = [e for e in EXAMPLES if e.language == "bash"]
PYTHON = [e for e in EXAMPLES if e.language == "python"]


def example_id(example: Example) -> str:
    same = [e for e in EXAMPLES if (e.readme, e.language) == (example.readme, example.language)]
    return f"{example.readme}:{example.language}{same.index(example) + 1}"


def clean_env() -> dict[str, str]:
    """The environment without proxies: the examples talk to the service on loopback."""
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


def test_both_readmes_show_the_same_runnable_examples():
    english, chinese = (
        [without_comments(e.code) for e in EXAMPLES if e.readme == readme] for readme in READMES
    )
    assert english == chinese
    assert any("/chat/completions" in c and '"prompt"' in c for c in english)
    assert any("/v1/chat/completions" in c and '"messages"' in c for c in english)
    assert any('"stream": true' in c for c in english)
    assert len(PYTHON) == 2 * 2  # a plain call and a stream, in each README


@pytest.mark.parametrize("example", CURL, ids=[example_id(e) for e in CURL])
def test_each_curl_example_runs_and_answers(example, real_service):
    assert README_URL in example.code
    command = example.code.replace(README_URL, real_service.url, 1)
    command = re.sub(
        r"^curl ",
        f'curl -sS --fail-with-body -H "Authorization: Bearer {API_KEY}" ',
        command,
    )
    done = subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=clean_env(),
    )
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    path = re.search(re.escape(README_URL) + r"(/[\w/]*)", example.code).group(1)
    if '"stream": true' in example.code:
        check_stream(path, done.stdout, example.max_tokens)
    else:
        check_json(path, json.loads(done.stdout), example.max_tokens)


@pytest.mark.parametrize("example", PYTHON, ids=[example_id(e) for e in PYTHON])
def test_each_python_example_runs_and_prints_an_answer(example, real_service, tmp_path):
    script, urls = re.subn(re.escape(README_URL + "/v1"), real_service.url + "/v1", example.code)
    script, keys = re.subn(r'api_key="[^"]*"', f'api_key="{API_KEY}"', script)
    assert urls == 1 and keys == 1, "the example names base_url and api_key once each"
    path = tmp_path / "chat.py"
    path.write_text(script, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=clean_env(),
        cwd=tmp_path,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert done.stdout.strip(), "the example printed nothing"


def check_json(path: str, body: Any, max_tokens: int | None) -> None:
    assert isinstance(body, dict), body
    if path == "/health":
        assert body["status"] == "healthy" and body["vllm_healthy"] is True
    elif path == "/v1/models":
        assert body["object"] == "list" and body["data"] and all("id" in m for m in body["data"])
    elif path == "/chat/completions":
        assert set(body) == TIDE_FIELDS, body
        assert body["error"] is None
        assert isinstance(body["content"], str) and body["content"].strip()
        assert body["finish_reason"] in ("stop", "length")
        check_usage(body["usage"], max_tokens)
    elif path == "/v1/chat/completions":
        assert body["object"] == "chat.completion", body
        message = body["choices"][0]["message"]
        assert message["role"] == "assistant" and message["content"].strip()
        check_usage(body["usage"], max_tokens)
    else:
        pytest.fail(f"no check for the example's route {path}")


def check_stream(path: str, output: str, max_tokens: int | None) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines and all(line.startswith("data: ") for line in lines), output
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert events
    if path == "/chat/completions":
        assert all(set(e) == TIDE_FIELDS and e["error"] is None for e in events), events
        assert "".join(e["content"] for e in events).strip()
        assert events[-1]["finish_reason"] in ("stop", "length")
        check_usage(events[-1]["usage"], max_tokens)
    elif path == "/v1/chat/completions":
        assert all(e["object"] == "chat.completion.chunk" for e in events), events
        text = "".join(
            choice["delta"].get("content") or "" for e in events for choice in e["choices"]
        )
        assert text.strip()
    else:
        pytest.fail(f"no check for the example's route {path}")


def check_usage(usage: dict[str, int], max_tokens: int | None) -> None:
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] >= 1
    if max_tokens is not None:
        assert usage["completion_tokens"] <= max_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
