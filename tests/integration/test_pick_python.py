"""scripts/pick-python.sh, which `make` runs to choose the venv's interpreter: it must print one
that works (whatever else is on PATH), and say what it measured."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "pick-python.sh"


def pick(path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": path},
    )


def assert_usable(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    python = result.stdout.strip()
    assert os.access(python, os.X_OK), result.stdout
    check = subprocess.run(
        [python, "-c", "import sys, venv, ensurepip; print(sys.version_info[:2] >= (3, 10))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.stdout.strip() == "True", check.stderr
    return python


def test_prints_a_python_that_can_make_the_venv() -> None:
    result = pick(os.environ["PATH"])
    python = assert_usable(result)
    # Every candidate it timed is named with its time, then the choice.
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == f"pick-python: using {python}"
    assert any(line.startswith(f"pick-python: {python} ") for line in lines[:-1])


def test_an_interpreter_that_fails_is_passed_over(tmp_path: Path) -> None:
    # Looks like a Python 3.11 that can make a venv, then fails when it has to run code.
    broken = tmp_path / "python3.11"
    broken.write_text(
        '#!/bin/sh\ncase "$2" in\n  *sys.executable*) echo "$0" ;;\n  *ensurepip*) exit 0 ;;\n'
        "  *) echo 'broken interpreter' >&2; exit 1 ;;\nesac\n"
    )
    broken.chmod(0o755)
    result = pick(f"{tmp_path}:{os.environ['PATH']}")
    python = assert_usable(result)
    assert python != str(broken)
