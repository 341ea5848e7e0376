"""Which engine takes a request: the policies on plain values, then the fleet around them."""

from __future__ import annotations

import pytest

from tide_vllm.domain.fleet import (
    Candidate,
    Engine,
    Fleet,
    LeastLoad,
    Load,
    NoEngineAvailable,
    Outcome,
    PrefixAffinity,
    Query,
    Reason,
    RequestFeatures,
    RoundRobin,
    UnknownEngine,
    UnknownModel,
    policy_named,
)


def c(
    name: str, requests: int = 0, matched: int = 0, tokens: int = 0, waiting: float = 0
) -> Candidate:
    return Candidate(name, Load(requests, tokens, waiting), matched)


def q(*candidates: Candidate, total: int = 10, sticky: str | None = None) -> Query:
    return Query("m", candidates, total, sticky)


# -- the policies


def test_round_robin_takes_each_engine_in_turn():
    policy = RoundRobin()
    picks = [policy.choose(q(c("a"), c("b"), c("c"))).engine for _ in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]
    assert policy.choose(q(c("a"))).reason is Reason.ROUND_ROBIN


def test_least_load_takes_fewest_requests_then_tokens_then_waiting():
    policy = LeastLoad()
    assert policy.choose(q(c("a", 3), c("b", 2, tokens=900))).engine == "b"
    assert policy.choose(q(c("a", 2, tokens=100), c("b", 2, tokens=50))).engine == "b"
    assert policy.choose(q(c("a", 2, waiting=4), c("b", 2, waiting=1))).engine == "b"
    assert policy.choose(q(c("a", 2))).reason is Reason.LOAD


def test_least_load_shares_ties_in_turn():
    policy = LeastLoad()
    assert {policy.choose(q(c("a"), c("b"))).engine for _ in range(2)} == {"a", "b"}


def test_prefix_goes_to_the_longest_match():
    choice = PrefixAffinity().choose(q(c("a", matched=3), c("b", 1, matched=9), c("c")))
    assert (choice.engine, choice.reason) == ("b", Reason.AFFINITY)


def test_prefix_breaks_a_tie_of_matches_by_load():
    choice = PrefixAffinity().choose(q(c("a", 2, matched=9), c("b", 1, matched=9)))
    assert choice.engine == "b"


def test_prefix_without_a_good_match_falls_back_to_the_least_loaded():
    policy = PrefixAffinity(min_match=0.3)
    choice = policy.choose(q(c("a", 3, matched=2), c("b", 1)))
    assert (choice.engine, choice.reason) == ("b", Reason.FALLBACK)
    assert policy.choose(q(c("a", 3, matched=3), c("b", 1))).reason is Reason.AFFINITY


def test_prefix_leaves_a_clearly_overloaded_match_for_the_least_loaded():
    policy = PrefixAffinity(balance_abs=4, balance_rel=1.25)
    choice = policy.choose(q(c("a", 9, matched=10), c("b", 4), c("c", 5)))
    assert (choice.engine, choice.reason) == ("b", Reason.LOAD)


def test_prefix_overload_needs_both_the_absolute_and_the_relative_margin():
    policy = PrefixAffinity(balance_abs=4, balance_rel=1.25)
    assert policy.choose(q(c("a", 4, matched=10), c("b", 0))).engine == "a"  # only 4 more
    assert policy.choose(q(c("a", 30, matched=10), c("b", 25))).engine == "a"  # 1.2 times
    assert policy.choose(q(c("a", 32, matched=10), c("b", 25))).engine == "b"


def test_requests_waiting_in_vllm_count_toward_the_bound():
    policy = PrefixAffinity(balance_abs=4, balance_rel=1.25)
    choice = policy.choose(q(c("a", 3, matched=10, waiting=6), c("b", 3)))
    assert (choice.engine, choice.reason) == ("b", Reason.LOAD)


def test_prefix_takes_a_shorter_good_match_when_the_longest_is_overloaded():
    policy = PrefixAffinity(balance_abs=4, balance_rel=1.25)
    choice = policy.choose(q(c("a", 9, matched=10), c("b", 1, matched=6), c("c", 0)))
    assert (choice.engine, choice.reason) == ("b", Reason.AFFINITY)


def test_a_session_sticks_to_its_engine_within_the_same_load_bound():
    policy = PrefixAffinity(balance_abs=4, balance_rel=1.25)
    sticky = policy.choose(q(c("a", 3), c("b", matched=10), sticky="a"))
    assert (sticky.engine, sticky.reason) == ("a", Reason.STICKY)
    overloaded = policy.choose(q(c("a", 9), c("b", 0, matched=10), sticky="a"))
    assert (overloaded.engine, overloaded.reason) == ("b", Reason.AFFINITY)
    gone = policy.choose(q(c("b", 0), sticky="a"))
    assert gone.engine == "b"


def test_policies_are_named_as_in_the_configuration():
    assert isinstance(policy_named("prefix"), PrefixAffinity)
    assert isinstance(policy_named("least_load"), LeastLoad)
    assert isinstance(policy_named("round_robin"), RoundRobin)
    with pytest.raises(ValueError, match="unknown routing policy 'random'"):
        policy_named("random")


def test_a_policy_refuses_nonsense_settings():
    with pytest.raises(ValueError):
        PrefixAffinity(min_match=1.5)
    with pytest.raises(ValueError):
        PrefixAffinity(balance_rel=0.5)


# -- the fleet


def admitted(*engines: Engine, **kwargs: object) -> Fleet:
    fleet = Fleet(engines, **kwargs)  # type: ignore[arg-type]
    for e in engines:
        fleet.admit(e.name)
    return fleet


SYSTEM = {"role": "system", "content": "You review contracts for a law firm. " * 12}


def conversation(question: str, session: str | None = None) -> RequestFeatures:
    user = {"role": "user", "content": question + " Explain it plainly, citing the clause. " * 3}
    return RequestFeatures.of_chat([SYSTEM, user], session_id=session)


def test_the_fleet_knows_its_models_and_their_engines():
    fleet = admitted(Engine("a1", "A"), Engine("b1", "B"), Engine("a2", "A"))
    assert fleet.models() == ["A", "B"]
    assert [e.name for e in fleet.engines_of("A")] == ["a1", "a2"]
    with pytest.raises(UnknownModel):
        fleet.engines_of("C")
    with pytest.raises(UnknownEngine):
        fleet.drain("zz")


def test_a_request_goes_only_to_an_engine_of_its_model():
    fleet = admitted(Engine("a1", "A"), Engine("b1", "B"))
    assert {fleet.choose("B", conversation(str(i))).engine for i in range(5)} == {"b1"}
    with pytest.raises(UnknownModel):
        fleet.choose("C", conversation("x"))


def test_a_request_naming_an_adapter_goes_only_to_the_engines_that_list_it():
    e1, e2, e3 = Engine("e1", "m"), Engine("e2", "m"), Engine("e3", "m")
    e2.adapters = e3.adapters = frozenset({"sql"})
    fleet = admitted(e1, e2, e3, policy=RoundRobin())
    sql = RequestFeatures(adapter="sql")
    assert {fleet.choose("m", sql).engine for _ in range(6)} == {"e2", "e3"}
    fleet.drain("e2")
    fleet.drain("e3")
    with pytest.raises(NoEngineAvailable):  # not to e1, which would say it has no such model
        fleet.choose("m", sql)
    # An adapter no engine lists is vLLM's to judge: any engine of the model takes it.
    other = RequestFeatures(adapter="unlisted")
    assert fleet.choose("m", other).engine == "e1"


def test_a_shared_prefix_follows_the_engine_that_served_it():
    fleet = admitted(Engine("e1", "m"), Engine("e2", "m"), Engine("e3", "m"))
    first = fleet.choose("m", conversation("clause 1?"))
    fleet.on_end(fleet.on_dispatch(first), Outcome.OK)
    assert first.reason is Reason.FALLBACK
    second = fleet.choose("m", conversation("clause 2?"))
    assert (second.engine, second.reason) == (first.engine, Reason.AFFINITY)
    assert second.matched_blocks > 0 and 0 < second.match_ratio < 1


def test_the_retry_excludes_the_engine_that_failed():
    fleet = admitted(Engine("e1", "m"), Engine("e2", "m"))
    first = fleet.choose("m", conversation("q"))
    fleet.on_end(fleet.on_dispatch(first), Outcome.FAILED)
    retry = fleet.choose("m", conversation("q"), exclude={first.engine})
    assert retry.engine != first.engine
    with pytest.raises(NoEngineAvailable):
        fleet.choose("m", conversation("q"), exclude={"e1", "e2"})


def test_a_session_is_bound_to_the_engine_it_was_sent_to():
    fleet = admitted(Engine("e1", "m"), Engine("e2", "m"))
    first = fleet.choose("m", RequestFeatures.of_prompt("hi", session_id="s1"))
    fleet.on_dispatch(first)
    again = fleet.choose("m", RequestFeatures.of_prompt("other", session_id="s1"))
    assert (again.engine, again.reason) == (first.engine, Reason.STICKY)


def test_the_snapshot_shows_each_engines_state_load_and_estimated_hit_rate():
    fleet = admitted(Engine("e1", "m"), Engine("e2", "m"), Engine("e3", "m"))
    fleet.eject("e3")
    first, second = (conversation(question) for question in "ab")
    fleet.on_first_token(fleet.on_dispatch(fleet.choose("m", first, exclude={"e2"})))
    fleet.on_first_token(fleet.on_dispatch(hit := fleet.choose("m", second, exclude={"e2"})))
    e1, e2, e3 = fleet.snapshot()
    assert (e1.name, e1.state, e1.requests, e1.prefilling, e1.dispatched) == (
        "e1",
        "admitted",
        2,
        0,
        2,
    )
    assert 0 < hit.matched_blocks < second.total_blocks  # the system prompt, not the question
    assert e1.hit_rate == hit.matched_blocks / (first.total_blocks + second.total_blocks)
    assert (e2.hit_rate, e2.requests) == (None, 0)
    assert (e3.state, e3.admitted, e3.breaker) == ("ejected", False, "closed")


def test_an_engine_can_join_and_leave_the_fleet():
    fleet = admitted(Engine("e1", "m"))
    fleet.add(Engine("e2", "m", admitted=True))
    with pytest.raises(ValueError):
        fleet.add(Engine("e2", "m"))
    ticket = fleet.on_dispatch(fleet.choose("m", conversation("q"), exclude={"e1"}))
    fleet.remove("e2")
    fleet.on_end(ticket, Outcome.OK)  # its ticket ends quietly
    fleet.remove("e1")
    assert fleet.models() == []


def test_a_ticket_of_a_removed_engine_does_not_end_on_its_namesake_added_later():
    fleet = admitted(Engine("e1", "m"))
    ticket = fleet.on_dispatch(fleet.choose("m", conversation("q")))
    fleet.remove("e1")
    fleet.add(Engine("e1", "m", admitted=True))
    fleet.on_dispatch(fleet.choose("m", conversation("other")))
    fleet.on_end(ticket, Outcome.FAILED)
    (e1,) = fleet.snapshot()
    assert (e1.requests, e1.failures) == (1, 0)
