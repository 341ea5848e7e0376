"""routing.kv_events (precise mode) in the configuration and at launch: where each engine
publishes its KV-cache events (a socket file of its own, or its kv_events_endpoint), the flag
that tells an auto-started vLLM so, where the gateway reads them, and every problem named by
its key."""

from __future__ import annotations

import importlib
import json
from itertools import pairwise
from pathlib import Path

import pytest
import yaml

from tide_vllm.infrastructure.vllm.supervisor import build_command
from tide_vllm_cmd.app.options.options import Config, ConfigError, load_config
from tide_vllm_cmd.app.options.plugin_web_handler import provider_settings

FLAG = "--kv-events-config"


def load(tmp_path: Path, config: dict) -> Config:
    path = tmp_path / "tide-vllm.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_config(path, environ={})


def error_of(tmp_path: Path, config: dict) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, config)
    return str(info.value)


def fleet(tmp_path: Path, *entries: dict, kv_events: bool = True, **routing: object) -> dict:
    """Engines of model m, each auto-started one with a pid file in a folder of its own under
    tmp_path unless it says otherwise."""
    listed = []
    for entry in entries:
        if entry.get("auto_start", True) and "pid_file" not in entry:
            entry = {**entry, "pid_file": str(tmp_path / entry["name"] / "vllm.pid")}
        listed.append(entry)
    return {
        "vllm": {"model_name": "m"},
        "engines": listed,
        "routing": {"kv_events": kv_events, **routing},
    }


def kv_settings(command: list[str]) -> list[dict]:
    """The value of every --kv-events-config of a command line, parsed."""
    return [json.loads(value) for flag, value in pairwise(command) if flag == FLAG]


def test_kv_events_are_for_the_prefix_policy_only(tmp_path):
    config = fleet(tmp_path, {"name": "a", "port": 8001}, policy="least_load")
    message = error_of(tmp_path, config)
    assert "routing.kv_events: follows the engines' caches for the prefix policy only" in message
    assert "policy is least_load" in message
    config["routing"]["policy"] = "prefix"
    assert load(tmp_path, config).routing.kv_events


# -- what an auto-started engine is told


def test_an_auto_started_engine_publishes_on_a_socket_file_beside_its_pid_file(tmp_path):
    config = load(
        tmp_path, fleet(tmp_path, {"name": "a", "port": 8001}, {"name": "b", "port": 8002})
    )
    a, b = config.fleet()
    assert a.kv_events_publish == f"ipc://{tmp_path / 'a' / 'kv-events-8001.sock'}"
    assert b.kv_events_publish == f"ipc://{tmp_path / 'b' / 'kv-events-8002.sock'}"
    assert kv_settings(build_command(a)) == [
        {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": a.kv_events_publish}
    ]


def test_without_a_pid_file_the_socket_file_is_in_the_default_run_folder(tmp_path):
    config = load(
        tmp_path,
        {
            "engines": [{"name": "a", "port": 8001}, {"name": "b", "port": 8002}],
            "routing": {"kv_events": True},
        },
    )
    a, _ = config.fleet()
    assert a.kv_events_publish == f"ipc://{a.pid_path.parent / 'kv-events-8001.sock'}"


def test_the_engine_as_launched_with_its_upstream_key_still_publishes(tmp_path):
    (a,) = load(tmp_path, fleet(tmp_path, {"name": "a", "port": 8001})).fleet()
    launched = a.model_copy(update={"api_key": "generated"})  # as the vLLM plugin does
    assert launched.kv_events_publish == a.kv_events_publish
    assert kv_settings(build_command(launched)) == kv_settings(build_command(a))


def test_without_routing_kv_events_no_engine_is_told_to_publish(tmp_path):
    config = load(
        tmp_path,
        fleet(
            tmp_path,
            {"name": "a", "port": 8001, "kv_events_endpoint": "tcp://*:5557"},
            kv_events=False,
        ),
    )
    (a,) = config.fleet()
    assert a.kv_events_publish is None and a.kv_events_subscribe() == ()
    assert FLAG not in build_command(a)


@pytest.mark.parametrize(
    "given",
    [
        [FLAG, '{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:6000"}'],
        ['--kv_events_config={"enable_kv_cache_events":true,"endpoint":"tcp://*:6000"}'],
    ],
    ids=["flag-and-value", "underscores-and-equals"],
)
def test_extra_args_that_configure_the_events_win(tmp_path, given):
    (a,) = load(tmp_path, fleet(tmp_path, {"name": "a", "port": 8001, "extra_args": given})).fleet()
    command = build_command(a)
    assert command[-len(given) :] == given
    assert sum(arg.split("=", 1)[0].replace("_", "-") == FLAG for arg in command) == 1


def test_a_given_endpoint_is_passed_as_it_is(tmp_path):
    entry = {"name": "a", "port": 8001, "kv_events_endpoint": "tcp://*:5557"}
    (a,) = load(tmp_path, fleet(tmp_path, entry)).fleet()
    assert kv_settings(build_command(a))[0]["endpoint"] == "tcp://*:5557"


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:5557", "tcp://127.0.0.1:5557"])
def test_an_auto_started_engine_is_not_told_an_endpoint_vllm_would_connect_to(tmp_path, endpoint):
    """vLLM's publisher binds its endpoint only when it holds * or :: (or is ipc://); any other
    it connects to, and then nothing binds it and no event is ever read. Such an endpoint must
    be refused, naming the key, or passed to vLLM as one it binds."""
    vllm_events = importlib.import_module("vllm.distributed.kv_events")
    binds = vllm_events.ZmqEventPublisher._is_bind_endpoint
    assert binds("tcp://*:5557") and not binds(endpoint)  # vLLM's own rule
    try:
        (a,) = load(
            tmp_path, fleet(tmp_path, {"name": "a", "port": 8001, "kv_events_endpoint": endpoint})
        ).fleet()
    except ConfigError as exc:
        assert "engines[0].kv_events_endpoint" in str(exc)
        return
    assert binds(kv_settings(build_command(a))[0]["endpoint"])


# -- problems, named by their key


@pytest.mark.parametrize(
    ("endpoint", "why"),
    [
        ("udp://x:5557", "must be tcp://HOST:PORT or ipc://PATH, as tcp://*:5557"),
        ("tcp://host", "must be tcp://HOST:PORT or ipc://PATH"),
        ("tcp://host:port", "must be tcp://HOST:PORT or ipc://PATH"),
        ("tcp://:5557", "must be tcp://HOST:PORT or ipc://PATH"),
        ("tcp://h:0", "PORT must be from 1 to 65535"),
        ("tcp://h:65536", "PORT must be from 1 to 65535"),
        ("ipc://", "ipc:// needs a path"),
        ("ipc:///" + "x" * 100, "longer than 100 bytes"),
    ],
)
def test_a_malformed_endpoint_is_an_error_naming_the_key(tmp_path, endpoint, why):
    entries = (
        {"name": "a", "port": 8001},
        {"name": "b", "port": 8002, "kv_events_endpoint": endpoint},
    )
    message = error_of(tmp_path, fleet(tmp_path, *entries))
    assert "engines[1].kv_events_endpoint: Value error, " in message and why in message
    message = error_of(tmp_path, {"vllm": {"kv_events_endpoint": endpoint}})
    assert "vllm.kv_events_endpoint: Value error, " in message and why in message


def test_two_auto_started_engines_publishing_on_one_endpoint_are_named(tmp_path):
    same = {"kv_events_endpoint": "tcp://*:5557"}
    config = fleet(
        tmp_path, {"name": "a", "port": 8001, **same}, {"name": "b", "port": 8002, **same}
    )
    message = error_of(tmp_path, config)
    assert "engines[1].kv_events_endpoint: tcp://*:5557 is where 'a' (engines[0]) publishes" in (
        message
    )
    config["engines"][1]["auto_start"] = False  # an external engine's is where it publishes
    assert len(load(tmp_path, config).fleet()) == 2
    config["engines"][1].update(auto_start=True, enabled=False)
    assert len(load(tmp_path, config).fleet()) == 2


def test_two_engines_sharing_an_inherited_endpoint_are_named(tmp_path):
    config = fleet(tmp_path, {"name": "a", "port": 8001}, {"name": "b", "port": 8002})
    config["vllm"]["kv_events_endpoint"] = "tcp://*:5557"
    assert "engines[1].kv_events_endpoint: tcp://*:5557 is where 'a'" in error_of(tmp_path, config)


@pytest.mark.parametrize("endpoint", [None, "ipc:///run/tide-vllm/kv.sock"])
def test_data_parallel_ranks_need_a_tcp_endpoint(tmp_path, endpoint):
    entry = {"name": "a", "port": 8001, "data_parallel_size": 2}
    if endpoint is not None:
        entry["kv_events_endpoint"] = endpoint
    message = error_of(tmp_path, fleet(tmp_path, entry))
    assert "engines[0].kv_events_endpoint: with data_parallel_size 2" in message
    assert "set a tcp endpoint, as tcp://*:5557" in message


def test_a_pid_file_too_deep_for_a_socket_file_beside_it_is_named(tmp_path):
    deep = tmp_path / ("d" * 100) / "vllm.pid"
    message = error_of(
        tmp_path, fleet(tmp_path, {"name": "a", "port": 8001, "pid_file": str(deep)})
    )
    assert "engines[0].kv_events_endpoint: the socket file of its KV-cache events" in message
    assert "longer than 100 bytes; set one (ipc://PATH or tcp://*:PORT)" in message
    # Fine when routing does not follow the events (a fleet of one has nothing to route: its
    # vLLM publishes none), or when the endpoint is given.
    alone = load(tmp_path, {"vllm": {"pid_file": str(deep)}, "routing": {"kv_events": True}})
    assert alone.fleet()[0].kv_events_publish is None
    assert load(tmp_path, {"vllm": {"pid_file": str(deep)}}).fleet()[0].kv_events_publish is None
    given = {"pid_file": str(deep), "kv_events_endpoint": "tcp://*:5557"}
    assert load(tmp_path, {"vllm": given, "routing": {"kv_events": True}})


# -- where the gateway reads them


def one(tmp_path: Path, **entry: object) -> Config:
    return load(tmp_path, fleet(tmp_path, {"name": "a", "port": 8001, **entry}))


def test_a_wildcard_bind_is_read_on_loopback(tmp_path):
    (a,) = one(tmp_path, host="0.0.0.0", kv_events_endpoint="tcp://*:5557").fleet()
    assert a.kv_events_subscribe() == ("tcp://127.0.0.1:5557",)
    assert a.kv_events_subscribe("10.1.2.3") == ("tcp://10.1.2.3:5557",)
    external = {"auto_start": False, "host": "0.0.0.0"}
    (a,) = one(tmp_path, **external, kv_events_endpoint="tcp://0.0.0.0:5557").fleet()
    assert a.kv_events_subscribe() == ("tcp://127.0.0.1:5557",)


def test_an_ipv6_address_is_bracketed(tmp_path):
    (a,) = one(tmp_path, host="::1", kv_events_endpoint="tcp://*:5557").fleet()
    assert a.kv_events_subscribe() == ("tcp://[::1]:5557",)
    (a,) = one(tmp_path, auto_start=False, kv_events_endpoint="tcp://[fd00::9]:5557").fleet()
    assert a.kv_events_subscribe() == ("tcp://[fd00::9]:5557",)


def test_a_socket_file_is_read_where_it_is(tmp_path):
    (a,) = one(tmp_path).fleet()
    assert a.kv_events_subscribe() == (a.kv_events_publish,)


def test_each_data_parallel_rank_is_read_on_its_own_port(tmp_path):
    (a,) = one(tmp_path, data_parallel_size=3, kv_events_endpoint="tcp://*:5557").fleet()
    assert a.kv_events_subscribe() == (
        "tcp://127.0.0.1:5557",
        "tcp://127.0.0.1:5558",
        "tcp://127.0.0.1:5559",
    )


def test_an_external_engine_is_read_where_its_endpoint_says(tmp_path):
    external = {"auto_start": False, "host": "10.0.0.5"}
    (a,) = one(tmp_path, **external, kv_events_endpoint="tcp://*:5557").fleet()
    assert a.kv_events_subscribe() == ("tcp://10.0.0.5:5557",)
    (a,) = one(tmp_path, **external).fleet()
    assert a.kv_events_publish is None and a.kv_events_subscribe() == ()


def test_nothing_is_read_with_kv_events_off_or_from_a_disabled_engine(tmp_path):
    off = fleet(
        tmp_path, {"name": "a", "port": 8001, "kv_events_endpoint": "tcp://*:5557"}, kv_events=False
    )
    assert load(tmp_path, off).fleet()[0].kv_events_subscribe() == ()
    (a,) = one(tmp_path, enabled=False, kv_events_endpoint="tcp://*:5557").fleet()
    assert a.kv_events_subscribe() == ()


# -- what the web layer is given


def test_the_provider_is_given_each_engines_endpoints_and_each_pools_template(tmp_path):
    config = load(
        tmp_path,
        fleet(
            tmp_path,
            {"name": "a", "port": 8001},
            {
                "name": "far",
                "auto_start": False,
                "host": "10.0.0.5",
                "port": 8000,
                "kv_events_endpoint": "tcp://*:5557",
            },
            {"name": "quiet", "auto_start": False, "host": "10.0.0.6", "port": 8000},
            {
                "name": "pool",
                "auto_start": False,
                "discover": "dns://vllm.svc:8000",
                "kv_events_endpoint": "tcp://*:5557",
            },
        ),
    )
    settings = provider_settings(config)
    assert settings.kv_events
    assert {e.name: e.kv_events for e in settings.engines} == {
        "a": (f"ipc://{tmp_path / 'a' / 'kv-events-8001.sock'}",),
        "far": ("tcp://10.0.0.5:5557",),
        "quiet": (),
    }
    (pool,) = settings.discovered
    assert pool.kv_events == "tcp://*:5557"
    assert pool.kv_events_of("10.0.0.7") == ("tcp://10.0.0.7:5557",)
    assert pool.kv_events_of("fd00::7") == ("tcp://[fd00::7]:5557",)


def test_a_pools_ipv6_wildcard_bind_is_read_at_each_engines_address(tmp_path):
    """As for an engine of its own (:: is a wildcard, as * is, and vLLM binds both), a pool's
    engines are read each at its address, not all at the wildcard."""
    pool = {"name": "pool", "auto_start": False, "discover": "dns://vllm.svc:8000"}
    config = load(tmp_path, fleet(tmp_path, {**pool, "kv_events_endpoint": "tcp://[::]:5557"}))
    (found,) = provider_settings(config).discovered
    assert found.kv_events_of("10.0.0.7") == ("tcp://10.0.0.7:5557",)


def test_a_pool_without_an_endpoint_reads_nothing(tmp_path):
    config = load(
        tmp_path,
        fleet(
            tmp_path,
            {"name": "a", "port": 8001},
            {"name": "pool", "auto_start": False, "discover": "dns://vllm.svc:8000"},
        ),
    )
    (pool,) = provider_settings(config).discovered
    assert pool.kv_events is None and pool.kv_events_of("10.0.0.7") == ()


def test_the_provider_is_not_in_precise_mode_unless_asked(tmp_path):
    config = load(
        tmp_path,
        fleet(tmp_path, {"name": "a", "port": 8001}, {"name": "b", "port": 8002}, kv_events=False),
    )
    settings = provider_settings(config)
    assert not settings.kv_events and all(e.kv_events == () for e in settings.engines)
