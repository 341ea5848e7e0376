"""One engine of the fleet: what it serves, whether it may take requests, and how loaded it is."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """`failures` failures within `window` seconds open the breaker for `cooldown` seconds; each
    time it opens again without having closed, the cool-down doubles, up to `max_cooldown`."""

    failures: int = 3
    window: float = 60.0
    cooldown: float = 5.0
    max_cooldown: float = 60.0

    def __post_init__(self) -> None:
        if self.failures < 1:
            raise ValueError("failures must be at least 1")
        if not 0 < self.cooldown <= self.max_cooldown:
            raise ValueError("cooldown must be positive and at most max_cooldown")


class CircuitBreaker:
    """Keeps a failing engine out of rotation, then lets a single trial through.

    Closed: requests flow; failures are counted within a sliding window (health checks that
    pass do not clear them, so an engine that flaps still opens the breaker; a request that
    succeeds does). Open: nothing goes through until the cool-down ends. Half-open: one trial,
    a request or a health check; its success closes the breaker and resets the cool-down, its
    failure opens it again for twice as long."""

    def __init__(self, settings: BreakerSettings | None = None) -> None:
        self.settings = settings or BreakerSettings()
        self._state = BreakerState.CLOSED
        self._failures: deque[float] = deque()
        self._open_until = 0.0
        self._next_cooldown = self.settings.cooldown
        self._trial_out = False

    def state(self, now: float) -> BreakerState:
        if self._state is BreakerState.OPEN and now >= self._open_until:
            self._state = BreakerState.HALF_OPEN
            self._trial_out = False
        return self._state

    def cooldown_left(self, now: float) -> float | None:
        """Seconds until it half-opens, while it is open."""
        if self.state(now) is BreakerState.OPEN:
            return self._open_until - now
        return None

    def allows(self, now: float) -> bool:
        state = self.state(now)
        return state is BreakerState.CLOSED or (
            state is BreakerState.HALF_OPEN and not self._trial_out
        )

    def begin_request(self, now: float) -> bool:
        """A request is dispatched; True when it is the half-open trial."""
        if self.state(now) is BreakerState.HALF_OPEN and not self._trial_out:
            self._trial_out = True
            return True
        return False

    def succeeded(self, now: float) -> None:
        state = self.state(now)
        if state is BreakerState.HALF_OPEN:
            self._state = BreakerState.CLOSED
            self._next_cooldown = self.settings.cooldown
        if state is not BreakerState.OPEN:  # a late answer from before it opened proves little
            self._failures.clear()

    def trial_abandoned(self) -> None:
        """The trial ended without telling anything (the caller left): let another through."""
        self._trial_out = False

    def failed(self, now: float) -> None:
        state = self.state(now)
        if state is BreakerState.HALF_OPEN:
            self._open(now)
        elif state is BreakerState.CLOSED:
            failures = self._failures
            failures.append(now)
            while failures and failures[0] <= now - self.settings.window:
                failures.popleft()
            if len(failures) >= self.settings.failures:
                self._open(now)

    def _open(self, now: float) -> None:
        self._state = BreakerState.OPEN
        self._open_until = now + self._next_cooldown
        self._next_cooldown = min(self._next_cooldown * 2, self.settings.max_cooldown)
        self._failures.clear()
        self._trial_out = False


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    """What an engine's own metrics say, as scraped: requests waiting in its queue, the share of
    its KV cache in use (0 to 1), the cache's size in tokens and its blocks' when known, and its
    prefix cache's counters since it started (None when it does not report them)."""

    waiting: float
    kv_cache_usage: float
    cache_tokens: int | None = None
    block_tokens: int | None = None
    prefix_cache_hits: float | None = None
    prefix_cache_queries: float | None = None

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        if not self.prefix_cache_queries or self.prefix_cache_hits is None:
            return None
        return self.prefix_cache_hits / self.prefix_cache_queries


@dataclass(frozen=True, slots=True)
class Gauges:
    """vLLM's gauges as last scraped from the engine's /metrics, and when."""

    waiting: float
    kv_cache_usage: float
    read_at: float


@dataclass(frozen=True, slots=True)
class Load:
    """An engine's load as routing sees it: this gateway's requests in flight, the prompt tokens
    of those still before their first token (prefill work queued), and vLLM's own count of
    waiting requests when fresh (it also sees traffic from elsewhere)."""

    requests: int = 0
    tokens: int = 0
    waiting: float = 0.0

    @property
    def key(self) -> tuple[int, int, float]:
        """The least-load order: requests, then tokens, then waiting."""
        return (self.requests, self.tokens, self.waiting)

    @property
    def pressure(self) -> float:
        """What the load bound compares: the requests in flight and those queued in vLLM. A
        request of this gateway that waits in vLLM counts twice, which is right: the engine
        is full."""
        return self.requests + self.waiting


class Engine:
    """A vLLM engine serving one model, and its live state.

    It takes new requests when it is admitted (its health checks pass), not draining, and its
    circuit breaker lets them through. A new engine is ejected until its first health check
    passes."""

    def __init__(
        self,
        name: str,
        model: str,
        *,
        admitted: bool = False,
        breaker: BreakerSettings | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.admitted = admitted
        self.draining = False
        self.breaker = CircuitBreaker(breaker)
        self.gauges: Gauges | None = None
        self.requests = 0
        self.prefilling = 0
        self.tokens = 0
        self.dispatched = 0
        self.failures = 0
        self.blocks_total = 0
        self.blocks_matched = 0
        self.adapters: frozenset[str] = frozenset()  # the LoRA adapters it lists, by name

    def __repr__(self) -> str:
        return f"Engine({self.name!r}, {self.model!r})"

    def routable(self, now: float) -> bool:
        return self.admitted and not self.draining and self.breaker.allows(now)

    def reachable(self, now: float) -> bool:
        """Whether it takes a request about what it alone holds (a stored response), which a
        drain does not stop."""
        return self.admitted and self.breaker.allows(now)

    def state(self, now: float) -> str:
        """One word for operators: ejected, open, half_open, draining or admitted."""
        if not self.admitted:
            return "ejected"
        breaker = self.breaker.state(now)
        if breaker is not BreakerState.CLOSED:
            return str(breaker.value)
        return "draining" if self.draining else "admitted"

    def fresh_gauges(self, now: float, max_age: float) -> Gauges | None:
        gauges = self.gauges
        return gauges if gauges is not None and now - gauges.read_at <= max_age else None

    def load(self, now: float, max_age: float) -> Load:
        gauges = self.fresh_gauges(now, max_age)
        return Load(self.requests, self.tokens, gauges.waiting if gauges else 0.0)

    @property
    def hit_rate(self) -> float | None:
        """Estimated share of its requests' prompt blocks it already held when they arrived."""
        return self.blocks_matched / self.blocks_total if self.blocks_total else None

    def started(self, prefill_tokens: int, matched_blocks: int, total_blocks: int) -> None:
        self.requests += 1
        self.prefilling += 1
        self.tokens += prefill_tokens
        self.dispatched += 1
        self.blocks_matched += matched_blocks
        self.blocks_total += total_blocks

    def first_token(self, prefill_tokens: int) -> None:
        self.prefilling = max(0, self.prefilling - 1)
        self.tokens = max(0, self.tokens - prefill_tokens)

    def ended(self, *, failed: bool) -> None:
        self.requests = max(0, self.requests - 1)
        if failed:
            self.failures += 1
