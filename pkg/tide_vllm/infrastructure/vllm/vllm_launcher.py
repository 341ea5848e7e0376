"""vLLM's launcher: runs the vLLM command as its child and ends vLLM's whole process group when
tide-vllm dies, however it dies.

Why a launcher: tide-vllm cannot act on its own SIGKILL, and vLLM's API server forks EngineCore,
which forks Worker; killed or orphaned, those keep running (re-parented to PID 1) with gigabytes
of memory. PR_SET_PDEATHSIG reaches only a direct child, not those grandchildren, and a watchdog
that polls would need a process of its own anyway. So tide-vllm starts this small launcher as
the leader of a new process group, with the read end of a pipe whose write end only tide-vllm
holds. When tide-vllm exits — cleanly, by exception or by SIGKILL — the kernel closes that end,
the launcher reads EOF and sends SIGTERM, then SIGKILL, to its whole group (itself included).

Usage (by tide-vllm only): vllm_launcher.py LIFELINE_FD GRACE_SECONDS -- COMMAND...
Standard library only: it must start fast and import nothing of vLLM's or ours.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time


def group_alive() -> bool:
    """True while a process of this launcher's group other than itself is alive (read from
    /proc; zombies hold nothing and are skipped)."""
    me, pgid = os.getpid(), os.getpgid(0)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in "ZX":
            return True
    return False


def end_group(child: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM to the group, then SIGKILL once every other member is gone or `grace` has
    passed, whichever comes first. vLLM's API server may exit on SIGTERM while a stuck
    EngineCore or Worker ignores it: the group is not done until they are gone too."""
    os.killpg(0, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and (child.poll() is None or group_alive()):
        time.sleep(0.05)
    os.killpg(0, signal.SIGKILL)  # ends this launcher too


def watch_lifeline(
    fd: int, child: subprocess.Popen[bytes], grace: float, ending: threading.Event
) -> None:
    try:
        while os.read(fd, 64):
            pass
    except OSError:
        pass
    # No message: stdout and stderr are a pipe to tide-vllm, which is gone (EPIPE).
    ending.set()
    try:
        end_group(child, grace)
    finally:
        os.killpg(0, signal.SIGKILL)


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    fd, grace, command = int(argv[0]), float(argv[1]), argv[3:]
    try:
        child = subprocess.Popen(command)
    except OSError as exc:
        print(f"tide-vllm launcher: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127
    # Installed after the fork so vLLM keeps the default dispositions. The group's SIGTERM is
    # meant for vLLM; the launcher leaves when its child does.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ending = threading.Event()
    watcher = threading.Thread(target=watch_lifeline, args=(fd, child, grace, ending), daemon=True)
    watcher.start()
    code = child.wait()
    if ending.is_set():
        # tide-vllm is gone and the group's end is under way: the child leaving on SIGTERM
        # must not end the launcher before it has killed whatever ignored the SIGTERM.
        watcher.join()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
