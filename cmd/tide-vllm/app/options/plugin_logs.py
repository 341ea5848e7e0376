"""Logging: one format for tide-vllm, uvicorn and vLLM's relayed output; human-readable by
default, one JSON object per line with `log.format: json`. Every line about a request carries
its request id."""

from __future__ import annotations

import logging
import sys
import time
from datetime import datetime, timezone
from typing import Any

import orjson

from web.gateway import REQUEST_ID

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s"
# Fields a record may carry through `extra=` (the access line) that JSON lines keep as keys.
_EXTRA_FIELDS = (
    "method",
    "path",
    "status",
    "duration_ms",
    "shape",
    "model",
    "prompt_tokens",
    "completion_tokens",
)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class TextFormatter(logging.Formatter):
    """The default format, with the date and time formatted once a second, not once a line
    (the access log writes a line per request)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime(self.default_time_format, self.converter(record.created))
        return f"{self._stamp},{int(record.msecs):03d}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        for name in _EXTRA_FIELDS:
            if hasattr(record, name):
                line[name] = getattr(record, name)
        if record.exc_info:  # to the log only, never to a client
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def configure_logging(level: str, fmt: str = "text") -> None:
    # No line shows the thread or the process: not looking them up halves a record's cost.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO: the health polls would flood the log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


class LogsPlugin:
    name = "logs"

    async def start(self, ctx: Any) -> None:
        configure_logging(ctx.config.log.level, ctx.config.log.format)

    async def stop(self, ctx: Any) -> None:
        return None
