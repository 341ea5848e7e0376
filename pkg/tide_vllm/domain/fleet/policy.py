"""Routing policies: given the engines that may take a request, which one should.

A policy sees plain values (each candidate's name, load and prefix match) and returns a name
and a reason, so it can be tested, and swapped, without a fleet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from .engine import Load


class Reason(str, Enum):
    """Why an engine was chosen; a closed set, fit for a metric label."""

    AFFINITY = "affinity"  # it holds the longest good prefix match and is not overloaded
    STICKY = "sticky"  # the request's session is bound to it and it is not overloaded
    LOAD = "load"  # the least loaded: the engines that matched were overloaded (or least_load)
    FALLBACK = "fallback"  # the least loaded: no engine held enough of the prefix
    ROUND_ROBIN = "round_robin"
    # the engine that stored the response the request names (vLLM's Responses API keeps
    # responses in its engine's memory: retrieved, cancelled or continued there only)
    STORED = "stored"
    # one of every engine of the model, each sent the request (a change of their state: a
    # LoRA adapter loaded or unloaded)
    EVERY = "every"


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    load: Load
    matched: int = 0  # leading prompt blocks it is thought to hold (or was sent)
    cached: int = 0  # of those, the blocks its own KV-cache events say it holds (precise mode)


@dataclass(frozen=True, slots=True)
class Query:
    model: str
    candidates: tuple[Candidate, ...]  # never empty
    total_blocks: int = 0
    sticky: str | None = None  # the engine the request's session is bound to


@dataclass(frozen=True, slots=True)
class Choice:
    engine: str
    reason: Reason


class RoutingPolicy(Protocol):
    name: str

    def choose(self, query: Query) -> Choice: ...


class _Rotation:
    """Breaks ties in turn, per model, so equal engines share the work deterministically."""

    def __init__(self) -> None:
        self._turns: dict[str, int] = {}

    def next(self, model: str) -> int:
        turn = self._turns.get(model, 0)
        self._turns[model] = turn + 1
        return turn


def _least_loaded(candidates: Sequence[Candidate], turn: int) -> Candidate:
    n = len(candidates)
    return min(
        enumerate(candidates),
        key=lambda ic: (ic[1].load.key, -ic[1].matched, (ic[0] - turn) % n),
    )[1]


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._rotation = _Rotation()

    def choose(self, query: Query) -> Choice:
        turn = self._rotation.next(query.model)
        return Choice(query.candidates[turn % len(query.candidates)].name, Reason.ROUND_ROBIN)


class LeastLoad:
    """Fewest requests in flight, then fewest prompt tokens awaiting prefill, then fewest
    requests vLLM reports waiting."""

    name = "least_load"

    def __init__(self) -> None:
        self._rotation = _Rotation()

    def choose(self, query: Query) -> Choice:
        turn = self._rotation.next(query.model)
        return Choice(_least_loaded(query.candidates, turn).name, Reason.LOAD)


class PrefixAffinity:
    """Sends a request where its prefix is cached, unless that engine is clearly overloaded.

    The idea of vllm-router's (and SGLang's) `cache_aware` policy, with the load bound applied
    to each engine it is about to choose rather than to the whole fleet. An engine is
    overloaded when its pressure (requests in flight, plus those vLLM reports waiting, which
    may come from elsewhere) exceeds the lowest pressure among the candidates by more than
    `balance_abs` *and* is more than `balance_rel` times it. A match is good when it covers at
    least `min_match` of the request's blocks. In order:

    1. the session's engine, if the request has one and it is not overloaded (sticky);
    2. among the engines with a good match, the longest match (the less loaded on a tie) that
       is not overloaded (affinity); a hot prefix thereby spreads over the engines the bound
       sends it to, as each of them comes to hold it too. In precise mode, the blocks an
       engine's own events say it holds come first; a match only by what an engine was sent
       (its cache evicted the prefix, or has not reported it yet) still keeps a conversation
       where it was, when no engine holds more of it;
    3. the least loaded engine: "load" if the good matches were all overloaded, else
       "fallback".

    `cache_aware` looks at the fleet's spread (max - min > 64 and max > 1.5 x min) before it
    looks at matches: a hot prefix piles onto one engine until the spread passes 64 requests.
    Bounding each candidate by 8 requests and 1.5x keeps its hit rate and its time to first
    token on the simulation in tests/unit/test_fleet_simulation.py, with a p95 latency a
    quarter lower; a tighter bound diverts conversations from their cache for little gain.
    """

    name = "prefix"

    def __init__(
        self, *, min_match: float = 0.3, balance_abs: float = 8, balance_rel: float = 1.5
    ) -> None:
        if not 0.0 <= min_match <= 1.0:
            raise ValueError("min_match must be between 0 and 1")
        if balance_abs < 0 or balance_rel < 1.0:
            raise ValueError("balance_abs must be >= 0 and balance_rel >= 1")
        self.min_match = min_match
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self._rotation = _Rotation()

    def overloaded(self, candidate: Candidate, floor: float) -> bool:
        """Whether `candidate` is clearly more loaded than the `floor` pressure."""
        pressure = candidate.load.pressure
        return pressure - floor > self.balance_abs and pressure > self.balance_rel * floor

    def choose(self, query: Query) -> Choice:
        candidates = query.candidates
        least = _least_loaded(candidates, self._rotation.next(query.model))
        floor = min(c.load.pressure for c in candidates)
        if query.sticky is not None:
            for c in candidates:
                if c.name == query.sticky and not self.overloaded(c, floor):
                    return Choice(c.name, Reason.STICKY)
        total = query.total_blocks
        good = [c for c in candidates if c.matched and c.matched >= self.min_match * total]
        if not good:
            return Choice(least.name, Reason.FALLBACK)
        good.sort(key=lambda c: (-c.cached, -c.matched, c.load.key))
        for c in good:
            if not self.overloaded(c, floor):
                return Choice(c.name, Reason.AFFINITY)
        return Choice(least.name, Reason.LOAD)


POLICIES: dict[str, type[RoundRobin] | type[LeastLoad] | type[PrefixAffinity]] = {
    PrefixAffinity.name: PrefixAffinity,
    LeastLoad.name: LeastLoad,
    RoundRobin.name: RoundRobin,
}


def policy_named(name: str) -> RoutingPolicy:
    """The policy `routing.policy` names, with its defaults: prefix, least_load, round_robin."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; one of {sorted(POLICIES)}") from None
