"""`engines:` and `routing:`: each entry is the `vllm:` section overlaid with its own keys; every
problem names its key's path (engines[1].port); without `engines:` the fleet is `vllm:` alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tide_vllm_cmd.app.options.options import (
    Config,
    ConfigError,
    check_model_path,
    load_config,
)
from tide_vllm_cmd.app.options.plugin_vllm import VLLMPlugin
from tide_vllm_cmd.app.options.plugin_web_handler import provider_settings
from tide_vllm_cmd.app.server import Context

TWO_GPUS = {
    "vllm": {
        "model_name": "qwen",
        "model_path": "Qwen/Qwen2.5-7B-Instruct",
        "max_tokens": 512,
        "extra_args": ["--enforce-eager"],
        "env": {"VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"},
    },
    "engines": [
        {"name": "gpu0", "port": 8001, "env": {"CUDA_VISIBLE_DEVICES": "0"}},
        {"name": "gpu1", "port": 8002, "env": {"CUDA_VISIBLE_DEVICES": "1", "HF_HUB_OFFLINE": "0"}},
        {
            "name": "remote",
            "auto_start": False,
            "host": "10.0.0.5",
            "port": 8000,
            "model_name": "Qwen2.5-72B-Instruct",
        },
    ],
    "routing": {"policy": "least_load"},
}


def load(tmp_path: Path, config: dict, environ: dict[str, str] | None = None) -> Config:
    path = tmp_path / "tide-vllm.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_config(path, environ=environ or {})


def error_of(tmp_path: Path, config: dict, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, config, environ)
    return str(info.value)


def test_an_entry_takes_the_vllm_section_as_its_defaults(tmp_path):
    gpu0, gpu1, remote = load(tmp_path, TWO_GPUS).fleet()
    assert (gpu0.name, gpu0.port, gpu0.model_name, gpu0.max_tokens) == ("gpu0", 8001, "qwen", 512)
    assert gpu0.extra_args == ["--enforce-eager"] and gpu0.auto_start
    assert (gpu1.port, gpu1.model_path) == (8002, "Qwen/Qwen2.5-7B-Instruct")
    assert (remote.auto_start, remote.host, remote.port) == (False, "10.0.0.5", 8000)
    assert remote.model_name == "Qwen2.5-72B-Instruct" and remote.max_tokens == 512


def test_an_entrys_env_is_merged_with_vllms_the_entry_winning(tmp_path):
    gpu0, gpu1, _ = load(tmp_path, TWO_GPUS).fleet()
    assert gpu0.env == {
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "0",
    }
    assert gpu1.env["HF_HUB_OFFLINE"] == "0" and gpu1.env["VLLM_CPU_KVCACHE_SPACE"] == "2"


def test_each_engine_is_named_by_its_key_path_and_has_its_own_pid_file(tmp_path):
    fleet = load(tmp_path, TWO_GPUS).fleet()
    assert [e.config_key for e in fleet] == ["engines[0]", "engines[1]", "engines[2]"]
    assert fleet[0].pid_path != fleet[1].pid_path
    assert fleet[0].pid_path.name == "vllm-8001.pid"


def test_without_engines_the_fleet_is_the_vllm_section_named_default(tmp_path):
    config = load(tmp_path, {"vllm": {"port": 8123, "model_name": "m"}})
    assert config.engines is None and config.routing.policy == "prefix"
    [engine] = config.fleet()
    assert (engine.name, engine.config_key, engine.port, engine.model_name) == (
        "default",
        "vllm",
        8123,
        "m",
    )
    assert engine.model_dump(exclude={"name", "discover"}) == config.vllm.model_dump()
    assert engine.discover is None


def test_the_routing_policy_is_read(tmp_path):
    assert load(tmp_path, TWO_GPUS).routing.policy == "least_load"


def test_vllm_overrides_from_the_environment_reach_every_entry(tmp_path):
    config = load(tmp_path, TWO_GPUS, {"TIDE_VLLM__VLLM__MAX_TOKENS": "64"})
    assert [e.max_tokens for e in config.fleet()] == [64, 64, 64]


def test_an_entry_is_overridden_by_its_index(tmp_path):
    environ = {
        "TIDE_VLLM__ENGINES__1__PORT": "8005",
        "TIDE_VLLM__ENGINES__0__MAX_TOKENS": "99",
        "TIDE_VLLM__ROUTING__POLICY": "round_robin",
    }
    config = load(tmp_path, TWO_GPUS, environ)
    gpu0, gpu1, _ = config.fleet()
    assert (gpu1.port, gpu1.max_tokens) == (8005, 512)
    assert (gpu0.port, gpu0.max_tokens) == (8001, 99)
    assert config.routing.policy == "round_robin"


def test_an_override_of_an_entry_the_file_does_not_have_is_named(tmp_path):
    message = error_of(tmp_path, TWO_GPUS, {"TIDE_VLLM__ENGINES__3__PORT": "8005"})
    assert message.startswith("TIDE_VLLM__ENGINES__3__PORT: engines has no entry 3")


def with_entries(*entries: dict, **sections: object) -> dict:
    return {"vllm": {"model_name": "m"}, "engines": list(entries), **sections}


@pytest.mark.parametrize(
    ("config", "words"),
    [
        (
            with_entries({"name": "a", "port": 1}, {"name": "b", "port": 70000}),
            ["engines[1].port:"],
        ),
        (with_entries({"port": 8001}), ["engines[0].name: Field required"]),
        (with_entries({"name": "GPU 0"}), ["engines[0].name: Value error, must be 1 to 32 of"]),
        (with_entries({"name": "x" * 33}), ["engines[0].name:"]),
        (with_entries({"name": "a", "max_tokenz": 5}), ["engines[0].max_tokenz: unknown key"]),
        (with_entries({"name": "a", "temperature": 5}), ["engines[0].temperature:"]),
        (with_entries({"name": "a", "extra_args": [1]}), ["engines[0].extra_args[0]:"]),
        (with_entries("gpu0"), ["engines[0]: Input should be a valid dictionary"]),
        (with_entries(), ["engines: List should have at least 1 item"]),
        ({"engines": {"name": "a"}}, ["engines: Input should be a valid list"]),
        (with_entries({"name": "a"}, routing={"policy": "random"}), ["routing.policy:"]),
    ],
)
def test_a_bad_entry_is_named_by_its_path(tmp_path, config, words):
    message = error_of(tmp_path, config)
    for word in words:
        assert word in message, message


def test_a_bad_vllm_section_is_named_once_not_again_for_each_entry(tmp_path):
    config = {"vllm": {"port": "abc"}, "engines": [{"name": "a"}, {"name": "b", "port": 8002}]}
    message = error_of(tmp_path, config)
    assert "vllm.port:" in message and "engines[" not in message


def test_two_engines_with_one_name_are_named(tmp_path):
    message = error_of(
        tmp_path, with_entries({"name": "gpu0", "port": 8001}, {"name": "gpu0", "port": 8002})
    )
    assert "engines[1].name: 'gpu0' is also the name of engines[0]" in message


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"port": 8001}, {"port": 8001}),
        ({}, {}),  # both inherit vllm.port
        ({"port": 8001, "host": "0.0.0.0"}, {"port": 8001, "host": "127.0.0.1"}),
    ],
)
def test_two_auto_started_engines_on_one_port_are_named(tmp_path, first, second):
    config = with_entries({"name": "gpu0", **first}, {"name": "gpu1", **second})
    message = error_of(tmp_path, config)
    assert "engines[1].port: engines 'gpu0' (engines[0]) and 'gpu1' would both listen" in message


@pytest.mark.parametrize(
    "second",
    [
        {"port": 8001, "auto_start": False},  # an external engine is not ours to start
        {"port": 8001, "enabled": False},
        # another address (the default pid file is one per port: each needs its own)
        {"port": 8001, "host": "127.0.0.2", "pid_file": "/tmp/b.pid"},
    ],
)
def test_one_port_is_fine_when_both_do_not_compete(tmp_path, second):
    config = with_entries({"name": "a", "port": 8001, "host": "127.0.0.1"}, {"name": "b", **second})
    assert len(load(tmp_path, config).fleet()) == 2


def test_an_engine_on_the_web_port_is_named(tmp_path):
    config = with_entries({"name": "a", "port": 8001}, {"name": "b", "port": 10002})
    message = error_of(tmp_path, config)
    assert "engines[1].port: 10002 is web.bind_address.port too" in message
    message = error_of(tmp_path, {"vllm": {"port": 9000}, "web": {"bind_address": {"port": 9000}}})
    assert "vllm.port: 9000 is web.bind_address.port too" in message


def test_two_engines_with_one_pid_file_are_named(tmp_path):
    config = with_entries({"name": "a", "port": 8001}, {"name": "b", "port": 8002})
    config["vllm"]["pid_file"] = str(tmp_path / "vllm.pid")
    message = error_of(tmp_path, config)
    assert "engines[1].pid_file:" in message and "engines[0] ('a')" in message


def test_a_missing_local_model_of_an_entry_is_named_by_its_path(tmp_path):
    missing = str(tmp_path / "no-model")
    config = load(
        tmp_path,
        with_entries(
            {"name": "a", "port": 8001}, {"name": "b", "port": 8002, "model_path": missing}
        ),
    )
    check_model_path(config.fleet()[0], "x.yaml")  # Hugging Face ids are left to vLLM
    with pytest.raises(ConfigError) as info:
        check_model_path(config.fleet()[1], "x.yaml")
    assert str(info.value).startswith(f"x.yaml: engines[1].model_path: '{missing}' does not")
    assert "engines[1].auto_start: false" in str(info.value)


# -- discover: dns://NAME:PORT

POOL = "dns://vllm-headless.default.svc.cluster.local:8000"


def discovering(**entry: object) -> dict:
    return {
        "vllm": {"model_name": "qwen", "api_key": "k", "timeout": 90, "health_interval": 3},
        "engines": [
            {"name": "gpu0", "port": 8001},
            {"name": "pool", "auto_start": False, "discover": POOL, **entry},
        ],
    }


def test_an_entry_that_discovers_its_engines_gives_them_its_other_keys(tmp_path):
    config = load(tmp_path, discovering(timeout=120, api_key="pool-key"))
    gpu0, pool = config.fleet()
    assert pool.discovered_at == ("vllm-headless.default.svc.cluster.local", 8000)
    assert gpu0.discovered_at is None
    settings = provider_settings(config)
    assert [e.name for e in settings.engines] == ["gpu0"]
    (found,) = settings.discovered
    assert (found.name, found.model, found.host, found.port) == (
        "pool",
        "qwen",
        "vllm-headless.default.svc.cluster.local",
        8000,
    )
    assert (found.api_key, found.timeout, found.health_interval) == ("pool-key", 120, 3)
    assert settings.engines[0].timeout == 90  # each engine's own timeout, as any key


def test_a_disabled_entry_that_would_discover_is_one_disabled_engine(tmp_path):
    config = load(tmp_path, discovering(enabled=False))
    assert config.fleet()[1].discovered_at is None
    settings = provider_settings(config)
    assert [e.name for e in settings.engines] == ["gpu0", "pool"] and not settings.discovered


def test_an_entry_that_discovers_must_not_be_auto_started(tmp_path):
    config = discovering()
    del config["engines"][1]["auto_start"]  # vllm.auto_start: true by default
    message = error_of(tmp_path, config)
    assert "engines[1].discover: tide-vllm starts no engine at an address it finds" in message
    assert "auto_start: false" in message


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://vllm:8000", "the scheme must be dns://"),
        ("dns://vllm", "no PORT"),
        ("dns://vllm:0", "PORT must be from 1 to 65535"),
        ("dns://vllm:eighty", "Port could not be cast"),
        ("dns://:8000", "no NAME"),
        ("dns://vllm:8000/v1", "nothing but NAME:PORT"),
        ("dns://bad..name:8000", "'bad..name' is neither a DNS name nor an IP address"),
        ("vllm-headless:8000", "the scheme must be dns://"),
    ],
)
def test_a_malformed_discover_url_is_an_error_naming_the_key(tmp_path, url, why):
    message = error_of(tmp_path, discovering(discover=url))
    assert "engines[1].discover: Value error, must be dns://NAME:PORT" in message
    assert why in message


def test_discover_belongs_to_an_entry_not_to_vllm(tmp_path):
    message = error_of(tmp_path, {"vllm": {"discover": POOL}})
    assert "vllm.discover: unknown key" in message


def test_an_ipv6_name_in_brackets_is_accepted(tmp_path):
    config = load(tmp_path, discovering(discover="dns://[fd00::5]:9000"))
    assert config.fleet()[1].discovered_at == ("fd00::5", 9000)


async def test_the_vllm_plugin_leaves_an_entry_that_discovers_to_the_web_layer(tmp_path):
    config = load(
        tmp_path,
        {
            "engines": [
                {"name": "off", "enabled": False},
                {"name": "pool", "auto_start": False, "discover": POOL},
            ]
        },
    )
    ctx = Context(tmp_path / "tide-vllm.yaml", config)
    plugin = VLLMPlugin()
    await plugin.start(ctx)
    try:
        assert list(ctx.engines) == ["off"] and list(ctx.engine_configs) == ["off"]
    finally:
        await plugin.stop(ctx)


@pytest.mark.parametrize(
    ("workers", "policy", "kv_events", "warned"),
    [
        (2, "prefix", False, True),
        (2, "prefix", True, False),  # every worker reads the engines' events
        (1, "prefix", False, False),
        (2, "least_load", False, False),  # nothing remembered to lose
    ],
)
def test_several_workers_routing_by_what_each_sent_are_warned_of(
    tmp_path, workers, policy, kv_events, warned
):
    config = {
        **TWO_GPUS,
        "engines": TWO_GPUS["engines"][:2],
        "routing": {"policy": policy, "kv_events": kv_events},
        "web": {"workers": workers},
    }
    caveat = load(tmp_path, config).workers_routing_caveat()
    assert (caveat is not None) == warned
    if warned:
        assert "web.workers is 2" in caveat and "routing.kv_events: true" in caveat


def test_one_engine_and_several_workers_is_not_warned_of(tmp_path):
    config = {"vllm": TWO_GPUS["vllm"], "web": {"workers": 2}}
    assert load(tmp_path, config).workers_routing_caveat() is None
