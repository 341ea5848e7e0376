"""An engine's load accounting, its scraped gauges, its admission and its circuit breaker."""

from __future__ import annotations

import pytest

from tide_vllm.domain.fleet import (
    BreakerSettings,
    BreakerState,
    CircuitBreaker,
    Engine,
    Fleet,
    NoEngineAvailable,
    Outcome,
    RequestFeatures,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def fleet_of(*names: str, clock: FakeClock, gauge_max_age: float = 15.0) -> Fleet:
    fleet = Fleet([Engine(n, "m") for n in names], clock=clock, gauge_max_age=gauge_max_age)
    for n in names:
        fleet.admit(n)
    return fleet


REQUEST = RequestFeatures.of_prompt("p" * 800)  # 200 tokens, 12 blocks


def test_a_dispatch_counts_the_request_and_its_prompt_tokens_until_the_first_token():
    clock = FakeClock()
    fleet = fleet_of("e1", clock=clock)
    ticket = fleet.on_dispatch(fleet.choose("m", REQUEST))
    e1 = fleet.engine("e1")
    assert (e1.requests, e1.prefilling, e1.tokens) == (1, 1, 200)
    fleet.on_first_token(ticket)
    assert (e1.requests, e1.prefilling, e1.tokens) == (1, 0, 0)
    fleet.on_end(ticket, Outcome.OK)
    assert (e1.requests, e1.prefilling, e1.tokens, e1.dispatched) == (0, 0, 0, 1)


def test_a_request_that_ends_before_its_first_token_releases_its_tokens_too():
    clock = FakeClock()
    fleet = fleet_of("e1", clock=clock)
    ticket = fleet.on_dispatch(fleet.choose("m", REQUEST), prompt_tokens=300)
    assert fleet.engine("e1").tokens == 300
    fleet.on_end(ticket, Outcome.CANCELLED)
    fleet.on_end(ticket, Outcome.CANCELLED)  # a second end is ignored
    fleet.on_first_token(ticket)
    e1 = fleet.engine("e1")
    assert (e1.requests, e1.prefilling, e1.tokens, e1.failures) == (0, 0, 0, 0)


def test_the_cached_part_of_a_prompt_is_not_counted_as_prefill_work():
    clock = FakeClock()
    fleet = fleet_of("e1", clock=clock)
    fleet.on_end(fleet.on_dispatch(fleet.choose("m", REQUEST)), Outcome.OK)
    again = fleet.choose("m", REQUEST)
    assert again.matched_blocks == REQUEST.total_blocks
    fleet.on_dispatch(again)
    assert fleet.engine("e1").tokens == 200 - REQUEST.tokens_in(REQUEST.total_blocks)


def test_a_failed_request_counts_as_a_failure_of_the_engine():
    clock = FakeClock()
    fleet = fleet_of("e1", clock=clock)
    fleet.on_end(fleet.on_dispatch(fleet.choose("m", REQUEST)), Outcome.FAILED)
    assert fleet.engine("e1").failures == 1


def test_scraped_gauges_count_while_fresh_and_are_ignored_once_stale():
    clock = FakeClock()
    fleet = fleet_of("e1", clock=clock, gauge_max_age=15.0)
    fleet.observe("e1", waiting=7, kv_cache_usage=0.9)
    e1 = fleet.engine("e1")
    assert e1.load(clock.now, 15.0).waiting == 7
    clock.advance(14.0)
    assert fleet.snapshot()[0].waiting == 7
    clock.advance(2.0)
    assert e1.load(clock.now, 15.0).waiting == 0
    snapshot = fleet.snapshot()[0]
    assert (snapshot.waiting, snapshot.kv_cache_usage, snapshot.gauges_age) == (None, None, 16.0)


def test_the_scraped_cache_size_bounds_what_the_index_believes_the_engine_holds():
    clock = FakeClock()
    fleet = fleet_of("e1", clock=clock)
    fleet.observe("e1", waiting=0, kv_cache_usage=0.1, cache_tokens=48)  # 3 blocks of 16 tokens
    fleet.on_dispatch(fleet.choose("m", REQUEST))
    assert fleet.index.match("m", REQUEST.hashes) == {"e1": 3}


def test_a_new_engine_takes_nothing_until_its_first_health_check_passes():
    clock = FakeClock()
    fleet = Fleet([Engine("e1", "m")], clock=clock)
    with pytest.raises(NoEngineAvailable):
        fleet.choose("m", REQUEST)
    fleet.admit("e1")
    assert fleet.choose("m", REQUEST).engine == "e1"


def test_an_engine_that_fails_a_health_check_is_ejected_and_readmitted_when_one_passes():
    clock = FakeClock()
    fleet = fleet_of("e1", "e2", clock=clock)
    fleet.eject("e1")
    assert {fleet.choose("m", REQUEST).engine for _ in range(4)} == {"e2"}
    assert fleet.snapshot()[0].state == "ejected"
    fleet.admit("e1")
    assert {fleet.choose("m", REQUEST).engine for _ in range(4)} == {"e1", "e2"}


def test_an_ejected_engines_prefixes_are_forgotten():
    clock = FakeClock()
    fleet = fleet_of("e1", "e2", clock=clock)
    decision = fleet.choose("m", REQUEST)
    fleet.on_dispatch(decision)
    fleet.eject(decision.engine)
    assert fleet.index.match("m", REQUEST.hashes) == {}


def test_draining_takes_no_new_requests_and_lets_those_in_flight_finish():
    clock = FakeClock()
    fleet = fleet_of("e1", "e2", clock=clock)
    ticket = fleet.on_dispatch(fleet.choose("m", REQUEST, exclude={"e2"}))
    fleet.drain("e1")
    assert fleet.snapshot()[0].state == "draining"
    assert {fleet.choose("m", REQUEST).engine for _ in range(4)} == {"e2"}
    fleet.on_end(ticket, Outcome.OK)
    assert fleet.engine("e1").requests == 0
    fleet.resume("e1")
    assert fleet.snapshot()[0].state == "admitted"
    assert "e1" in {fleet.choose("m", REQUEST).engine for _ in range(4)}


SETTINGS = BreakerSettings(failures=3, window=60.0, cooldown=5.0, max_cooldown=20.0)


def test_repeated_failures_open_the_breaker_for_a_cooldown_then_half_open_it():
    breaker = CircuitBreaker(SETTINGS)
    breaker.failed(0.0)
    breaker.failed(1.0)
    assert breaker.allows(1.0)
    breaker.failed(2.0)
    assert breaker.state(2.0) is BreakerState.OPEN and not breaker.allows(6.9)
    assert breaker.state(7.0) is BreakerState.HALF_OPEN and breaker.allows(7.0)


def test_failures_spread_wider_than_the_window_do_not_open_it():
    breaker = CircuitBreaker(SETTINGS)
    for t in (0.0, 40.0, 80.0, 120.0):
        breaker.failed(t)
    assert breaker.state(120.0) is BreakerState.CLOSED


def test_a_success_clears_the_failures_counted_so_far():
    breaker = CircuitBreaker(SETTINGS)
    breaker.failed(0.0)
    breaker.failed(1.0)
    breaker.succeeded(2.0)
    breaker.failed(3.0)
    assert breaker.state(3.0) is BreakerState.CLOSED


def test_half_open_lets_one_trial_through_and_its_success_closes_the_breaker():
    breaker = CircuitBreaker(SETTINGS)
    for t in (0.0, 0.0, 0.0):
        breaker.failed(t)
    assert breaker.begin_request(5.0) is True
    assert not breaker.allows(5.0)  # one trial at a time
    assert breaker.begin_request(5.0) is False
    breaker.succeeded(6.0)
    assert breaker.state(6.0) is BreakerState.CLOSED and breaker.allows(6.0)


def test_a_failed_trial_reopens_the_breaker_for_twice_as_long_up_to_the_cap():
    breaker = CircuitBreaker(SETTINGS)
    for t in (0.0, 0.0, 0.0):
        breaker.failed(t)
    assert breaker.cooldown_left(0.0) == 5.0
    now = 5.0
    for cooldown in (10.0, 20.0, 20.0):
        breaker.begin_request(now)
        breaker.failed(now)
        assert breaker.cooldown_left(now) == cooldown
        now += cooldown
    assert breaker.cooldown_left(now) is None
    breaker.succeeded(now)
    for _ in range(3):
        breaker.failed(now)
    assert breaker.cooldown_left(now) == 5.0  # closing reset the cool-down


def test_an_abandoned_trial_lets_the_next_one_through():
    breaker = CircuitBreaker(SETTINGS)
    for t in (0.0, 0.0, 0.0):
        breaker.failed(t)
    breaker.begin_request(5.0)
    breaker.trial_abandoned()
    assert breaker.allows(5.0)


def test_an_engine_that_flaps_opens_its_breaker_although_checks_pass_in_between():
    clock = FakeClock()
    fleet = fleet_of("e1", "e2", clock=clock)
    for _ in range(3):
        fleet.eject("e1")
        clock.advance(1.0)
        fleet.admit("e1")
    assert fleet.snapshot()[0].state == "open"
    assert {fleet.choose("m", REQUEST).engine for _ in range(4)} == {"e2"}


def test_a_health_check_that_passes_during_the_cooldown_does_not_close_the_breaker():
    clock = FakeClock()
    fleet = fleet_of("e1", clock=clock)
    for _ in range(3):
        fleet.eject("e1")
    fleet.admit("e1")
    assert fleet.snapshot()[0].breaker == "open"
    clock.advance(5.0)
    fleet.admit("e1")  # the half-open trial, by health check
    assert fleet.snapshot()[0].state == "admitted"


def test_a_request_is_the_half_open_trial_and_its_outcome_decides():
    clock = FakeClock()
    fleet = fleet_of("e1", "e2", clock=clock)
    for _ in range(3):
        fleet.on_end(fleet.on_dispatch(fleet.choose("m", REQUEST, {"e2"})), Outcome.FAILED)
    with pytest.raises(NoEngineAvailable):
        fleet.choose("m", REQUEST, exclude={"e2"})
    clock.advance(5.0)
    trial = fleet.on_dispatch(fleet.choose("m", REQUEST, exclude={"e2"}))
    assert trial.trial
    with pytest.raises(NoEngineAvailable):  # only one trial at a time
        fleet.choose("m", REQUEST, exclude={"e2"})
    fleet.on_end(trial, Outcome.OK)
    assert fleet.snapshot()[0].state == "admitted"
    assert fleet.snapshot()[0].failures == 3


def test_a_cancelled_trial_tells_nothing_and_the_next_request_is_the_trial():
    clock = FakeClock()
    fleet = fleet_of("e1", clock=clock)
    for _ in range(3):
        fleet.on_end(fleet.on_dispatch(fleet.choose("m", REQUEST)), Outcome.FAILED)
    clock.advance(5.0)
    fleet.on_end(fleet.on_dispatch(fleet.choose("m", REQUEST)), Outcome.CANCELLED)
    assert fleet.snapshot()[0].breaker == "half_open"
    assert fleet.on_dispatch(fleet.choose("m", REQUEST)).trial
