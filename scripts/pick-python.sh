#!/usr/bin/env bash
# Prints the Python to build the venv with: of the Python 3.11 interpreters on this machine that
# can make a venv, the one that runs a small pure-Python workload in the least CPU time (its best
# of 45 runs, in 9 rounds that take the candidates in turn; the times go to stderr); `python3`
# when there is no 3.11.
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
    start = time.process_time()
    work()
    return time.process_time() - start
print(f"{min(timed() for _ in range(5)) * 1e3:.2f}")
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

# Rounds, each timing every candidate in turn, and each candidate's best over all rounds: load
# elsewhere on the machine (which slowed either by up to 1.7x here) then slows a round, not a
# candidate.
declare -A ms=()
for round in 1 2 3 4 5 6 7 8 9; do
  for p in "${candidates[@]}"; do
    [ "${ms[$p]:-}" = failed ] && continue
    t=$("$p" -c "$probe" 2>/dev/null) || { ms[$p]=failed; continue; }
    if [ -z "${ms[$p]:-}" ] || awk -v a="$t" -v b="${ms[$p]}" 'BEGIN { exit !(a < b) }'; then
      ms[$p]=$t
    fi
  done
done

best="" best_ms=""
for p in "${candidates[@]}"; do
  [ "${ms[$p]:-failed}" = failed ] && continue
  echo "pick-python: $p ${ms[$p]} ms" >&2
  if [ -z "$best" ] || awk -v a="${ms[$p]}" -v b="$best_ms" 'BEGIN { exit !(a < b) }'; then
    best=$p best_ms=${ms[$p]}
  fi
done
[ -n "$best" ] || { fallback; exit; }
echo "pick-python: using $best" >&2
echo "$best"
