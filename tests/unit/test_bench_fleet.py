"""The fleet benchmark's pure parts (bench/fleet_*.py): the workload must be the same on every
run, and the figures must come out of vLLM's counters as the issue defines them. No engines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import fleet  # noqa: E402
import fleet_replicas as replicas_mod  # noqa: E402
import fleet_report as report  # noqa: E402
import fleet_workload as workload  # noqa: E402
from bench_proc import Server  # noqa: E402

from tide_vllm_cmd.app.options.options import load_config  # noqa: E402

METRICS = """\
# HELP vllm:prefix_cache_queries Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="M"} 1200.0
vllm:prefix_cache_queries_created{engine="0",model_name="M"} 1.7e9
vllm:prefix_cache_hits_total{engine="0",model_name="M"} 900.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="M"} 3.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="M"} 5.0
vllm:prompt_tokens_total{engine="0",model_name="M"} 1200.0
vllm:num_requests_running{engine="0",model_name="M"} 2.0
process_open_fds 12.0
"""


# -- the workload -------------------------------------------------------------------------------
def test_workload_is_the_same_on_every_build() -> None:
    first, second = workload.standard_workloads(), workload.standard_workloads()
    assert first == second
    assert [w.name for w in first] == ["shared-prefix", "hot-spot"]


def test_a_other_seed_gives_other_texts() -> None:
    assert workload.system_prompt(0) != workload.system_prompt(0, seed=17)
    assert workload.question(0, 0, 0) != workload.question(0, 0, 0, seed=17)


def test_the_issues_shapes() -> None:
    shared, hot = workload.standard_workloads()
    assert (len(shared.users), shared.turns, shared.requests, shared.groups) == (16, 6, 96, 4)
    sizes = sorted(sum(u.group == g for u in hot.users) for g in range(4))
    assert sizes == [2, 2, 2, 10] and hot.requests == 96
    assert (shared.max_tokens, shared.stagger, shared.think) == (16, 0.5, 2.0)
    (quick,) = workload.standard_workloads(quick=True)
    assert (len(quick.users), quick.turns, quick.groups) == (2, 2, 1)


def test_groups_share_a_prompt_and_differ_from_the_first_words() -> None:
    shared = workload.standard_workloads()[0]
    prompts = {u.group: u.system_prompt for u in shared.users}
    assert all(u.system_prompt == prompts[u.group] for u in shared.users)
    firsts = {p.split(".")[0] for p in prompts.values()}
    assert len(firsts) == 4  # no two groups share even a first block
    for prompt in prompts.values():
        assert len(prompt.split()) == workload.SYSTEM_WORDS + 7  # "You are … team 3."


def test_questions_are_30_words_and_differ_by_user_and_turn() -> None:
    user = workload.standard_workloads()[0].users[0]
    assert all(len(q.split()) == workload.QUESTION_WORDS for q in user.questions)
    assert all(q.endswith("?") for q in user.questions)
    assert len(set(user.questions)) == len(user.questions)


def test_users_are_shuffled_not_grouped() -> None:
    shared = workload.standard_workloads()[0]
    groups = [u.group for u in shared.users]
    assert groups != sorted(groups)
    assert len({u.user_id for u in shared.users}) == 16


def test_a_turn_carries_the_real_previous_answers() -> None:
    user = workload.standard_workloads()[0].users[0]
    body = workload.request_body("M", user, 2, ["a0", "a1"], 16)
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in body["messages"][2::2]] == ["a0", "a1"]
    assert body["messages"][-1]["content"] == user.questions[2]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["temperature"]) == (16, 0)


# -- vLLM's metrics -----------------------------------------------------------------------------
def test_samples_sum_label_sets_and_skip_created_and_comments() -> None:
    values = report.samples(METRICS)
    assert values["vllm:request_success_total"] == 8.0
    assert values["vllm:num_requests_running"] == 2.0
    assert values["process_open_fds"] == 12.0
    assert not any(name.endswith("_created") for name in values)


def test_metric_takes_the_name_with_or_without_total() -> None:
    assert report.metric({"vllm:prefix_cache_hits_total": 3.0}, report.HITS) == 3.0
    assert report.metric({"vllm:prefix_cache_hits": 4.0}, report.HITS) == 4.0
    assert report.metric({}, report.HITS) is None


def test_counters_name_a_missing_metric() -> None:
    assert report.counters(METRICS) == {
        report.HITS: 900.0,
        report.QUERIES: 1200.0,
        report.SUCCESS: 8.0,
        report.PROMPT_TOKENS: 1200.0,
    }
    with pytest.raises(KeyError, match="prefix_cache_hits"):
        report.counters(METRICS.replace("prefix_cache_hits", "other"))


def test_hit_rate_is_summed_over_replicas_before_dividing() -> None:
    before = {report.HITS: 100.0, report.QUERIES: 1000.0, report.SUCCESS: 2.0}
    r0 = report.delta(before, {report.HITS: 1000.0, report.QUERIES: 2000.0, report.SUCCESS: 10.0})
    r1 = {report.HITS: 0.0, report.QUERIES: 3000.0, report.SUCCESS: 4.0}
    assert r0 == {report.HITS: 900.0, report.QUERIES: 1000.0, report.SUCCESS: 8.0}
    assert report.hit_rate([r0, r1]) == pytest.approx(900 / 4000)  # not the mean of 0.9 and 0
    assert report.hit_rate([{report.QUERIES: 0.0}]) is None
    assert report.shares([r0, r1]) == pytest.approx([8 / 12, 4 / 12])
    assert report.shares([{report.SUCCESS: 0.0}]) is None


# -- runs and targets ---------------------------------------------------------------------------
def request(ttft: float | None, error: str | None = None, started: bool = True):
    first = None if ttft is None else ttft
    return report.RequestResult("u", 0, 0.0, first, 1.0, started, error)


def run(row: str, rate: float, ttfts: list[float], seconds: float = 10.0, **kw):
    deltas = [{report.HITS: rate * 100, report.QUERIES: 100.0, report.SUCCESS: 1.0}] * 2
    requests = [request(t) for t in ttfts]
    return report.RunResult(row, "w", requests, seconds, deltas, **kw)


def test_errors_are_split_by_whether_streaming_had_started() -> None:
    result = run("tide-prefix-kill", 0.5, [0.1])
    result.requests += [request(None, "refused", False), request(None, "cut", True)]
    assert (result.errors, result.failed_before_streaming, result.failed_mid_stream) == (2, 1, 1)
    assert result.ttfts == [0.1]
    assert result.req_per_s == pytest.approx(0.1)


def test_each_turn_is_in_the_json_in_the_order_sent() -> None:
    late = report.RequestResult("u1", 2, 12.5, 13.0, 14.0, True, None, prompt_tokens=40)
    first = report.RequestResult("u0", 0, 10.0, None, None, False, "refused")
    turns = report.RunResult("tide-prefix", "w", [late, first], 5.0).as_json()["turns"]
    assert turns == [
        {"user": "u0", "turn": 0, "sent": 0.0, "ttft": None, "latency": None,
         "prompt_tokens": None, "error": "refused"},
        {"user": "u1", "turn": 2, "sent": 2.5, "ttft": 0.5, "latency": 1.5,
         "prompt_tokens": 40, "error": None},
    ]  # fmt: skip


def test_a_killed_replica_leaves_no_hit_rate_or_shares() -> None:
    result = run("tide-prefix-kill", 0.5, [0.1], killed=1)
    result.deltas[1] = None
    assert result.hit_rate is None and result.shares is None
    assert "r1 killed" in report.table([result])


def test_targets_met_not_met_and_not_checked() -> None:
    tide = run("tide-prefix", 0.795, [0.1] * 10, seconds=9.0)
    router = run("router-cache_aware", 0.80, [0.2] * 10, seconds=10.0)
    rr = run("tide-round_robin", 0.30, [0.5] * 10)
    found = {t.what.split(": ", 1)[1]: t for t in report.targets([tide, router, rr])}
    assert found["hit rate within 0.01 of the best"].met is True
    assert found["TTFT p90 ≤ 0.9 × cache_aware's"].met is True
    assert found["req/s ≥ cache_aware's"].met is True
    assert found["0 errors"].met is True
    assert found["0 failed before streaming"].met is None

    slower = run("tide-prefix", 0.70, [0.19] * 10, seconds=11.0)
    found = {t.what.split(": ", 1)[1]: t for t in report.targets([slower, router])}
    assert found["hit rate within 0.01 of the best"].met is False
    assert found["TTFT p90 ≤ 0.9 × cache_aware's"].met is False
    assert found["req/s ≥ cache_aware's"].met is False

    alone = {t.what.split(": ", 1)[1]: t for t in report.targets([rr])}
    assert alone["TTFT p90 ≤ 0.9 × cache_aware's"].met is None
    assert "not checked" in report.target_lines(report.targets([rr]))


def test_the_precise_rows_targets_are_lines_of_their_own() -> None:
    tide = run("tide-prefix", 0.795, [0.1] * 10, seconds=9.0)
    kv = run("tide-prefix-kv", 0.70, [0.19] * 10, seconds=11.0)
    kv.requests.append(request(None, "refused", False))
    router = run("router-cache_aware", 0.80, [0.2] * 10, seconds=10.0)
    found = report.targets([tide, kv, router])
    whats = [t.what for t in found]
    assert whats == [
        "w: hit rate within 0.01 of the best",
        "w: TTFT p90 ≤ 0.9 × cache_aware's",
        "w: req/s ≥ cache_aware's",
        "w: 0 errors",
        "w, tide-prefix-kv: hit rate within 0.01 of the best",
        "w, tide-prefix-kv: TTFT p90 ≤ 0.9 × cache_aware's",
        "w, tide-prefix-kv: req/s ≥ cache_aware's",
        "w, tide-prefix-kv: 0 errors",
        "kill a replica: 0 failed before streaming",
    ]
    assert [t.met for t in found[:4]] == [True, True, True, True]  # tide-prefix's, unchanged
    assert [t.met for t in found[4:8]] == [False, False, False, False]
    assert found[4].detail == "70.0 %, best 80.0 % (router-cache_aware)"
    assert found[7].detail == "1 errors"

    # Without tide-prefix, its lines are not checked; the precise row's still are.
    alone = report.targets([kv, router])
    assert [t.met for t in alone[:4]] == [None, None, None, None]
    assert alone[3].detail == "no tide-prefix run"
    assert alone[5].what == "w, tide-prefix-kv: TTFT p90 ≤ 0.9 × cache_aware's"
    assert alone[5].met is False
    # Without the precise row, no line of its own (the output is as before it existed).
    assert not any("tide-prefix-kv" in t.what for t in report.targets([tide, router]))


def test_the_kill_target() -> None:
    kill = run("tide-prefix-kill", 0.5, [0.1], killed=0)
    assert report.targets([kill])[-1].met is True
    kill.requests.append(request(None, "refused", False))
    assert report.targets([kill])[-1].met is False


def test_table_has_one_line_per_run() -> None:
    lines = report.table([run("tide-prefix", 0.5, [0.1, 0.2])]).splitlines()
    assert len(lines) == 3
    assert "| w | tide-prefix | 50.0 % | 100 ms | 200 ms | 200 ms |" in lines[2]


# -- the harness's plan -------------------------------------------------------------------------
def test_the_kill_run_is_last_and_on_the_first_workload() -> None:
    workloads = workload.standard_workloads()
    args = fleet.parse_args(["--only", "tide-prefix-kill,router-cache_aware"])
    assert args.rows == ["router-cache_aware", "tide-prefix-kill"]
    planned = fleet.plan(args.rows, workloads)
    assert [(row, w.name) for row, w in planned] == [
        ("router-cache_aware", "shared-prefix"),
        ("router-cache_aware", "hot-spot"),
        ("tide-prefix-kill", "shared-prefix"),
    ]
    with pytest.raises(SystemExit):
        fleet.parse_args(["--only", "nginx"])


def test_the_rows_order() -> None:
    assert report.ROWS.index("tide-prefix-kv") == report.ROWS.index("tide-prefix") + 1
    assert report.ROWS[-1] == report.KILL_ROW
    args = fleet.parse_args(["--only", "tide-prefix-kill,tide-prefix-kv,tide-prefix"])
    assert args.rows == ["tide-prefix", "tide-prefix-kv", "tide-prefix-kill"]


def test_every_tide_row_has_its_routing() -> None:
    assert set(fleet.TIDE_ROUTING) == {*report.TIDE_ROWS, report.KILL_ROW}
    assert fleet.TIDE_ROUTING["tide-prefix"] == ("prefix", False)
    assert fleet.TIDE_ROUTING["tide-prefix-kv"] == ("prefix", True)
    assert fleet.TIDE_ROUTING["tide-round_robin"] == ("round_robin", False)
    assert fleet.TIDE_ROUTING["tide-prefix-kill"] == ("prefix", False)


def fake_replicas(workdir: Path) -> list[Server]:
    return [
        Server(
            f"r{i}",
            None,  # type: ignore[arg-type]
            8000 + i,
            Path("x"),
            {replicas_mod.KV_ENDPOINT: f"ipc://{workdir / f'kv-r{i}.sock'}"},
        )
        for i in range(2)
    ]


def load(tmp_path: Path, text: str):
    path = tmp_path / "tide-vllm.yaml"
    path.write_text(text)
    return load_config(path, environ={})


def test_tide_config_lists_the_replicas_as_external_engines(tmp_path: Path) -> None:
    text = fleet.tide_config(10002, fake_replicas(tmp_path), "prefix", "M")
    assert "- {name: r0, auto_start: false, host: 127.0.0.1, port: 8000, model_name: M}" in text
    assert "- {name: r1, auto_start: false, host: 127.0.0.1, port: 8001, model_name: M}" in text
    assert "routing: {policy: prefix}" in text
    config = load(tmp_path, text)
    assert (config.routing.policy, config.routing.kv_events) == ("prefix", False)
    assert [(e.name, e.port, e.auto_start) for e in config.fleet()] == [
        ("r0", 8000, False),
        ("r1", 8001, False),
    ]
    assert all(e.kv_events_subscribe() == () for e in config.fleet())


def test_tide_config_in_precise_mode_reads_each_replicas_events(tmp_path: Path) -> None:
    replicas = fake_replicas(tmp_path)
    text = fleet.tide_config(10002, replicas, "prefix", "M", kv_events=True)
    assert "routing: {policy: prefix, kv_events: true}" in text
    config = load(tmp_path, text)
    assert (config.routing.policy, config.routing.kv_events) == ("prefix", True)
    for engine, replica in zip(config.fleet(), replicas, strict=True):
        endpoint = replica.extra[replicas_mod.KV_ENDPOINT]
        assert engine.auto_start is False
        assert engine.kv_events_endpoint == endpoint
        assert engine.kv_events_subscribe() == (endpoint,)


# -- how the replicas serve the model -----------------------------------------------------------
def test_replicas_serve_the_model_in_its_own_dtype_unless_asked_for_float32_eager() -> None:
    default = replicas_mod.replica_command(Path("/m"), "M", 8000, 1)
    assert "--dtype" not in default and "--enforce-eager" not in default
    slow = replicas_mod.replica_command(Path("/m"), "M", 8000, 1, float32_eager=True)
    assert slow[slow.index("--dtype") + 1] == "float32"
    assert "--enforce-eager" in slow


def test_float32_eager_is_an_option_of_the_command_line() -> None:
    assert fleet.parse_args(["--float32-eager"]).float32_eager is True
    assert fleet.parse_args([]).float32_eager is False


# -- the replicas' KV-cache events --------------------------------------------------------------
def test_replicas_publish_their_kv_events_on_a_socket_file() -> None:
    command = replicas_mod.replica_command(Path("/m"), "M", 8000, 1, "ipc:///w/kv-r1.sock")
    flag = command.index("--kv-events-config")
    assert json.loads(command[flag + 1]) == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "ipc:///w/kv-r1.sock",
    }
    assert "--kv-events-config" not in replicas_mod.replica_command(Path("/m"), "M", 8000, 1)


def test_the_socket_files_fall_back_to_a_short_folder(tmp_path: Path) -> None:
    short = tmp_path / "w"
    assert replicas_mod.kv_socket_dir(short, 2) == (short, False)
    deep = tmp_path / ("d" * 120)
    folder, own = replicas_mod.kv_socket_dir(deep, 2)
    try:
        assert own and folder.is_dir()
        assert len(str(folder / "kv-r1.sock").encode()) <= replicas_mod.IPC_PATH_MAX
    finally:
        folder.rmdir()


def test_a_tide_rows_routing_decisions_are_read_from_its_metrics():
    text = (
        "# HELP tide_vllm_routing_decisions_total Routing decisions by engine and reason\n"
        "# TYPE tide_vllm_routing_decisions_total counter\n"
        'tide_vllm_routing_decisions_total{engine="r0",reason="affinity"} 40.0\n'
        'tide_vllm_routing_decisions_total{engine="r1",reason="load"} 3.0\n'
        'tide_vllm_routing_decisions_created{engine="r1",reason="load"} 1.7e9\n'
        "# TYPE tide_vllm_engine_requests_total counter\n"
        'tide_vllm_engine_requests_total{engine="r0"} 40.0\n'
    )
    assert report.routing_decisions(text) == {"r0 affinity": 40.0, "r1 load": 3.0}
