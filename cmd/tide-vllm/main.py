"""tide-vllm entry point: `python cmd/tide-vllm/main.py -c conf/tide-vllm.yaml`.

Also installed as the `tide-vllm` console script.
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import re
import signal
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType

if multiprocessing.current_process().name != "MainProcess":
    # A web worker, spawned by multiprocessing, imports this module again before it runs.
    # Ctrl-C in a terminal reaches the whole process group: the main process alone handles it
    # and stops the workers with SIGTERM, so a worker still starting must not die of it with a
    # KeyboardInterrupt traceback. (uvicorn, once a worker serves, installs its own handler.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

if __package__ in (None, ""):
    # Run as a script: this folder holds the `app` package; the repository root holds the rest.
    _here = os.path.dirname(os.path.abspath(__file__))
    _root = os.path.dirname(os.path.dirname(_here))
    sys.path[:0] = [_here, _root, os.path.join(_root, "pkg")]

DEFAULT_CONFIG = "conf/tide-vllm.yaml"
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
EXIT_CONFIG, EXIT_INTERRUPTED = 2, 130

DESCRIPTION = """\
Serve chat from a vLLM model on one stable endpoint (GET /health, POST /chat/completions,
POST /v1/chat/completions). With vllm.auto_start: true it starts and supervises vLLM itself;
with false it connects to the vLLM server at vllm.host:vllm.port."""

EPILOG = """\
Any key can be overridden from the environment: TIDE_VLLM__<SECTION>__<KEY>=value,
e.g. TIDE_VLLM__VLLM__PORT=8001. Exit codes: 0 clean stop, 1 vLLM or server failure,
2 configuration error."""


def _app(module: str) -> ModuleType:
    """A module of the `app` package, imported only when needed: --version and --print-config
    answer without loading the web server."""
    if __package__ in (None, ""):
        return importlib.import_module(f"app.{module}")
    return importlib.import_module(f".app.{module}", __package__)


def version() -> str:
    """The installed package's version; from pyproject.toml when run from a source tree that
    is not installed."""
    try:
        return metadata.version("tide-vllm")
    except metadata.PackageNotFoundError:
        pass
    try:
        found = re.search(r'(?m)^version\s*=\s*"([^"]+)"', PYPROJECT.read_text(encoding="utf-8"))
    except OSError:
        found = None
    return found.group(1) if found else "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tide-vllm",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help=f"YAML configuration file (default: {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print every key with its default and a comment, as YAML, and exit",
    )
    parser.add_argument("--version", action="version", version=f"tide-vllm {version()}")
    args = parser.parse_args(argv)
    try:
        if args.print_config:
            sys.stdout.write(_app("options.options").annotated_defaults())
            return 0
        config = args.config or DEFAULT_CONFIG
        if args.config is None and not os.path.exists(DEFAULT_CONFIG):
            print(
                f"tide-vllm: config error: no configuration file: {DEFAULT_CONFIG} does not exist "
                f"in {os.getcwd()}; write one with `tide-vllm --print-config > tide-vllm.yaml` "
                "and start with `tide-vllm -c tide-vllm.yaml`, or give yours with -c FILE",
                file=sys.stderr,
            )
            return EXIT_CONFIG
        return int(_app("server").run(config))
    except KeyboardInterrupt:
        # Ctrl-C before the service handles signals, or after: nothing to stop, no traceback.
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
