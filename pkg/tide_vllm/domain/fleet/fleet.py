"""The fleet: every engine by model, which one takes each request, and what happened to it.

The gateway's calls, in a request's life:

    decision = fleet.choose(model, RequestFeatures.of_chat(messages, session_id=...))
    ticket = fleet.on_dispatch(decision)       # just before the request is sent
    fleet.on_first_token(ticket)               # when the first token (or the answer) is in
    fleet.on_end(ticket, Outcome.OK)           # once, however it ended

and, for the one retry elsewhere, `fleet.choose(model, features, exclude={decision.engine})`.
Health checks call `admit`/`eject`, the metrics scraper `observe`, operators `drain`/`resume`.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from enum import Enum

from .engine import BreakerState, Engine, Gauges
from .kv_events import CacheEvent, CacheMirror
from .policy import Candidate, PrefixAffinity, Query, Reason, RoutingPolicy
from .prefix import (
    BLOCK_BYTES,
    BYTES_PER_TOKEN,
    DEFAULT_BLOCK_TOKENS,
    PrefixIndex,
    RequestFeatures,
)


class FleetError(Exception):
    """Base of the fleet's errors."""


class UnknownModel(FleetError):
    """No engine of the fleet serves this model (the edge answers 404)."""

    def __init__(self, model: str) -> None:
        super().__init__(f"no engine serves model {model!r}")
        self.model = model


class UnknownEngine(FleetError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no engine named {name!r}")
        self.name = name


class NoEngineAvailable(FleetError):
    """The model's engines are all ejected, draining, open or excluded (the edge answers 503)."""

    def __init__(self, model: str) -> None:
        super().__init__(f"no engine of model {model!r} can take a request now")
        self.model = model


class Outcome(str, Enum):
    OK = "ok"  # the engine answered, whatever it said (a 4xx of its own is an answer)
    FAILED = "failed"  # the engine failed: no connection, a 5xx, a timeout, a broken stream
    CANCELLED = "cancelled"  # the caller left first: says nothing of the engine


@dataclass(frozen=True, slots=True)
class Decision:
    model: str
    engine: str
    reason: Reason
    request: RequestFeatures
    matched_blocks: int = 0

    @property
    def match_ratio(self) -> float:
        total = self.request.total_blocks
        return self.matched_blocks / total if total else 0.0


@dataclass(frozen=True, slots=True)
class Ticket:
    """A dispatched request, handed back at its first token and at its end."""

    id: int
    engine: str
    prefill_tokens: int
    trial: bool = False  # it is the half-open breaker's one trial


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """One engine as `/admin/engines` shows it."""

    name: str
    model: str
    state: str  # admitted, draining, ejected, open, half_open
    admitted: bool
    draining: bool
    breaker: str
    cooldown_left: float | None  # seconds until the open breaker lets a trial through
    requests: int
    prefilling: int
    tokens: int
    waiting: float | None  # None when the last scrape is missing or stale
    kv_cache_usage: float | None
    gauges_age: float | None
    dispatched: int
    failures: int
    hit_rate: float | None


class _Sessions:
    """Session id -> engine, the most recent `capacity` sessions."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._engines: OrderedDict[str, str] = OrderedDict()

    def get(self, session: str) -> str | None:
        return self._engines.get(session)

    def bind(self, session: str, engine: str) -> None:
        self._engines[session] = engine
        self._engines.move_to_end(session)
        if len(self._engines) > self.capacity:
            self._engines.popitem(last=False)


class Fleet:
    """The gateway's router over its engines. Not thread-safe: the event loop owns it."""

    def __init__(
        self,
        engines: Iterable[Engine] = (),
        policy: RoutingPolicy | None = None,
        *,
        index: PrefixIndex | None = None,
        clock: Callable[[], float] = time.monotonic,
        gauge_max_age: float = 15.0,
        sessions: int = 65_536,
    ) -> None:
        """`gauge_max_age`: scraped gauges older than this are ignored (3 scrape intervals)."""
        self.policy: RoutingPolicy = policy or PrefixAffinity()
        self.index = index or PrefixIndex()  # what each engine was sent
        # What each engine's own KV-cache events say it holds (precise mode): a block it
        # evicted leaves this index, not the other, which still says where a prefix was sent
        # last, and so where to send it again when no engine holds it any more.
        self.cached = PrefixIndex()
        self.mirror = CacheMirror(self.cached)
        self._block_tokens: dict[str, int] = {}  # model -> its engines' KV block size
        # Precise mode: the index is keyed by the engines' own blocks (of block_tokens tokens),
        # not by 64-byte blocks of text; each engine's table is sized accordingly.
        self.precise = False
        self.gauge_max_age = gauge_max_age
        self._clock = clock
        self._engines: dict[str, Engine] = {}
        self._by_model: dict[str, list[Engine]] = {}
        self._sessions = _Sessions(sessions)
        self._stored = _Sessions(sessions)  # response id -> the engine that stored it
        self._flights: dict[int, Ticket] = {}
        self._prefilling: set[int] = set()
        self._ids = itertools.count(1)
        for engine in engines:
            self.add(engine)

    # -- the engines

    def add(self, engine: Engine) -> None:
        if engine.name in self._engines:
            raise ValueError(f"engine {engine.name!r} is already in the fleet")
        self._engines[engine.name] = engine
        self._by_model.setdefault(engine.model, []).append(engine)

    def remove(self, name: str) -> Engine:
        """Take an engine out of the fleet; the tickets it has out are ended quietly (forgotten
        now, so that they cannot end on an engine added later under the same name)."""
        engine = self.engine(name)
        del self._engines[name]
        for ticket in [t for t in self._flights.values() if t.engine == name]:
            del self._flights[ticket.id]
            self._prefilling.discard(ticket.id)
        peers = self._by_model[engine.model]
        peers.remove(engine)
        if not peers:
            del self._by_model[engine.model]
        self._forget(engine)
        return engine

    def engine(self, name: str) -> Engine:
        try:
            return self._engines[name]
        except KeyError:
            raise UnknownEngine(name) from None

    def models(self) -> list[str]:
        return list(self._by_model)

    def engines_of(self, model: str) -> list[Engine]:
        try:
            return list(self._by_model[model])
        except KeyError:
            raise UnknownModel(model) from None

    # -- routing

    def choose(
        self, model: str, request: RequestFeatures, exclude: Collection[str] = frozenset()
    ) -> Decision:
        """The engine of `model` that should take the request, among those admitted, not
        draining, not held off by their breaker, and not in `exclude` (and, for a request
        naming a LoRA adapter that some engines list, among those). Raises UnknownModel
        or NoEngineAvailable. Call `on_dispatch` right after, with no await in between, so
        that two requests cannot both take a half-open engine's one trial."""
        now = self._clock()
        peers = self.serving(model, request.adapter)
        engines = [e for e in peers if e.name not in exclude and e.routable(now)]
        if not engines:
            raise NoEngineAvailable(model)
        sent = self.index.match(model, request.hashes)
        cached = self.cached.match(model, request.hashes) if self.precise else {}
        candidates = tuple(
            Candidate(
                e.name,
                e.load(now, self.gauge_max_age),
                max(sent.get(e.name, 0), cached.get(e.name, 0)),
                cached.get(e.name, 0),
            )
            for e in engines
        )
        sticky = self._sessions.get(request.session_id) if request.session_id else None
        choice = self.policy.choose(Query(model, candidates, request.total_blocks, sticky))
        held = (cached if self.precise else sent).get(choice.engine, 0)
        return Decision(model, choice.engine, choice.reason, request, held)

    def serving(self, model: str, adapter: str | None = None) -> list[Engine]:
        """The engines of `model` that may take a request naming `adapter` (a LoRA adapter):
        those that list it, an engine without it answering 404; all of them when none lists
        it (vLLM is then the judge) or no adapter is named. Raises UnknownModel."""
        peers = self.engines_of(model)
        if adapter is None:
            return peers
        listing = [e for e in peers if adapter in e.adapters]
        return listing or peers

    def base_of(self, adapter: str) -> str | None:
        """The model of an engine that lists `adapter` (a LoRA adapter's base model)."""
        return next((e.model for e in self._engines.values() if adapter in e.adapters), None)

    def stored_on(self, response_id: str) -> str | None:
        """The engine that answered the request creating `response_id` (vLLM's Responses
        API), if this gateway saw it among the most recent."""
        return self._stored.get(response_id)

    def stored(self, response_id: str, engine: str) -> None:
        self._stored.bind(response_id, engine)

    def on_dispatch(self, decision: Decision, prompt_tokens: int | None = None) -> Ticket:
        """The request is being sent to the decided engine. `prompt_tokens`, when the gateway
        knows it better, replaces the estimate from the prompt's size."""
        engine = self.engine(decision.engine)
        request = decision.request
        tokens = request.estimated_tokens if prompt_tokens is None else prompt_tokens
        prefill = max(0, tokens - request.tokens_in(decision.matched_blocks))
        ticket = Ticket(
            next(self._ids), engine.name, prefill, engine.breaker.begin_request(self._clock())
        )
        engine.started(prefill, decision.matched_blocks, request.total_blocks)
        self._flights[ticket.id] = ticket
        self._prefilling.add(ticket.id)
        self.index.record(decision.model, request.hashes, engine.name)
        if request.session_id:
            self._sessions.bind(request.session_id, engine.name)
        return ticket

    def on_first_token(self, ticket: Ticket) -> None:
        if ticket.id in self._prefilling:
            self._prefilling.discard(ticket.id)
            engine = self._engines.get(ticket.engine)
            if engine is not None:
                engine.first_token(ticket.prefill_tokens)

    def on_end(self, ticket: Ticket, outcome: Outcome) -> None:
        """Once per ticket; a second call is ignored."""
        if self._flights.pop(ticket.id, None) is None:
            return
        self.on_first_token(ticket)
        engine = self._engines.get(ticket.engine)
        if engine is None:
            return
        engine.ended(failed=outcome is Outcome.FAILED)
        now = self._clock()
        if outcome is Outcome.OK:
            engine.breaker.succeeded(now)
        elif outcome is Outcome.FAILED:
            engine.breaker.failed(now)
        elif ticket.trial:
            engine.breaker.trial_abandoned()

    # -- health, metrics and operators

    def observe(
        self,
        name: str,
        *,
        waiting: float,
        kv_cache_usage: float,
        cache_tokens: int | None = None,
        block_tokens: int | None = None,
    ) -> None:
        """The engine's vLLM gauges, just scraped: `vllm:num_requests_waiting`,
        `vllm:kv_cache_usage_perc` and, when known, the size of its KV cache in tokens
        (`vllm:cache_config_info`'s num_gpu_blocks x block_size), which bounds what the index
        believes it holds, and of its blocks."""
        engine = self.engine(name)
        engine.gauges = Gauges(waiting, kv_cache_usage, self._clock())
        if block_tokens:
            self._block_tokens.setdefault(engine.model, block_tokens)
        if cache_tokens is not None:
            if self.precise:
                blocks = cache_tokens // self.block_tokens(engine.model)
            else:
                blocks = cache_tokens * BYTES_PER_TOKEN // BLOCK_BYTES
            self.index.resize(engine.model, name, blocks)

    def cache_events(self, name: str, events: Iterable[CacheEvent]) -> None:
        """The engine's own account of its prefix cache (vLLM's KV-cache events), applied to
        the index. Raises UnknownEngine."""
        engine = self.engine(name)
        self.mirror.apply(name, engine.model, events)
        size = self.mirror.block_tokens.get(name)
        if size is not None:
            self._block_tokens.setdefault(engine.model, size)

    def cache_restarted(self, name: str) -> None:
        """The engine's events start again from nothing (it restarted): so does its cache."""
        self._forget(self.engine(name))

    def block_tokens(self, model: str) -> int:
        """The size, in tokens, of the KV blocks of `model`'s engines (from their metrics or
        events; vLLM's default until one said)."""
        return self._block_tokens.get(model, DEFAULT_BLOCK_TOKENS)

    def knows_block_tokens(self, model: str) -> bool:
        return model in self._block_tokens

    def admit(self, name: str) -> None:
        """The engine passed a health check. If its breaker is half-open, this was the trial
        and it closes; while the breaker is open, the engine still waits out its cool-down."""
        engine = self.engine(name)
        engine.admitted = True
        now = self._clock()
        if engine.breaker.state(now) is BreakerState.HALF_OPEN:
            engine.breaker.succeeded(now)

    def eject(self, name: str) -> None:
        """The engine failed a health check: it takes nothing more until one passes. What the
        index knew of its cache is dropped, since an engine that comes back has likely
        restarted with an empty cache."""
        engine = self.engine(name)
        engine.breaker.failed(self._clock())
        if engine.admitted:
            engine.admitted = False
            self._forget(engine)

    def _forget(self, engine: Engine) -> None:
        """Whatever the engine was thought to hold: it restarted, or left."""
        self.index.forget(engine.model, engine.name)
        self.cached.forget(engine.model, engine.name)
        self.mirror.forget(engine.name)

    def drain(self, name: str) -> None:
        """No new requests; those in flight finish."""
        self.engine(name).draining = True

    def resume(self, name: str) -> None:
        self.engine(name).draining = False

    def snapshot(self) -> list[EngineSnapshot]:
        now = self._clock()
        snapshots = []
        for e in self._engines.values():
            gauges = e.fresh_gauges(now, self.gauge_max_age)
            snapshots.append(
                EngineSnapshot(
                    name=e.name,
                    model=e.model,
                    state=e.state(now),
                    admitted=e.admitted,
                    draining=e.draining,
                    breaker=e.breaker.state(now).value,
                    cooldown_left=e.breaker.cooldown_left(now),
                    requests=e.requests,
                    prefilling=e.prefilling,
                    tokens=e.tokens,
                    waiting=gauges.waiting if gauges else None,
                    kv_cache_usage=gauges.kv_cache_usage if gauges else None,
                    gauges_age=now - e.gauges.read_at if e.gauges else None,
                    dispatched=e.dispatched,
                    failures=e.failures,
                    hit_rate=e.hit_rate,
                )
            )
        return snapshots
