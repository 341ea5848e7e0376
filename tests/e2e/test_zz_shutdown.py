"""Runs last: SIGTERM stops the real service with exit 0 and leaves no vLLM process."""

import pytest

from tests.helpers import descendants

pytestmark = pytest.mark.e2e


def test_sigterm_exits_0_and_leaves_no_vllm_process(real_service):
    tree = descendants(real_service.proc.pid)
    assert len(tree) >= 3, f"expected the API server, EngineCore and Worker: {tree}"
    code, left = real_service.terminate(timeout=90)
    assert code == 0, real_service.log()[-3000:]
    assert left == [], f"vLLM processes left after SIGTERM: {left}"
