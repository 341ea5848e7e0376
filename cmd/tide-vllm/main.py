"""tide-vllm entry point: `python cmd/tide-vllm/main.py -c conf/tide-vllm.yaml`.

Also installed as the `tide-vllm` console script.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    # Run as a script: this folder holds the `app` package; the repository root holds the rest.
    _here = os.path.dirname(os.path.abspath(__file__))
    _root = os.path.dirname(os.path.dirname(_here))
    sys.path[:0] = [_here, _root, os.path.join(_root, "pkg")]
    from app.server import run  # type: ignore[import-not-found,no-redef]
else:
    from .app.server import run

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
    return run(args.config)


if __name__ == "__main__":
    sys.exit(main())
