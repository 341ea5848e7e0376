"""tide-vllm entry point: `python cmd/tide-vllm/main.py -c conf/tide-vllm.yaml`.

Also installed as the `tide-vllm` console script.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys

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
    from app.server import run  # type: ignore[import-not-found,no-redef]
else:
    from .app.server import run

EXIT_INTERRUPTED = 130

DESCRIPTION = """\
Serve chat from a vLLM model on one stable endpoint (GET /health, POST /chat/completions,
POST /v1/chat/completions). With vllm.auto_start: true it starts and supervises vLLM itself;
with false it connects to the vLLM server at vllm.host:vllm.port."""

EPILOG = """\
Any key can be overridden from the environment: TIDE_VLLM__<SECTION>__<KEY>=value,
e.g. TIDE_VLLM__VLLM__PORT=8001. Exit codes: 0 clean stop, 1 vLLM or server failure,
2 configuration error."""


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
        default="conf/tide-vllm.yaml",
        metavar="FILE",
        help="YAML configuration file (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        return run(args.config)
    except KeyboardInterrupt:
        # Ctrl-C before the service handles signals, or after: nothing to stop, no traceback.
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
