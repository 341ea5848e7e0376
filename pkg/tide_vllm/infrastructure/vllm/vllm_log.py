"""vLLM's output, taken apart: each line's level, source, process and message, the level of
lines that have none (tracebacks, warnings, progress bars), and what vLLM is doing while it
starts. The supervisor reads vLLM's output through these; nothing here touches a process."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

# What vLLM prints, seen with vLLM 0.32 (its logger's format, then uvicorn's, PyTorch's C++
# log, Python's warnings, a progress bar):
#   (EngineCore pid=6005) INFO 11-29 16:08:20 [core.py:133] Initializing a V1 LLM engine ...
#   INFO 11-29 16:05:01 [loader.py:123] message        (older vLLM; EngineCore_DP0 in the prefix)
#   INFO:     127.0.0.1:35352 - "POST /v1/chat/completions HTTP/1.1" 200 OK
#   [W1129 16:08:30.649042915 utils.cpp:68] Warning: NUMA binding: ...
#   /path/api_server.py:24: DeprecationWarning: ...
#   Loading safetensors checkpoint shards:  50% Completed | 1/2 [00:02<00:02,  2.37s/it]
_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
    "I": logging.INFO,
    "W": logging.WARNING,
    "E": logging.ERROR,
    "F": logging.CRITICAL,
}
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # colours, with VLLM_LOGGING_COLOR=1
_PROCESS = re.compile(r"\((?P<process>[^()\s]+) pid=(?P<pid>\d+)\) ?")
_LINE_FORMATS = (  # (pattern, source when the line does not name one)
    (  # vLLM's logger
        re.compile(
            r"(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d(?:[.,]\d+)? "
            r"\[(?P<source>[^\]]*)\] ?(?P<message>.*)"
        ),
        None,
    ),
    (re.compile(r"(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL):\s+(?P<message>.*)"), "uvicorn"),
    (  # PyTorch's C++ log (c10)
        re.compile(
            r"\[(?P<level>[IWEF])\d{4} [\d:.]+(?: \d+)? (?P<source>[^\]\s]+)\] ?(?P<message>.*)"
        ),
        None,
    ),
)
_PYTHON_WARNING = re.compile(r"\S+:\d+: [A-Z]\w*Warning: ")
_TRACEBACK_STARTS = (
    "Traceback (most recent call last):",
    "During handling of the above exception",
    "The above exception was the direct cause",
)


@dataclass(frozen=True)
class VLLMLine:
    """One line of vLLM's output, taken apart."""

    message: str
    level: int | None = None  # None: the line has no level (a traceback, a print, a bar)
    source: str | None = None  # "loader.py:123", "uvicorn", "utils.cpp:68"
    process: str | None = None  # "EngineCore", "EngineCore_DP0", "Worker", "APIServer"
    pid: int | None = None

    @property
    def text(self) -> str:
        """As tide-vllm's log shows it: vLLM's level and time are the log line's own."""
        who = f"({self.process} pid={self.pid}) " if self.process else ""
        where = f"[{self.source}] " if self.source else ""
        return f"{who}{where}{self.message}".rstrip()

    def fields(self) -> dict[str, Any]:
        """For `extra=`: the parts JSON log lines keep as separate keys."""
        return {
            "vllm_message": self.message,
            "vllm_source": self.source,
            "vllm_process": self.process,
            "vllm_pid": self.pid,
        }


def output_line(raw: bytes) -> str:
    """A line as vLLM's terminal would end up showing it: without colours, and of a progress
    bar redrawn with carriage returns only the last state."""
    text = _ANSI.sub("", raw.decode(errors="replace")).rstrip()
    return text.rsplit("\r", 1)[-1]


def parse_vllm_line(text: str) -> VLLMLine:
    process = pid = None
    prefix = _PROCESS.match(text)
    if prefix:
        process, pid = prefix["process"], int(prefix["pid"])
        text = text[prefix.end() :]
    for line_format, default_source in _LINE_FORMATS:
        match = line_format.fullmatch(text)
        if match:
            source = match.groupdict().get("source") or default_source
            level = _LEVELS[match["level"]]
            return VLLMLine(match["message"], level, source, process, pid)
    return VLLMLine(text, None, None, process, pid)


class OutputLevels:
    """The level each line of vLLM's output is logged at: vLLM's own when the line has one.
    A line without one is INFO, except that a Python traceback's lines are ERROR (they report
    an error though each line has no level of its own) and a Python warning's are WARNING.
    Followed per process: the output of vLLM's processes interleaves."""

    def __init__(self) -> None:
        self._block: dict[tuple[str | None, int | None], int] = {}

    def level(self, line: VLLMLine) -> int:
        key = (line.process, line.pid)
        if line.level is not None:
            self._block.pop(key, None)
            return line.level
        text = line.message
        if text.startswith(_TRACEBACK_STARTS):
            self._block[key] = logging.ERROR
            return logging.ERROR
        if _PYTHON_WARNING.match(text):
            self._block[key] = logging.WARNING
            return logging.WARNING
        block = self._block.get(key)
        if block is None:
            return logging.INFO
        if text[:1].isspace():  # a frame, a line of code, the warning's source line
            return block
        del self._block[key]  # the exception's own line ends a traceback
        return block if block == logging.ERROR else logging.INFO


# What vLLM is doing while it starts, from the lines it prints: (stage, pattern, summary),
# the first match wins. The summary stays until a line of the same or a later stage matches
# (vLLM's processes repeat early lines later on); "{0}"/"{1}" take the pattern's groups.
_STARTUP_STEPS = tuple(
    (stage, re.compile(pattern), summary)
    for stage, pattern, summary in (
        (6, r"Application startup complete", "its API server is up; waiting for the model list"),
        (
            5,
            r"init engine \(profile|Starting vLLM (?:API )?server|Available routes"
            r"|Supported tasks|Started server process|Waiting for application startup",
            "starting its API server",
        ),
        (4, r"Capturing CUDA graphs.*?\| *(\d+)/(\d+)", "capturing CUDA graphs ({0} of {1})"),
        (4, r"Capturing CUDA graphs|Graph capturing", "capturing CUDA graphs"),
        (4, r"KV cache", "allocating the KV cache"),
        (4, r"[Ww]arming up", "warming up the model"),
        (
            4,
            r"Dynamo bytecode transform|Compiling a graph|[Cc]ompiling model"
            r"|torch\.compile take|Directly load .*compiled",
            "compiling the model (torch.compile)",
        ),
        (4, r"[Mm]emory profiling", "profiling memory"),
        (4, r"Loading weights took|Model loading took", "weights loaded; preparing the engine"),
        (
            3,
            r"Loading \w+ checkpoint shards: *\d+% Completed \| (\d+)/(\d+)",
            "loading the weights ({0} of {1} shards done)",
        ),
        (3, r"[Dd]ownloading|Fetching \d+ files", "downloading the model"),
        (3, r"Starting to load model|Loading model", "loading the model"),
        (2, r"Initializing a V1 LLM engine|Initializing an LLM engine", "starting the engine"),
        (
            1,
            r"non-default args|Resolved architecture|Using max model len",
            "reading the model's configuration",
        ),
    )
)


class StartupProgress:
    """What vLLM is doing while it starts, in a few words, read from its own lines."""

    def __init__(self) -> None:
        self.stage = 0
        self.doing = "starting Python and importing vLLM"

    def feed(self, line: VLLMLine) -> None:
        for stage, pattern, summary in _STARTUP_STEPS:
            match = pattern.search(line.message)
            if match:
                if stage >= self.stage:
                    self.stage, self.doing = stage, summary.format(*match.groups())
                return
        if self.stage < 2 and (line.process or "").startswith("EngineCore"):
            self.stage, self.doing = 2, "starting the engine"
