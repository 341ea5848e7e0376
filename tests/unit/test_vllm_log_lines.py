"""vLLM's output taken apart: its level, source, process and message; the level of lines that
have none; the start-up summary read from its lines. The lines are real vLLM 0.32 output
(CPU build, the demo model) unless said otherwise."""

from __future__ import annotations

import io
import json
import logging

import pytest

from tide_vllm.infrastructure.vllm.vllm_log import (
    OutputLevels,
    StartupProgress,
    VLLMLine,
    output_line,
    parse_vllm_line,
)
from tide_vllm_cmd.app.options.plugin_logs import JsonFormatter, RequestIdFilter, TextFormatter

INFO, WARNING, ERROR = logging.INFO, logging.WARNING, logging.ERROR


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "(APIServer pid=5972) INFO 11-29 16:08:08 [model.py:733] Resolved architecture: "
            "LlamaForCausalLM",
            VLLMLine(
                "Resolved architecture: LlamaForCausalLM", INFO, "model.py:733", "APIServer", 5972
            ),
        ),
        (
            "(Worker pid=6307) WARNING 11-29 16:08:30 [cpu_worker.py:114] libtcmalloc is not "
            "found in LD_PRELOAD.",
            VLLMLine(
                "libtcmalloc is not found in LD_PRELOAD.",
                WARNING,
                "cpu_worker.py:114",
                "Worker",
                6307,
            ),
        ),
        (  # the form of older vLLM releases: the prefix only on lines of its child processes
            "(EngineCore_DP0 pid=123) ERROR 11-29 16:05:01 [core.py:700] EngineCore failed",
            VLLMLine("EngineCore failed", ERROR, "core.py:700", "EngineCore_DP0", 123),
        ),
        (
            "INFO 11-29 16:05:01 [loader.py:123] message",
            VLLMLine("message", INFO, "loader.py:123"),
        ),
        (
            "DEBUG 11-29 16:05:01.123 [utils.py:9] with milliseconds",
            VLLMLine("with milliseconds", logging.DEBUG, "utils.py:9"),
        ),
        (  # vLLM's banner has lines with nothing after the source
            "(APIServer pid=5972) INFO 11-29 16:08:08 [api_utils.py:347]",
            VLLMLine("", INFO, "api_utils.py:347", "APIServer", 5972),
        ),
        (  # a message that spans lines repeats vLLM's prefix, then a tab
            "(EngineCore pid=6005) INFO 11-29 16:08:20 [ompmultiprocessing.py:185] \t"
            "reserved_cpus=[1]",
            VLLMLine("\treserved_cpus=[1]", INFO, "ompmultiprocessing.py:185", "EngineCore", 6005),
        ),
        (
            "INFO:     Started server process [5972]",
            VLLMLine("Started server process [5972]", INFO, "uvicorn"),
        ),
        (
            'INFO:     127.0.0.1:35352 - "POST /v1/chat/completions HTTP/1.1" 200 OK',
            VLLMLine(
                '127.0.0.1:35352 - "POST /v1/chat/completions HTTP/1.1" 200 OK', INFO, "uvicorn"
            ),
        ),
        (
            "[W1129 16:08:30.649042915 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy",
            VLLMLine("Warning: NUMA binding: Using MEMBIND policy", WARNING, "utils.cpp:68"),
        ),
        (
            "Loading safetensors checkpoint shards: 100% Completed | 1/1 [00:02<00:00,  2.37s/it]",
            VLLMLine(
                "Loading safetensors checkpoint shards: 100% Completed | 1/1 [00:02<00:00,  "
                "2.37s/it]"
            ),
        ),
        (
            "(EngineCore pid=1) Traceback (most recent call last):",
            VLLMLine("Traceback (most recent call last):", None, None, "EngineCore", 1),
        ),
        ("INFO fake words, not vLLM's format", VLLMLine("INFO fake words, not vLLM's format")),
    ],
)
def test_a_line_is_taken_apart(text, expected):
    assert parse_vllm_line(text) == expected


def test_the_log_shows_the_process_and_source_but_not_vllms_level_and_time_twice():
    line = parse_vllm_line(
        "(Worker pid=6307) WARNING 11-29 16:08:30 [cpu_worker.py:114] libiomp is not found"
    )
    assert line.text == "(Worker pid=6307) [cpu_worker.py:114] libiomp is not found"
    assert parse_vllm_line("a print").text == "a print"


def test_colours_and_a_redrawn_progress_bar_are_cleaned():
    coloured = b"\x1b[32m(APIServer pid=7)\x1b[0m \x1b[32mINFO\x1b[0m 11-29 16:08:08 [a.py:1] hi\n"
    assert parse_vllm_line(output_line(coloured)) == VLLMLine("hi", INFO, "a.py:1", "APIServer", 7)
    bar = b"Loading: 0% | 0/2\rLoading: 50% | 1/2\rLoading: 100% | 2/2\r\n"
    assert output_line(bar) == "Loading: 100% | 2/2"
    assert output_line(b"  indented \xff\n") == "  indented \ufffd"


def levels_of(*texts: str) -> list[int]:
    levels = OutputLevels()
    return [levels.level(parse_vllm_line(text)) for text in texts]


def test_a_line_without_a_level_is_info():
    assert levels_of(
        "Loading safetensors checkpoint shards:   0% Completed | 0/1 [00:00<?, ?it/s]",
        "nanobind: leaked 4 instances!",
        " - leaked instance 0x7fbe98f30b48",
    ) == [INFO, INFO, INFO]


def test_a_traceback_is_an_error_to_its_exception_line():
    assert levels_of(
        "Traceback (most recent call last):",
        '  File "/x/vllm/entrypoints/cli/main.py", line 99, in main',
        '    version=importlib.metadata.version("vllm"),',
        "            ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^",
        "importlib.metadata.PackageNotFoundError: No package metadata was found for vllm",
        "an ordinary print afterwards",
    ) == [ERROR, ERROR, ERROR, ERROR, ERROR, INFO]


def test_a_chained_traceback_stays_an_error():
    assert (
        levels_of(
            "Traceback (most recent call last):",
            '  File "a.py", line 1, in f',
            "KeyError: 'x'",
            "During handling of the above exception, another exception occurred:",
            "Traceback (most recent call last):",
            '  File "a.py", line 3, in f',
            "ValueError: y",
        )
        == [ERROR] * 7
    )


def test_a_python_warning_and_its_source_line_are_warnings():
    assert levels_of(
        "/x/vllm/entrypoints/openai/api_server.py:24: DeprecationWarning: "
        "`vllm.entrypoints.openai.api_server` is deprecated",
        "  warnings.warn(",
        "/usr/lib/python3.11/multiprocessing/resource_tracker.py:224: UserWarning: "
        "resource_tracker: There appear to be 1 leaked semaphore objects",
        "  warnings.warn('resource_tracker: There appear to be %d '",
        "next",
    ) == [WARNING, WARNING, WARNING, WARNING, INFO]


def test_vllms_own_level_wins_and_processes_are_followed_apart():
    assert levels_of(
        "(EngineCore pid=2) Traceback (most recent call last):",
        "(APIServer pid=1) INFO 11-29 16:09:04 [launcher.py:254] [shutdown] API server",
        '(EngineCore pid=2)   File "core.py", line 9, in run',
        "(APIServer pid=1)   an indented print of another process",
        "(EngineCore pid=2) RuntimeError: engine died",
        "(APIServer pid=1) ERROR 11-29 16:09:04 [async_llm.py:906] Traceback (most recent call",
        "(APIServer pid=1)   not a traceback of its own: vLLM's ERROR line ended it",
    ) == [ERROR, INFO, ERROR, INFO, ERROR, ERROR, INFO]


# The start-up of vLLM 0.32 on the CPU (demo model, --enforce-eager), shortened: the lines the
# summary reads, in the order they came, and what tide-vllm says vLLM is doing after each.
REAL_START = [
    ("INFO 11-29 16:08:07 [__init__.py:1] a line it does not know", None),
    (
        "(APIServer pid=5972) INFO 11-29 16:08:08 [api_utils.py:286] non-default args: {}",
        "reading the model's configuration",
    ),
    (
        "(APIServer pid=5972) WARNING 11-29 16:08:08 [vllm.py:1703] Enforce eager set, "
        "disabling torch.compile, CUDAGraphs, and JIT kernel warmup.",
        "reading the model's configuration",
    ),
    (
        "(EngineCore pid=6005) INFO 11-29 16:08:20 [core.py:133] Initializing a V1 LLM engine "
        "(v0.32.0) with config: model='/m', speculative_config=None",
        "starting the engine",
    ),
    (
        "(Worker pid=6307) INFO 11-29 16:08:30 [cpu_model_runner.py:68] Starting to load model "
        "/root/.cache/tide-vllm/models/SmolLM2-135M-Instruct...",
        "loading the model",
    ),
    (
        "Loading safetensors checkpoint shards:   0% Completed | 0/1 [00:00<?, ?it/s]",
        "loading the weights (0 of 1 shards done)",
    ),
    (
        "Loading safetensors checkpoint shards: 100% Completed | 1/1 [00:02<00:00,  2.37s/it]",
        "loading the weights (1 of 1 shards done)",
    ),
    (
        "(Worker pid=6307) INFO 11-29 16:08:32 [default_loader.py:501] Loading weights took "
        "2.37 seconds",
        "weights loaded; preparing the engine",
    ),
    (
        "(Worker pid=6307) INFO 11-29 16:08:35 [cpu_worker.py:260] Explicitly set (2.0/9.46) "
        "GiB for KV cache on node 0.",
        "allocating the KV cache",
    ),
    (
        "(EngineCore pid=6005) INFO 11-29 16:08:43 [core.py:402] init engine (profile, create "
        "kv cache, warmup model) took 8.51 s",
        "starting its API server",
    ),
    (  # the engine repeats an early line later on: the summary does not go back
        "(EngineCore pid=6005) INFO 11-29 16:08:44 [model.py:733] Resolved architecture: "
        "LlamaForCausalLM",
        "starting its API server",
    ),
    (
        "(APIServer pid=5972) INFO 11-29 16:08:45 [entry.py:140] Starting vLLM server on "
        "http://127.0.0.1:8412",
        "starting its API server",
    ),
    (
        "INFO:     Application startup complete.",
        "its API server is up; waiting for the model list",
    ),
]


def test_the_summary_follows_a_real_start():
    progress = StartupProgress()
    assert progress.doing == "starting Python and importing vLLM"
    for text, doing in REAL_START:
        before = progress.doing
        progress.feed(parse_vllm_line(text))
        assert progress.doing == (doing or before), text


@pytest.mark.parametrize(
    ("text", "doing"),
    [  # what vLLM prints on a GPU (from its source: gpu_model_runner.py, backends.py, …)
        ("Fetching 4 files: 100%|██████████| 4/4", "downloading the model"),
        (
            "(EngineCore_DP0 pid=9) INFO 11-29 10:00:00 [backends.py:1167] Dynamo bytecode "
            "transform time: 4.52 s",
            "compiling the model (torch.compile)",
        ),
        (
            "(EngineCore_DP0 pid=9) INFO 11-29 10:00:00 [backends.py:399] Compiling a graph for "
            "compile range (1, 8192) takes 20.11 s",
            "compiling the model (torch.compile)",
        ),
        (
            "(EngineCore_DP0 pid=9) INFO 11-29 10:00:00 [gpu_worker.py:760] Available KV cache "
            "memory: 58.2 GiB",
            "allocating the KV cache",
        ),
        (
            "Capturing CUDA graphs (mixed prefill-decode, PIECEWISE):  45%|████▌     | 30/67 "
            "[00:05<00:06,  5.87it/s]",
            "capturing CUDA graphs (30 of 67)",
        ),
        (
            "(EngineCore_DP0 pid=9) INFO 11-29 10:00:00 [gpu_worker.py:939] Compile and warming "
            "up model for size 512",
            "warming up the model",
        ),
    ],
)
def test_the_summary_names_the_gpu_stages(text, doing):
    progress = StartupProgress()
    progress.feed(parse_vllm_line("INFO 11-29 10:00:00 [a.py:1] Starting to load model m..."))
    progress.feed(parse_vllm_line(text))
    assert progress.doing == doing


def test_any_line_of_the_engine_process_means_the_engine_is_starting():
    progress = StartupProgress()
    progress.feed(parse_vllm_line("(EngineCore_DP0 pid=9) INFO 11-29 10:00:00 [a.py:1] hello"))
    assert progress.doing == "starting the engine"


def formatted(formatter: logging.Formatter, text: str) -> str:
    line = parse_vllm_line(text)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(formatter)
    record = logging.getLogger("vllm").makeRecord(
        "vllm", OutputLevels().level(line), "", 0, "%s", (line.text,), None, extra=line.fields()
    )
    handler.handle(record)
    return out.getvalue()


def test_json_lines_keep_vllms_level_source_process_and_message_apart():
    text = "(Worker pid=6307) WARNING 11-29 16:08:30 [cpu_worker.py:114] libiomp is not found"
    line = json.loads(formatted(JsonFormatter(), text))
    assert line["level"] == "WARNING" and line["logger"] == "vllm"
    assert line["message"] == "libiomp is not found"
    assert (line["source"], line["process"], line["pid"]) == ("cpu_worker.py:114", "Worker", 6307)
    bare = json.loads(formatted(JsonFormatter(), "Traceback (most recent call last):"))
    assert bare["level"] == "ERROR" and bare["message"] == "Traceback (most recent call last):"
    assert not {"source", "process", "pid"} & bare.keys()


def test_text_lines_carry_vllms_level_once():
    text = "(Worker pid=6307) WARNING 11-29 16:08:30 [cpu_worker.py:114] libiomp is not found"
    shown = formatted(TextFormatter(), text)
    assert shown.endswith(
        "WARNING vllm [-] (Worker pid=6307) [cpu_worker.py:114] libiomp is not found\n"
    )
    assert shown.count("WARNING") == 1
