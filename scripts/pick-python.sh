#!/usr/bin/env bash
# Prints the Python to build the venv with: of the Python 3.11 interpreters on this machine that
# can make a venv, the one that runs a small pure-Python workload fastest (its timings go to
# stderr); `python3` when there is no 3.11.
#
# Why not simply the first on PATH: interpreters differ a lot in speed. Here, pyenv's 3.11 (built
# without --enable-optimizations or LTO, as a shared libpython) ran this workload 1.7x slower than
# Debian's python3.11 (PGO+LTO, static), and tide-vllm needed ~15 % more CPU per request on it.
# `make PYTHON=/path/to/python ...` still chooses by hand.
set -euo pipefail

probe='
import time
def work():
    total = 0
    for i in range(20000):
        d = {"i": i, "s": str(i)}
        total += len(d["s"]) + d["i"] % 7
    return total
def timed():
    start = time.perf_counter()
    work()
    return time.perf_counter() - start
print(f"{min(timed() for _ in range(15)) * 1e3:.2f}")
'

candidates=()
seen=" "
for p in $(type -aP python3.11 2>/dev/null || true) /usr/bin/python3.11 /usr/local/bin/python3.11; do
  [ -x "$p" ] || continue
  # A pyenv shim is a script; the interpreter it runs is what counts (and is what venv links).
  real=$("$p" -c 'import sys; print(sys.executable)' 2>/dev/null) || continue
  real=$(readlink -f "$real")
  case "$seen" in *" $real "*) continue ;; esac
  seen="$seen$real "
  "$real" -c 'import venv, ensurepip' 2>/dev/null || continue
  candidates+=("$real")
done

fallback() {
  command -v python3 || { echo "pick-python: no python3 on PATH" >&2; exit 1; }
}
[ ${#candidates[@]} -gt 0 ] || { fallback; exit; }

best="" best_ms=""
for p in "${candidates[@]}"; do
  ms=$("$p" -c "$probe" 2>/dev/null) || continue
  echo "pick-python: $p ${ms} ms" >&2
  if [ -z "$best" ] || awk -v a="$ms" -v b="$best_ms" 'BEGIN { exit !(a < b) }'; then
    best=$p best_ms=$ms
  fi
done
[ -n "$best" ] || { fallback; exit; }
echo "pick-python: using $best" >&2
echo "$best"
