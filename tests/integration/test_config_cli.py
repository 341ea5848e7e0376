"""The real entry point, run as a process: configuration errors exit 2 with one clear line."""

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import MAIN, PYTHON
from tests.service import ServiceProcess, fake_vllm_config
from tide_vllm_cmd import main as entry
from tide_vllm_cmd.app.options.options import Config, is_local_model_path, load_config


def run_main(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, str(MAIN), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=cwd,
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
        ("engines:\n  - name: a\n    port: 70000\n", ["engines[0].port:", "65535"]),
        (
            "engines:\n  - {name: a, port: 8001}\n  - {name: a, port: 8002}\n",
            ["engines[1].name: 'a' is also the name of engines[0]"],
        ),
        (
            "engines:\n  - {name: a, port: 8001}\n  - {name: b, port: 8001}\n",
            ["engines[1].port:", "'a' (engines[0]) and 'b' would both listen on 0.0.0.0:8001"],
        ),
        (
            "engines:\n  - {name: pool, discover: 'dns://vllm:8000'}\n",
            ["engines[0].discover: tide-vllm starts no engine", "auto_start: false"],
        ),
        (
            "engines:\n  - {name: pool, auto_start: false, discover: 'vllm:8000'}\n",
            ["engines[0].discover:", "must be dns://NAME:PORT"],
        ),
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


# -- a bad set-up is caught up front ---------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/nonexistent/model", "./models/qwen", "../qwen", "~/no-such-model", ".", "a/b/c", "x y"],
)
def test_these_model_paths_can_only_be_local(path):
    assert is_local_model_path(path)


@pytest.mark.parametrize("path", ["Qwen/Qwen2.5-7B-Instruct", "gpt2", "org/name.v2", "a_b/c-d"])
def test_these_model_paths_may_be_hugging_face_ids(path):
    assert not is_local_model_path(path)


def test_a_local_model_path_that_does_not_exist_exits_2_before_vllm_starts(tmp_path):
    missing = tmp_path / "models" / "Qwen2.5-7B-Instruct"
    config = fake_vllm_config(model_path=str(missing))
    path = write(tmp_path, yaml.safe_dump(config))
    started = time.monotonic()
    result = run_main("-c", path)
    assert result.returncode == 2, result.stderr
    assert time.monotonic() - started < 30
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if "config error" in line]
    assert len(error) == 1, result.stderr
    assert f"vllm.model_path: '{missing}' does not exist" in error[0]
    assert error[0].startswith(f"tide-vllm: config error: {path}: ")
    assert "starting vLLM" not in result.stderr and "fake vLLM" not in result.stderr


def test_a_hugging_face_id_is_left_to_vllm(tmp_path):
    config = fake_vllm_config(model_path="Qwen/Qwen2.5-7B-Instruct")
    service = ServiceProcess(config, tmp_path)
    try:
        service.wait_healthy(timeout=30)
        assert service.terminate()[0] == 0
    finally:
        service.kill_all()


def test_in_manual_mode_the_model_path_is_not_checked(tmp_path):
    config = fake_vllm_config(model_path="/nonexistent/model")
    config["vllm"]["auto_start"] = False
    service = ServiceProcess(config, tmp_path)
    try:
        service.wait_listening()
        code, _ = service.terminate()
        assert code == 0, service.log()[-2000:]
        assert "model_path" not in service.log()
    finally:
        service.kill_all()


def pyproject_version() -> str:
    text = (Path(MAIN).parents[2] / "pyproject.toml").read_text()
    found = re.search(r'(?m)^version = "([^"]+)"', text)
    assert found
    return found.group(1)


def test_version_prints_the_package_version():
    for command in ([PYTHON, str(MAIN)], [str(Path(PYTHON).parent / "tide-vllm")]):
        result = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"tide-vllm {pyproject_version()}\n"


def test_version_comes_from_pyproject_when_the_package_is_not_installed(monkeypatch):
    def not_installed(name: str) -> str:
        raise entry.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(entry.metadata, "version", not_installed)
    assert entry.version() == pyproject_version()


def test_without_c_the_default_file_is_read(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "tide-vllm.yaml").write_text("vllm:\n  max_tokenz: 5\n")
    assert_config_error(run_main(cwd=tmp_path), "conf/tide-vllm.yaml", "vllm.max_tokenz")


def test_without_c_or_the_default_file_it_says_how_to_get_one(tmp_path):
    result = run_main(cwd=tmp_path)
    assert_config_error(result, "conf/tide-vllm.yaml does not exist", str(tmp_path))
    assert "tide-vllm --print-config > tide-vllm.yaml" in result.stderr
    assert "-c " in result.stderr


def test_print_config_gives_every_key_its_default_and_a_comment(tmp_path):
    result = run_main("--print-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    path = write(tmp_path, text)
    assert load_config(path, environ={}) == Config()  # it loads back as the defaults
    lines = text.splitlines()
    keys = [i for i, line in enumerate(lines) if re.match(r"^ *[a-z_]+:", line)]
    assert len(keys) > 40
    for i in keys:  # each key has a comment above it, at its own indentation
        indent = len(lines[i]) - len(lines[i].lstrip())
        assert lines[i - 1].startswith(" " * indent + "# "), lines[i]
    sections = [line[:-1] for line in lines if re.match(r"^[a-z]+:$", line)]
    assert sections[:2] == ["web", "vllm"]  # the spec's order
    assert set(sections) == set(Config.model_fields)
    assert max(len(line) for line in lines) <= 100
