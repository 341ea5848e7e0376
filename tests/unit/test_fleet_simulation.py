"""The policies on simulated traffic: four engines, shared system prompts, growing conversations.

A discrete-event simulation on the fleet's own clock. Each engine prefills one request at a
time at a fixed token rate, skipping what its cache holds, and decodes requests side by side,
at full speed up to a batch of 16, slower beyond. It keeps a bounded LRU cache of the blocks
it prefilled and of the answers it wrote, the ground truth of a cache hit; the fleet knows
only its index. Everything is seeded and no figure depends on hash values: the same figures
come out on every run. `python -m tests.unit.test_fleet_simulation` prints them.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from tide_vllm.domain.fleet import (
    BLOCK_BYTES,
    Engine,
    Fleet,
    LeastLoad,
    Outcome,
    PrefixAffinity,
    Query,
    Reason,
    RequestFeatures,
    RoundRobin,
    RoutingPolicy,
    Ticket,
)
from tide_vllm.domain.fleet.policy import Choice

ENGINES = 4
PREFILL_TOKENS_PER_S = 4500.0
SECONDS_PER_OUTPUT_TOKEN = 0.02
BATCH = 16
CACHE_BLOCKS = 6000  # per engine: 6000 blocks of 64 bytes, about 96k tokens of KV cache
ARRIVE, FIRST, END = range(3)


class CacheAwareReference:
    """vllm-router's `cache_aware` with its defaults, as src/policies/cache_aware.rs reads: if
    the fleet is imbalanced ((max - min) > 64 and max > 1.5 x min requests in flight), the least
    loaded engine; else the longest match if it covers more than 30% of the request, else the
    least loaded. Ties go to the less loaded engine, which can only flatter it."""

    name = "cache_aware"

    def choose(self, query: Query) -> Choice:
        loads = [c.load.requests for c in query.candidates]
        least = min(query.candidates, key=lambda c: c.load.requests)
        if max(loads) - min(loads) > 64 and max(loads) > 1.5 * min(loads):
            return Choice(least.name, Reason.LOAD)
        best = min(query.candidates, key=lambda c: (-c.matched, c.load.requests))
        if query.total_blocks and best.matched / query.total_blocks > 0.3:
            return Choice(best.name, Reason.AFFINITY)
        return Choice(least.name, Reason.FALLBACK)


def text(rng: random.Random, size: int) -> str:
    return rng.randbytes(size // 2).hex()


@dataclass(frozen=True)
class Turn:
    request: RequestFeatures
    output_tokens: int
    answered: tuple[int, ...]  # the blocks of the request and its answer, cached once it ends


@dataclass(frozen=True)
class Conversation:
    """A conversation's requests, rendered once: only their timing depends on the routing."""

    label: str
    turns: tuple[Turn, ...]

    @classmethod
    def of(cls, label: str, system: str, exchanges: list[tuple[str, str]]) -> Conversation:
        messages = [{"role": "system", "content": system}]
        turns = []
        for user, reply in exchanges:
            messages.append({"role": "user", "content": user})
            request = RequestFeatures.of_chat(messages)
            messages.append({"role": "assistant", "content": reply})
            answered = RequestFeatures.of_chat(messages).hashes
            turns.append(Turn(request, len(reply) // 4, answered))
        return cls(label, tuple(turns))


@dataclass
class SimEngine:
    cache: dict[int, None] = field(default_factory=dict)  # in recency order, an LRU
    free_at: float = 0.0  # when its prefill queue is done
    in_flight: int = 0
    since: float = 0.0
    request_seconds: float = 0.0  # the integral of requests in flight over time

    def hit(self, hashes: tuple[int, ...]) -> int:
        """How many leading blocks it holds; then it holds them all."""
        n = 0
        for h in hashes:
            if h not in self.cache:
                break
            n += 1
        self.hold(hashes)
        return n

    def hold(self, hashes: tuple[int, ...]) -> None:
        cache = self.cache
        for h in reversed(hashes):
            cache.pop(h, None)
            cache[h] = None
        if len(cache) > CACHE_BLOCKS * 1.05:
            for h in list(itertools.islice(cache, len(cache) - CACHE_BLOCKS)):
                del cache[h]

    def count(self, now: float, delta: int) -> None:
        self.request_seconds += self.in_flight * (now - self.since)
        self.in_flight += delta
        self.since = now


@dataclass
class Result:
    hit_rate: float  # ground truth: blocks found in the engine's cache / blocks sent
    estimated_hit_rate: float  # the fleet's own estimate, from its index
    ttft_mean: float
    ttft_p95: float
    latency_mean: float  # arrival to last token
    latency_p95: float
    requests: list[int]  # per engine
    load: list[float]  # per engine: time-averaged requests in flight
    by_label: dict[str, list[int]]  # label -> requests per engine
    reasons: dict[str, int]

    @property
    def load_spread(self) -> float:
        return max(self.load) / statistics.fmean(self.load)

    @property
    def request_spread(self) -> float:
        return max(self.requests) / statistics.fmean(self.requests)

    def __str__(self) -> str:
        return (
            f"hit {self.hit_rate:.2f} (est. {self.estimated_hit_rate:.2f})  "
            f"ttft mean {self.ttft_mean:.2f}s p95 {self.ttft_p95:.2f}s  "
            f"latency mean {self.latency_mean:.2f}s p95 {self.latency_p95:.2f}s  "
            f"max/mean load {self.load_spread:.2f} requests {self.request_spread:.2f}  "
            f"{self.reasons}"
        )


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def p95(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.95)]


def simulate(policy: RoutingPolicy, conversations: list[tuple[float, Conversation]]) -> Result:
    clock = Clock()
    names = [f"e{i}" for i in range(ENGINES)]
    fleet = Fleet([Engine(n, "m") for n in names], policy, clock=clock)
    for n in names:
        fleet.admit(n)
        # The scraper reports each engine's cache size, which bounds the index's model of it.
        fleet.observe(n, waiting=0, kv_cache_usage=0.0, cache_tokens=CACHE_BLOCKS * 16)
    engines = {n: SimEngine() for n in names}
    # (time, order, what happens, the conversation, its turn, when the turn arrived, its ticket)
    events: list[tuple[float, int, int, Conversation, int, float, Ticket | None]] = []
    order = itertools.count()
    for start, conv in conversations:
        heapq.heappush(events, (start, next(order), ARRIVE, conv, 0, start, None))
    ttfts: list[float] = []
    latencies: list[float] = []
    hit_blocks = total_blocks = 0
    by_label: dict[str, list[int]] = {}
    reasons: dict[str, int] = {}
    while events:
        now, _, what, conv, turn, arrived, ticket = heapq.heappop(events)
        clock.now = now
        if what == ARRIVE:
            features = conv.turns[turn].request
            decision = fleet.choose("m", features)
            ticket = fleet.on_dispatch(decision)
            reasons[decision.reason.value] = reasons.get(decision.reason.value, 0) + 1
            by_label.setdefault(conv.label, [0] * ENGINES)[names.index(decision.engine)] += 1
            engine = engines[decision.engine]
            hit = engine.hit(features.hashes)
            hit_blocks += hit
            total_blocks += features.total_blocks
            engine.count(now, +1)
            uncached_tokens = max(0, features.prompt_bytes - hit * BLOCK_BYTES) / 4
            first = max(now, engine.free_at) + uncached_tokens / PREFILL_TOKENS_PER_S
            engine.free_at = first
            ttfts.append(first - now)
            heapq.heappush(events, (first, next(order), FIRST, conv, turn, arrived, ticket))
        elif what == FIRST:
            assert ticket is not None
            fleet.on_first_token(ticket)
            # Decoding is memory-bound: as fast for one sequence as for a batch of BATCH;
            # beyond, the engine's token throughput is shared.
            slowdown = max(1.0, engines[ticket.engine].in_flight / BATCH)
            end = now + conv.turns[turn].output_tokens * SECONDS_PER_OUTPUT_TOKEN * slowdown
            heapq.heappush(events, (end, next(order), END, conv, turn, arrived, ticket))
        else:
            assert ticket is not None
            fleet.on_end(ticket, Outcome.OK)
            engines[ticket.engine].count(now, -1)
            engines[ticket.engine].hold(conv.turns[turn].answered)  # vLLM caches its answer too
            latencies.append(now - arrived)
            if turn + 1 < len(conv.turns):
                then = now + 2.0 + (turn * 7 + len(conv.turns)) % 6  # the user reads, types
                heapq.heappush(events, (then, next(order), ARRIVE, conv, turn + 1, then, None))
    end = clock.now
    for engine in engines.values():
        engine.count(end, 0)
    snapshots = fleet.snapshot()
    return Result(
        hit_rate=hit_blocks / total_blocks,
        estimated_hit_rate=sum(e.blocks_matched for e in fleet.engines_of("m"))
        / sum(e.blocks_total for e in fleet.engines_of("m")),
        ttft_mean=statistics.fmean(ttfts),
        ttft_p95=p95(ttfts),
        latency_mean=statistics.fmean(latencies),
        latency_p95=p95(latencies),
        requests=[s.dispatched for s in snapshots],
        load=[engines[n].request_seconds / end for n in names],
        by_label=by_label,
        reasons=reasons,
    )


@functools.cache
def multi_turn_workload(seed: int = 7) -> list[tuple[float, Conversation]]:
    """300 conversations starting over two minutes, 4 to 10 turns each, whose user turns carry
    0.4-1.6 KB (pasted text), on 8 system prompts of 0.6-1.8 KB whose popularity is 1/rank."""
    rng = random.Random(seed)
    systems = [text(rng, rng.randrange(600, 1800)) for _ in range(8)]
    weights = [1 / (k + 1) for k in range(len(systems))]
    conversations = []
    for _ in range(300):
        k = rng.choices(range(len(systems)), weights)[0]
        exchanges = [
            (text(rng, rng.randrange(400, 1600)), text(rng, rng.randrange(300, 1200)))
            for _ in range(rng.randrange(4, 11))
        ]
        conv = Conversation.of(f"s{k}", systems[k], exchanges)
        conversations.append((rng.uniform(0, 120), conv))
    return conversations


@functools.cache
def hot_spot_workload(seed: int = 11) -> list[tuple[float, Conversation]]:
    """Single requests, 80% of them on one 3 KB system prompt, the rest on 20 others."""
    rng = random.Random(seed)
    hot = text(rng, 3000)
    others = [text(rng, 3000) for _ in range(20)]
    conversations = []
    for _ in range(1200):
        is_hot = rng.random() < 0.8
        system = hot if is_hot else rng.choice(others)
        exchange = (text(rng, rng.randrange(100, 400)), text(rng, rng.randrange(200, 800)))
        conv = Conversation.of("hot" if is_hot else "other", system, [exchange])
        conversations.append((rng.uniform(0, 100), conv))
    return conversations


POLICIES: dict[str, Callable[[], RoutingPolicy]] = {
    "round_robin": RoundRobin,
    "least_load": LeastLoad,
    "cache_aware": CacheAwareReference,
    "prefix": PrefixAffinity,
}
WORKLOADS = {"multi_turn": multi_turn_workload, "hot_spot": hot_spot_workload}


@functools.cache
def result(workload: str, policy: str) -> Result:
    return simulate(POLICIES[policy](), WORKLOADS[workload]())


def test_prefix_routing_finds_far_more_of_the_cache_than_round_robin_and_stays_balanced():
    prefix, round_robin = result("multi_turn", "prefix"), result("multi_turn", "round_robin")
    assert prefix.hit_rate > 2 * round_robin.hit_rate
    assert prefix.estimated_hit_rate > 2 * round_robin.estimated_hit_rate
    assert prefix.load_spread < 1.5 and prefix.request_spread < 1.5
    assert prefix.ttft_mean < round_robin.ttft_mean / 5
    assert prefix.latency_p95 < round_robin.latency_p95


def test_prefix_routing_is_at_least_as_good_as_vllm_routers_cache_aware():
    prefix, cache_aware = result("multi_turn", "prefix"), result("multi_turn", "cache_aware")
    assert prefix.hit_rate >= cache_aware.hit_rate - 0.01
    assert prefix.ttft_mean <= cache_aware.ttft_mean * 1.05
    assert prefix.latency_mean < cache_aware.latency_mean
    assert prefix.latency_p95 < cache_aware.latency_p95
    assert prefix.load_spread < cache_aware.load_spread


def test_a_hot_prefix_is_spread_over_the_engines_by_the_load_bound():
    prefix, cache_aware = result("hot_spot", "prefix"), result("hot_spot", "cache_aware")
    hot = prefix.by_label["hot"]
    assert min(hot) > 0.1 * sum(hot) and max(hot) < 0.4 * sum(hot)
    assert prefix.reasons["load"] > 0  # the bound sent it elsewhere; ties then spread it
    assert prefix.load_spread < 1.5
    assert prefix.hit_rate >= cache_aware.hit_rate - 0.01
    assert prefix.latency_p95 < cache_aware.latency_p95


if __name__ == "__main__":  # the figures: python -m tests.unit.test_fleet_simulation
    for workload in WORKLOADS:
        print(workload)
        for name in POLICIES:
            print(f"  {name:12} {result(workload, name)}")
            if "hot" in result(workload, name).by_label:
                print(f"  {'':12} hot prefix per engine: {result(workload, name).by_label['hot']}")
