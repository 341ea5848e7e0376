"""One real tide-vllm process in auto-start mode on the real CPU vLLM and the demo model,
shared by every end-to-end test (vLLM takes over a minute to start here). The last test
(test_zz_shutdown.py) stops it with SIGTERM and checks nothing is left."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers import ROOT, free_port
from tests.service import ServiceProcess

STARTUP_WAIT = 600
API_KEY = "e2e-user-key"
VLLM_KEY = "e2e-vllm-key"  # the key tide-vllm gives the vLLM it starts (random by default)


@pytest.fixture(scope="session")
def real_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    config = yaml.safe_load((ROOT / "conf" / "tide-vllm.cpu.yaml").read_text())
    config["web"]["bind_address"] = {"host": "127.0.0.1", "port": free_port()}
    config["vllm"]["port"] = free_port()
    config["auth"] = {"api_keys": [API_KEY]}
    config["vllm"]["api_key"] = VLLM_KEY  # known, so tests can also ask vLLM directly
    if os.environ.get("TIDE_VLLM_MODEL_DIR"):
        config["vllm"]["model_path"] = os.environ["TIDE_VLLM_MODEL_DIR"]
    model = Path(os.path.expanduser(config["vllm"]["model_path"]))
    assert (model / "config.json").exists(), f"demo model missing at {model}: run `make model`"
    service = ServiceProcess(config, tmp_path_factory.mktemp("e2e"))
    try:
        service.wait_listening()
        service.wait_healthy(timeout=STARTUP_WAIT)
        service.http = httpx.Client(
            base_url=service.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
        )
        yield service
    finally:
        service.kill_all()
