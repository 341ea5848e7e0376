"""A model of the fleet is ready when one of its engines is."""

from __future__ import annotations

from tide_vllm.domain.chat.entity import EngineState, EngineStatus
from tide_vllm.infrastructure.vllm.fleet import check_models, models_ready
from tide_vllm.infrastructure.vllm.supervisor import StaticMonitor

READY = EngineStatus(EngineState.READY, True, "healthy")
STARTING = EngineStatus(EngineState.STARTING, False, "vLLM is starting")
DOWN = EngineStatus(EngineState.EXTERNAL, False, "vLLM unreachable")

ENGINES = {
    "gpu0": StaticMonitor(STARTING, "qwen-7b"),
    "gpu1": StaticMonitor(READY, "qwen-7b"),
    "remote": StaticMonitor(DOWN, "qwen-72b"),
    "spare": StaticMonitor(STARTING, "smol"),
    "spare2": StaticMonitor(STARTING, "smol"),
}


def test_a_model_is_ready_when_one_of_its_engines_is():
    assert models_ready(ENGINES) == {"qwen-7b": True, "qwen-72b": False, "smol": False}


async def test_a_fresh_check_folds_the_same_way():
    assert await check_models(ENGINES) == models_ready(ENGINES)


def test_an_empty_fleet_has_no_model():
    assert models_ready({}) == {}
