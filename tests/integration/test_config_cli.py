"""The real entry point, run as a process: configuration errors exit 2 with one clear line."""

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import MAIN, PYTHON
from tide_vllm_cmd.app.options.options import Config, load_config


def run_main(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, str(MAIN), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "tide-vllm.yaml"
    path.write_text(text)
    return str(path)


def assert_config_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


def test_help_explains_the_options():
    result = run_main("--help")
    assert result.returncode == 0
    assert "-c FILE, --config FILE" in result.stdout
    assert "TIDE_VLLM__" in result.stdout


def test_the_console_script_is_installed_and_answers_help():
    script = Path(PYTHON).parent / "tide-vllm"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "usage: tide-vllm" in result.stdout


def test_a_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert_config_error(run_main("-c", str(missing)), str(missing), "No such file")


def test_a_yaml_syntax_error_gives_its_line(tmp_path):
    path = write(tmp_path, "vllm:\n  port: 8000\n  host: [unclosed\n")
    assert_config_error(run_main("-c", path), "YAML syntax error", "line 4")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("vllm:\n  max_tokenz: 5\n", ["vllm.max_tokenz: unknown key"]),
        ("vllm:\n  port: abc\n", ["vllm.port:", "'abc'"]),
        ("vllm:\n  port: 70000\n", ["vllm.port:", "65535"]),
        ("vllm:\n  temperature: 5\n", ["vllm.temperature:", "2"]),
        ("vllm:\n  top_p: 2\n", ["vllm.top_p:", "1"]),
        ("vllm:\n  auto_start: maybe\n", ["vllm.auto_start:"]),
        ("web:\n  bind_address:\n    port: -1\n", ["web.bind_address.port:"]),
        ('vllm:\n  api_key: "sk-1\\nx-evil: 1"\n', ["vllm.api_key:", "line breaks"]),
        ("colour: blue\n", ["colour: unknown key"]),
        ("- a list\n", ["top level must be a mapping"]),
    ],
)
def test_a_bad_key_is_named_by_its_path(tmp_path, text, words):
    assert_config_error(run_main("-c", write(tmp_path, text)), *words)


def test_a_bad_environment_override_is_named_by_the_key_it_sets(tmp_path):
    path = write(tmp_path, "vllm:\n  port: 8000\n")
    result = run_main("-c", path, env={"TIDE_VLLM__VLLM__PORT": "abc"})
    assert_config_error(result, "vllm.port:", "'abc'")


def test_the_spec_defaults_apply_to_an_empty_file(tmp_path):
    config = load_config(write(tmp_path, ""), environ={})
    assert config == Config()
    v = config.vllm
    assert (config.web.bind_address.host, config.web.bind_address.port) == ("0.0.0.0", 10002)
    assert (v.enabled, v.auto_start, v.host, v.port) == (True, True, "0.0.0.0", 8000)
    assert (v.model_name, v.model_path) == ("Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct")
    assert (v.max_tokens, v.temperature, v.top_p, v.timeout) == (2048, 0.7, 0.9, 60)
    assert (v.gpu_memory_utilization, v.tensor_parallel_size, v.max_num_seqs) == (0.9, 1, 256)
    assert (v.max_num_batched_tokens, v.max_model_len, v.dtype) == (8192, 4096, "auto")
    assert (v.startup_timeout, v.enable_prefix_caching, v.enable_chunked_prefill) == (
        600,
        True,
        True,
    )


def test_the_shipped_configs_are_valid_and_keep_the_spec_gpu_default():
    root = Path(MAIN).parents[2]
    assert load_config(root / "conf/tide-vllm.yaml", environ={}) == Config()
    cpu = load_config(root / "conf/tide-vllm.cpu.yaml", environ={})
    assert cpu.vllm.model_name == "SmolLM2-135M-Instruct"
    assert not cpu.vllm.model_path.startswith("~")


def test_environment_variables_override_keys(tmp_path):
    path = write(tmp_path, "vllm:\n  port: 8000\n")
    config = load_config(
        path,
        environ={
            "TIDE_VLLM__VLLM__PORT": "8001",
            "TIDE_VLLM__VLLM__AUTO_START": "false",
            "TIDE_VLLM__WEB__BIND_ADDRESS__PORT": "9000",
        },
    )
    assert (config.vllm.port, config.vllm.auto_start) == (8001, False)
    assert config.web.bind_address.port == 9000


def test_a_launch_command_that_does_not_exist_is_one_clear_line(tmp_path):
    path = write(tmp_path, "vllm:\n  command: [/nonexistent/vllm]\n")
    result = run_main("-c", path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "'/nonexistent/vllm' was not found" in result.stderr
    assert "auto_start: false" in result.stderr
