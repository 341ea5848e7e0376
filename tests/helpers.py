"""Small helpers shared by the test layers."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from tide_vllm.domain.chat.entity import EngineState, EngineStatus

ROOT = Path(__file__).resolve().parent.parent
MAIN = ROOT / "cmd" / "tide-vllm" / "main.py"
FAKE_VLLM = ROOT / "tests" / "fakes" / "fake_vllm.py"
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """Every live process below pid, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if alive(child):
                found.append(child)
            todo.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


READY = EngineStatus(EngineState.READY, True, "healthy")


class SettableMonitor:
    """An engine's monitor whose status the test sets."""

    def __init__(self, status: EngineStatus = READY) -> None:
        self.status = status

    def current(self) -> EngineStatus:
        return self.status

    async def check(self) -> EngineStatus:
        return self.status
