"""Process facts read from /proc (vLLM runs on Linux only): process-group members, the owner
of a listening TCP port, a process's command line."""

from __future__ import annotations

import os
from pathlib import Path


def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group.

    Zombies are skipped: an orphan re-parented to a PID 1 that does not reap stays a zombie
    forever, yet holds no memory and no port.
    """
    members = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(entry.name)
            if fields and len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in "ZX":
                members.append(int(entry.name))
    return members


def command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip() or "?"


def start_time(pid: int) -> int | None:
    """When the process started, in clock ticks since boot: with the pid, it names one process
    (pids are reused, start times with them are not)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def is_running(pid: int, started: int | None) -> bool:
    """True if the process `pid` that started at `started` is still alive (not a zombie)."""
    fields = _stat_fields(pid)
    if not fields or len(fields) <= 19 or fields[0] in "ZX":
        return False
    return started is None or int(fields[19]) == started


def process_group(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[2]) if fields and len(fields) > 2 else None


def listening_pids(port: int) -> list[int]:
    """Processes holding a TCP socket that listens on `port` (any address, IPv4 or IPv6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{inode}]")
    if not inodes:
        return []
    owners = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry.name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry.name}/fd/{fd}") in inodes:
                    owners.append(int(entry.name))
                    break
            except OSError:
                continue
    return owners
