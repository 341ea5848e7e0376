"""vLLM's own scale-out settings (pipeline and data parallel, the executor backend): each key
becomes vLLM's flag of the same name when it is set, and a configuration that does not set them
launches vLLM as before."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import yaml

from tide_vllm.infrastructure.vllm.supervisor import build_command
from tide_vllm_cmd.app.options.options import Config, ConfigError, VLLMConfig, load_config

SCALE_OUT_FLAGS = (
    "--pipeline-parallel-size",
    "--data-parallel-size",
    "--distributed-executor-backend",
)


def load(tmp_path: Path, config: dict, environ: dict[str, str] | None = None) -> Config:
    path = tmp_path / "tide-vllm.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_config(path, environ=environ or {})


def flag_values(command: list[str]) -> dict[str, str]:
    """Each flag and the word after it (a toggle's is the next flag, never looked up)."""
    return {flag: value for flag, value in pairwise(command) if flag.startswith("--")}


def test_two_nodes_with_ray_become_vllms_flags():
    config = VLLMConfig(
        tensor_parallel_size=8, pipeline_parallel_size=2, distributed_executor_backend="ray"
    )
    flags = flag_values(build_command(config))
    assert flags["--tensor-parallel-size"] == "8"
    assert flags["--pipeline-parallel-size"] == "2"
    assert flags["--distributed-executor-backend"] == "ray"
    assert "--data-parallel-size" not in flags


def test_data_parallel_and_the_mp_backend_become_vllms_flags():
    flags = flag_values(
        build_command(VLLMConfig(data_parallel_size=4, distributed_executor_backend="mp"))
    )
    assert flags["--data-parallel-size"] == "4"
    assert flags["--distributed-executor-backend"] == "mp"
    assert "--pipeline-parallel-size" not in flags


def test_the_defaults_add_no_flag():
    command = build_command(VLLMConfig())
    assert not set(SCALE_OUT_FLAGS) & set(command)
    explicit = VLLMConfig(
        pipeline_parallel_size=1, data_parallel_size=1, distributed_executor_backend=None
    )
    assert build_command(explicit) == command


def test_the_scale_out_flags_come_before_the_users_extra_args():
    command = build_command(VLLMConfig(pipeline_parallel_size=2, extra_args=["--seed", "7"]))
    assert command[-2:] == ["--seed", "7"]
    assert command.index("--pipeline-parallel-size") > command.index("--tensor-parallel-size")


def test_an_entry_of_engines_inherits_them_from_vllm_and_may_set_its_own(tmp_path):
    config = load(
        tmp_path,
        {
            "vllm": {"distributed_executor_backend": "ray", "pipeline_parallel_size": 2},
            "engines": [
                {"name": "a", "port": 8001},
                {
                    "name": "b",
                    "port": 8002,
                    "pipeline_parallel_size": 1,
                    "distributed_executor_backend": None,
                },
            ],
        },
    )
    a, b = config.fleet()
    assert (a.pipeline_parallel_size, a.distributed_executor_backend) == (2, "ray")
    assert (b.pipeline_parallel_size, b.distributed_executor_backend) == (1, None)
    assert not set(SCALE_OUT_FLAGS) & set(build_command(b))


def test_the_environment_sets_them_too(tmp_path):
    config = load(
        tmp_path,
        {},
        {
            "TIDE_VLLM__VLLM__DISTRIBUTED_EXECUTOR_BACKEND": "ray",
            "TIDE_VLLM__VLLM__DATA_PARALLEL_SIZE": "2",
        },
    )
    assert (config.vllm.distributed_executor_backend, config.vllm.data_parallel_size) == (
        "ray",
        2,
    )


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"vllm": {"pipeline_parallel_size": 0}}, ["vllm.pipeline_parallel_size:", "(got 0)"]),
        ({"vllm": {"data_parallel_size": 0}}, ["vllm.data_parallel_size:", "(got 0)"]),
        ({"vllm": {"pipeline_parallel_size": "two"}}, ["vllm.pipeline_parallel_size:"]),
        (
            {"vllm": {"distributed_executor_backend": "uni"}},
            ["vllm.distributed_executor_backend:", "'mp' or 'ray'", "(got 'uni')"],
        ),
        (
            {"engines": [{"name": "a", "data_parallel_size": -1}]},
            ["engines[0].data_parallel_size:"],
        ),
    ],
)
def test_a_bad_value_is_named_by_its_key(tmp_path, config, words):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, config)
    for word in words:
        assert word in str(info.value), str(info.value)
