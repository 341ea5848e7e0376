"""The engines behind the gateway, as the use cases see them: which one takes a request (the
fleet's routing, pkg/tide_vllm/domain/fleet), the request run on it with its load counted from
dispatch to end, and the one retry on another engine of the model when the first will not run
it and nothing of its answer has reached the caller (no connection was made, it answered 503,
or the connection was lost before its answer was in: vLLM aborts such a request).

A fleet of one engine is the same path, with nothing to choose: no prefix hashing, and the
engine's own status decides (503 at once while it cannot serve).

Engines may join and leave while requests run (`add`, `remove`: the engines found by
discovery); one that leaves takes no new request, and those it has in flight finish."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import re
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

import orjson

from tide_vllm.domain.chat.entity import (
    ChatError,
    EngineFailed,
    EngineRejected,
    EngineState,
    EngineStatus,
    EngineUnavailable,
    InvalidChatRequest,
    ModelNotFound,
    RelayRequest,
)
from tide_vllm.domain.chat.repository import (
    ChatRepository,
    EngineMonitor,
    RelayAnswer,
    RelayRepository,
)
from tide_vllm.domain.fleet import (
    Decision,
    Engine,
    Fleet,
    NoEngineAvailable,
    Outcome,
    PrefixAffinity,
    Reason,
    RequestFeatures,
    Ticket,
    policy_named,
)
from tide_vllm.domain.fleet.engine import EngineMetrics
from tide_vllm.domain.fleet.kv_events import CacheEvent
from tide_vllm.domain.fleet.prefix import root_key

T = TypeVar("T")
log = logging.getLogger("tide_vllm.routing")

NO_FEATURES = RequestFeatures()
SCRAPE_INTERVAL = 5.0  # seconds between reads of each engine's own metrics
ADAPTERS_INTERVAL = 10.0  # seconds between reads of the engines' models (their LoRA adapters)
WATCH_TICK = 1.0
# How long a request may wait for its token ids (precise mode) before it is routed on its
# text instead: the engine's API server answers in milliseconds unless it is in trouble.
TOKENIZE_TIMEOUT = 2.0

# Where the current request was sent, in order, with why: (engine, reason), two when it was
# retried. The edge sets a list of its own here for each request (its access line names the
# engine); a fleet of one adds nothing, having nothing to choose. A list, not a value, so
# that a choice made in a task of the request's (which runs in a copy of its context) is seen.
ROUTED: contextvars.ContextVar[list[tuple[str, str]] | None] = contextvars.ContextVar(
    "tide_vllm_routed", default=None
)

# A request's routing features, or, in precise mode, how to get them (its token ids are asked
# of an engine first).
Features = RequestFeatures | Callable[[], Awaitable[RequestFeatures]]
# What a request's token ids are asked with: the body of vLLM's POST /tokenize, or the ids
# themselves (a completion's prompt given as token ids).
TokensQuery = Mapping[str, Any] | Sequence[int]

# The keys of a chat request that shape its prompt, as vLLM's /tokenize takes them.
_TEMPLATE_KEYS = (
    "tools",
    "chat_template",
    "chat_template_kwargs",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "mm_processor_kwargs",
)


def chat_tokens_query(payload: Mapping[str, Any]) -> dict[str, Any] | None:
    """What asks an engine for a chat request's prompt tokens (None: it has no messages)."""
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    query: dict[str, Any] = {"messages": messages}
    for key in _TEMPLATE_KEYS:
        if payload.get(key) is not None:
            query[key] = payload[key]
    return query


def prompt_tokens_query(prompt: Any) -> TokensQuery | None:
    """A completion's prompt: its text to tokenize, or its token ids as they are. Of a batch,
    the first prompt stands for all, as in the byte-wise features."""
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, list) and prompt:
        if all(type(t) is int for t in prompt):
            return prompt
        return prompt_tokens_query(prompt[0])
    return None


@dataclass(frozen=True)
class Upstream:
    """One engine: where its requests go and what tells whether it can serve. `probe`: its
    monitor only knows what it was last told by `check()`, which the watcher calls every
    `health_interval` (an external engine seen from a web worker)."""

    name: str
    model: str
    chat: ChatRepository
    relay: RelayRepository
    monitor: EngineMonitor
    base_url: str = ""
    auto_start: bool = False
    probe: bool = False
    health_interval: float = 5.0


class RoutingObserver(Protocol):
    """Told of each dispatch, retry and end, per engine (the metrics)."""

    def dispatched(self, engine: str, reason: str) -> None: ...

    def retried(self, engine: str) -> None: ...

    def ended(self, engine: str, failed: bool) -> None: ...

    def removed(self, engine: str) -> None: ...


class DrainStore(Protocol):
    """Where operators' drains are kept when several processes route (web workers)."""

    def get(self, name: str) -> bool: ...

    def set(self, name: str, draining: bool) -> None: ...


class _Quiet:
    def dispatched(self, engine: str, reason: str) -> None:
        pass

    def retried(self, engine: str) -> None:
        pass

    def ended(self, engine: str, failed: bool) -> None:
        pass

    def removed(self, engine: str) -> None:
        pass


@dataclass(frozen=True)
class EngineView:
    """One engine as operators see it (`GET /admin/engines`, `/health`)."""

    name: str
    model: str
    base_url: str
    auto_start: bool
    state: str  # starting, ready, restarting, failed, draining, unhealthy, disabled, ejected
    state_seconds: float
    detail: str
    healthy: bool
    draining: bool
    breaker: str
    requests_in_flight: int
    tokens_in_flight: int
    waiting: float | None
    kv_cache_usage: float | None
    restarts: int
    dispatched: int
    failures: int
    estimated_hit_rate: float | None  # the gateway's own, from its prefix index
    prefix_cache_hit_rate: float | None  # vLLM's, since the engine started
    # Precise mode (routing.kv_events), else None: the engine's KV-cache event batches read,
    # and the blocks they say it holds in its prefix cache.
    kv_event_batches: int | None = None
    cached_blocks: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FleetHealth:
    """Healthy while every model has a ready engine. `state` and `detail` are the engine's own
    for a fleet of one, as they always were."""

    healthy: bool
    state: str
    detail: str
    engines: list[EngineView]


class _Leaving:
    """An engine removed with requests in flight: set once they have all ended."""

    __slots__ = ("upstream", "requests", "done")

    def __init__(self, upstream: Upstream, requests: int) -> None:
        self.upstream = upstream
        self.requests = requests
        self.done = asyncio.Event()


class _Attempt:
    __slots__ = ("upstream", "ticket", "first_token", "ended")

    def __init__(self, upstream: Upstream, ticket: Ticket) -> None:
        self.upstream = upstream
        self.ticket = ticket
        self.first_token = False
        self.ended = False


def _retriable(exc: ChatError) -> bool:
    """The engine will not run the request to its end, and nothing of its answer reached the
    caller: it could not be reached, it said 503, or the connection was lost before its answer
    was in (vLLM aborts a request whose connection is gone; a killed engine resets the
    connections it had). A timeout is not one: the engine may still be working on it."""
    return isinstance(exc, EngineUnavailable) or (
        isinstance(exc, EngineFailed) and exc.status == 503
    )


def _outcome_of(exc: ChatError) -> Outcome:
    """An answer of the engine's own (a 4xx) or a request refused before it left says nothing
    bad of the engine; anything else is its failure."""
    if isinstance(exc, (EngineRejected, InvalidChatRequest, ModelNotFound)):
        return Outcome.OK
    return Outcome.FAILED


class Engines:
    """Routes the use cases' requests over the engines. Owned by the event loop.

    `discovered`: the models whose engines are found while running, each with where they are
    looked for (for the 503 of a model that has none yet). Such a model is served (not a 404,
    and /health wants a ready engine of it) even while it has no engine, and the fleet is
    never a fleet of one."""

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        *,
        default_model: str,
        policy: str = "prefix",
        observer: RoutingObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        drains: DrainStore | None = None,
        discovered: Mapping[str, str] | None = None,
        kv_events: bool = False,
    ) -> None:
        if not upstreams and not discovered:
            raise ValueError("at least one engine is needed")
        self.upstreams = {u.name: u for u in upstreams}
        self.default_model = default_model
        self.policy = policy
        self.observer: RoutingObserver = observer or _Quiet()
        self.fleet = Fleet(
            (Engine(u.name, u.model) for u in upstreams), policy_named(policy), clock=clock
        )
        self._clock = clock
        self._drains = drains
        self._by_model: dict[str, list[Upstream]] = {}
        for upstream in upstreams:
            self._by_model.setdefault(upstream.model, []).append(upstream)
        self._discovered = dict(discovered or {})
        for model in self._discovered:
            self._by_model.setdefault(model, [])
        # Nothing to choose, for ever: one engine, and none to be found. Once gone, it stays
        # gone (an engine added may leave again, and another come).
        self.single = upstreams[0] if len(upstreams) == 1 and not self._discovered else None
        self._leaving: dict[int, _Leaving] = {}  # by id() of the Upstream removed
        self._hashing = isinstance(self.fleet.policy, PrefixAffinity)
        self.kv_events = kv_events and self._hashing
        self.fleet.precise = self.kv_events
        self.tokenize_failures = 0
        self._tokenize_warned_at = -1e9
        self._tokenizer_turn = 0
        self._block_scrape: asyncio.Task[None] | None = None
        # The LoRA adapters loaded at run time through the gateway, by model: each load's
        # request, sent again to an engine of the model that joins or comes back (restarted,
        # it has lost them).
        self._loaded: dict[str, dict[str, RelayRequest]] = {}
        self._reloads: set[asyncio.Task[None]] = set()
        self._block_scraped_at = -1e9
        self._event_batches: dict[str, int] = {}
        self._metrics: dict[str, EngineMetrics] = {}
        self._states: dict[str, tuple[str, float]] = {}
        self._probed_at: dict[str, float] = {}
        for upstream in upstreams:
            self._sync(upstream)

    # -- what a request is -----------------------------------------------------------------
    def model_of(self, requested: Any) -> str:
        """The served model a request's `model` names: the default one when it names none. An
        unknown name is vLLM's to judge when the fleet serves one model (it may be one of its
        LoRA adapters); among several models, an adapter an engine lists goes to its base
        model, and any other name is a 404, as vLLM's."""
        if not requested or not isinstance(requested, str):
            return self.default_model
        if requested in self._by_model:
            return requested
        if len(self._by_model) == 1:
            return next(iter(self._by_model))
        base = self.fleet.base_of(requested)  # a LoRA adapter an engine lists
        if base is not None:
            return base
        raise ModelNotFound(requested)

    def choosing(self, model: str) -> bool:
        """Whether there is a choice to make for `model`, so its requests' prefixes are worth
        hashing."""
        return len(self._by_model.get(model, ())) > 1

    def features(
        self,
        model: str,
        build: Callable[[], RequestFeatures],
        session_id: str | None = None,
        tokens: TokensQuery | None = None,
        requested: Any = None,
    ) -> Features:
        """What routing reads of the request: nothing when there is nothing to choose; with
        kv_events (precise mode) and a prompt to tokenize (`tokens`), its token ids' blocks,
        asked of an engine when the request is run; else `build()`, its text's blocks.
        `requested`: the model the request named (a LoRA adapter: only the engines that list
        it take the request, when any does, and its blocks are its own)."""
        if not self.choosing(model):
            return NO_FEATURES
        adapter = requested if isinstance(requested, str) and requested != model else None
        if not self._hashing:
            return RequestFeatures(session_id=session_id, adapter=adapter)
        if self.kv_events and tokens is not None:
            return lambda: self._precise(model, tokens, build, session_id, adapter)
        return _naming(build(), adapter)

    async def _precise(
        self,
        model: str,
        tokens: TokensQuery,
        build: Callable[[], RequestFeatures],
        session_id: str | None,
        adapter: str | None,
    ) -> RequestFeatures:
        """The request's token-id blocks; its text's if no engine tells its token ids in time
        (routing then matches what engines were sent, not what they hold)."""
        learning = None
        if not self.fleet.knows_block_tokens(model):
            learning = self._learn_block_tokens()  # read at once, alongside the token ids
        if isinstance(tokens, Mapping):
            upstream = self._tokenizer(model)
            if upstream is None:
                return _naming(build(), adapter)
            query = {**tokens, "model": adapter or model}
            try:
                async with asyncio.timeout(TOKENIZE_TIMEOUT):
                    ids: Sequence[int] = await upstream.chat.tokenize(query)
            except (ChatError, TimeoutError, NotImplementedError) as exc:
                if not (isinstance(exc, EngineRejected) and exc.status in (400, 422)):
                    self._tokenize_failed(upstream.name, exc)
                # (a 400 is the request's own fault: vLLM will say so when it is run)
                return _naming(build(), adapter)
        else:
            ids = tokens
        if learning is not None:  # its failure is the scrape's to log, not the request's
            await asyncio.wait({learning}, timeout=TOKENIZE_TIMEOUT)
        features = RequestFeatures.of_tokens(
            ids, self.fleet.block_tokens(model), session_id=session_id, root=root_key(adapter)
        )
        return _naming(features, adapter)

    def _learn_block_tokens(self) -> asyncio.Task[None]:
        """The engines' metrics read once (their KV block size among them), for the first
        requests routed before the watcher's first read; again at most every scrape interval
        while no engine tells its block size."""
        task = self._block_scrape
        if task is None or (
            task.done() and self._clock() - self._block_scraped_at > SCRAPE_INTERVAL
        ):
            self._block_scraped_at = self._clock()
            task = self._block_scrape = asyncio.get_running_loop().create_task(self.scrape())
            task.add_done_callback(_quietly)
        return task

    def _tokenize_failed(self, engine: str, exc: BaseException) -> None:
        self.tokenize_failures += 1
        now = self._clock()
        if now - self._tokenize_warned_at >= 60:
            self._tokenize_warned_at = now
            log.warning(
                "engine %s gave no token ids (%s): requests are routed on their text's blocks "
                "until an engine does (%d so far)", engine, exc or type(exc).__name__,
                self.tokenize_failures,
            )  # fmt: skip

    def _tokenizer(self, model: str) -> Upstream | None:
        """The engine of the model that can answer now with the fewest requests in flight
        (each in turn among equals): a busy engine's API server shares its CPU with the
        engine, and answers later."""
        ready = [
            u
            for u in self._by_model.get(model, ())
            if u.monitor.current().healthy and not self.fleet.engine(u.name).draining
        ]
        if not ready:
            return None
        self._tokenizer_turn += 1
        n, turn = len(ready), self._tokenizer_turn
        return min(
            enumerate(ready),
            key=lambda iu: (self.fleet.engine(iu[1].name).requests, (iu[0] - turn) % n),
        )[1]

    # -- running requests ------------------------------------------------------------------
    async def call(
        self, model: str, features: Features, work: Callable[[Upstream], Awaitable[T]]
    ) -> T:
        """`work` on the chosen engine; once more on another if the first did not run it."""
        if not isinstance(features, RequestFeatures):
            features = await features()
        attempt = self._select(model, features)
        try:
            return await self._run(attempt, work)
        except ChatError as exc:
            if not _retriable(exc):
                raise
            attempt = self._retry(model, features, attempt, exc)
        return await self._run(attempt, work)

    async def _run(self, attempt: _Attempt, work: Callable[[Upstream], Awaitable[T]]) -> T:
        outcome = Outcome.CANCELLED
        try:
            result = await work(attempt.upstream)
            outcome = Outcome.OK
            return result
        except ChatError as exc:
            outcome = _outcome_of(exc)
            raise
        finally:
            self._end(attempt, outcome)

    async def stream(
        self,
        model: str,
        features: Features,
        open_stream: Callable[[Upstream], AsyncIterator[T]],
    ) -> AsyncIterator[T]:
        """The items of `open_stream` on the chosen engine. Its first item says the engine
        accepted the request (it is empty); then come the events. The request is tried once
        more on another engine of the model when the first refused it (no connection, 503),
        or lost it before its first event: then no token has reached the caller, and vLLM
        aborts a request whose connection is gone, so it runs once. Once an event has gone
        out, nothing is retried."""
        if not isinstance(features, RequestFeatures):
            features = await features()
        attempt = self._select(model, features)
        items = open_stream(attempt.upstream)
        outcome = Outcome.CANCELLED
        retried = False
        try:
            try:
                first = await anext(items)
            except ChatError as exc:
                self._end(attempt, _outcome_of(exc))
                await items.aclose()  # type: ignore[attr-defined]
                if not _retriable(exc):
                    raise
                attempt = self._retry(model, features, attempt, exc)
                retried = True
                items = open_stream(attempt.upstream)
                first = await anext(items)
            yield first
            while True:
                try:
                    item = await anext(items)
                except StopAsyncIteration:
                    break
                except EngineUnavailable as exc:
                    if attempt.first_token or retried:
                        raise
                    self._end(attempt, Outcome.FAILED)
                    await items.aclose()  # type: ignore[attr-defined]
                    attempt = self._retry(model, features, attempt, exc)
                    retried = True
                    items = open_stream(attempt.upstream)
                    await anext(items)  # its acceptance: the caller has had one
                    continue
                if not attempt.first_token and item:
                    attempt.first_token = True
                    self.fleet.on_first_token(attempt.ticket)
                yield item
            outcome = Outcome.OK
        except StopAsyncIteration:
            outcome = Outcome.OK  # nothing at all came: the repository's end
        except ChatError as exc:
            outcome = _outcome_of(exc)
            raise
        finally:
            self._end(attempt, outcome)
            await items.aclose()  # type: ignore[attr-defined]

    async def relay(
        self,
        model: str,
        features: Features,
        request: RelayRequest,
        *,
        creates_response: bool = False,
    ) -> RelayAnswer:
        """The engine's answer to a relayed request, its head in; a 503 answer is replaced by
        another engine's once, when the model has another that can take it. The answer's end
        (read, or closed) ends the engine's ticket. `creates_response`: the request creates
        a response of vLLM's Responses API, whose id the answer tells: the engine is noted as
        the one that stored it."""
        if not isinstance(features, RequestFeatures):
            features = await features()
        attempt = self._select(model, features)
        try:
            answer = await self._open(attempt, request)
        except ChatError as exc:
            if not _retriable(exc):
                raise
            attempt = self._retry(model, features, attempt, exc)
            answer = await self._open(attempt, request)
            return _TrackedAnswer(answer, self, attempt, creates_response)
        if answer.status != 503:
            return _TrackedAnswer(answer, self, attempt, creates_response)
        try:
            retry = self._select(model, features, exclude={attempt.upstream.name})
        except EngineUnavailable:
            # no other engine: vLLM's 503 it is
            return _TrackedAnswer(answer, self, attempt, creates_response)
        await answer.aclose()
        self._end(attempt, Outcome.FAILED)
        self.observer.retried(attempt.upstream.name)
        log.warning(
            "engine %s answered 503; trying engine %s", attempt.upstream.name, retry.upstream.name
        )
        answer = await self._open(retry, request)
        return _TrackedAnswer(answer, self, retry, creates_response)

    async def relay_stored(
        self,
        model: str | None,
        response_id: str,
        request: RelayRequest,
        *,
        creates_response: bool = False,
    ) -> RelayAnswer:
        """The answer to a request about a stored response of vLLM's Responses API (retrieve
        it, cancel it, or continue from it with `previous_response_id`): vLLM keeps a
        response in the memory of the engine that made it, and only that engine knows it.
        It goes to the engine this gateway saw make it; to each other engine (of `model`,
        or of any model) in turn, the least busy first, while they answer 404, not knowing
        it (another worker or gateway made it, or this one restarted since); the engine
        that knows it is then remembered. An engine that cannot be reached is passed over
        the same way; one that is draining is asked too (only it has what it stored). The
        last answer is the caller's."""
        order = self._stored_order(model, response_id)
        for i, name in enumerate(order):
            last = i == len(order) - 1
            engine = self.fleet.engine(name)
            attempt = self._dispatch(Decision(engine.model, name, Reason.STORED, NO_FEATURES))
            try:
                answer = await self._open(attempt, request)
            except ChatError as exc:
                if last or not _retriable(exc):
                    raise
                self.observer.retried(name)
                continue
            if answer.status == 404:
                if not last:
                    await answer.aclose()
                    self._end(attempt, Outcome.OK)  # an answer: it does not know the response
                    continue
            elif answer.status < 500:
                self.fleet.stored(response_id, name)  # it knows it: ask it first next time
            return _TrackedAnswer(answer, self, attempt, creates_response)
        raise AssertionError("unreachable: _stored_order is never empty")

    async def relay_every(
        self, model: str, request: RelayRequest, adapter: tuple[str, bool] | None = None
    ) -> RelayAnswer:
        """The request sent to every engine of `model` that can take it, together, each
        answer read whole: a change every engine must make (a LoRA adapter loaded or
        unloaded at run time). The answer is the first engine's when all succeed, else the
        first failure's (the engines that failed are logged); the engines' lists of
        adapters are read again at once. `adapter`: the request loads (True) or unloads
        (False) the adapter so named; once an engine has done it, engines of the model
        that join or come back later are sent the load again, or no longer."""
        # a draining engine too: resumed, it must serve what the others serve
        upstreams = self._reachable(self._by_model.get(model, []))
        if not upstreams:
            raise EngineUnavailable(self._why_not(model, ()))
        attempts = [
            self._dispatch(Decision(model, u.name, Reason.EVERY, NO_FEATURES)) for u in upstreams
        ]
        results = await asyncio.gather(
            *(self._settle(a, request) for a in attempts), return_exceptions=True
        )
        failed = [
            (a.upstream.name, r)
            for a, r in zip(attempts, results, strict=True)
            if isinstance(r, BaseException) or r.status >= 400
        ]
        if failed:
            log.warning(
                "%s %s failed on engine(s) %s", request.method, request.target,
                ", ".join(name for name, _ in failed),
            )  # fmt: skip
        if adapter is not None and len(failed) < len(attempts):
            name, loading = adapter
            if loading:
                self._loaded.setdefault(model, {})[name] = request
            else:
                self._loaded.get(model, {}).pop(name, None)
        await self.read_adapters()
        first = failed[0][1] if failed else results[0]
        if isinstance(first, BaseException):
            raise first
        return first

    def _reload(self, upstream: Upstream) -> None:
        """Sends the engine, just admitted, the loads of the adapters its model was given at
        run time, in the background."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller): the next admission will do it
        task = loop.create_task(self._reloading(upstream), name=f"reload-{upstream.name}")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _reloading(self, upstream: Upstream) -> None:
        engine = self.fleet.engine(upstream.name)
        loads = list(self._loaded.get(engine.model, {}).items())
        # An engine that was only out of rotation for a while still has them; what it listed
        # before counts for nothing (it may have restarted), should its list not be read.
        engine.adapters = frozenset()
        await self.read_adapters([upstream])
        for name, request in loads:
            if name in engine.adapters:
                continue
            attempt = self._dispatch(Decision(engine.model, upstream.name, Reason.EVERY,
                                              NO_FEATURES))  # fmt: skip
            try:
                answer = await self._settle(attempt, request)
            except ChatError as exc:
                log.warning("engine %s: adapter %s not loaded again: %s", upstream.name, name,
                            exc.message)  # fmt: skip
                continue
            if answer.status < 400:
                log.info("engine %s: adapter %s loaded again", upstream.name, name)
            else:
                detail = (await answer.read())[:200].decode(errors="replace")
                log.warning("engine %s: adapter %s not loaded again: %s %s", upstream.name,
                            name, answer.status, detail)  # fmt: skip
        await self.read_adapters([upstream])

    async def _settle(self, attempt: _Attempt, request: RelayRequest) -> _Settled:
        answer = _TrackedAnswer(await self._open(attempt, request), self, attempt)
        try:
            content = await answer.read()
        except BaseException:  # cancelled too: the ticket ends either way
            await answer.aclose()
            raise
        return _Settled(answer.status, answer.headers, content)

    def _reachable(self, upstreams: Iterable[Upstream]) -> list[Upstream]:
        """Those of `upstreams` that take a request about what they hold (admitted, breaker
        closed, draining or not), each first synced with its monitor."""
        pool = list(upstreams)
        for upstream in pool:
            self._sync(upstream)
        now = self._clock()
        return [u for u in pool if self.fleet.engine(u.name).reachable(now)]

    def _stored_order(self, model: str | None, response_id: str) -> list[str]:
        """The engines to ask for a stored response, in order (never empty: raises
        ModelNotFound or EngineUnavailable)."""
        if model is None:
            upstreams = list(self.upstreams.values())
        else:
            found = self._by_model.get(model)
            if found is None:
                raise ModelNotFound(model)
            upstreams = found
        ready = self._reachable(upstreams)
        if not ready:
            raise EngineUnavailable(
                self._why_not(model, ()) if model is not None
                else "no engine can take the request now"
            )  # fmt: skip
        names = [u.name for u in sorted(ready, key=lambda u: self.fleet.engine(u.name).requests)]
        known = self.fleet.stored_on(response_id)
        if known in names:
            names.remove(known)
            names.insert(0, known)
        return names

    async def _open(self, attempt: _Attempt, request: RelayRequest) -> RelayAnswer:
        """The answer's head; the ticket ends here only if there is none."""
        try:
            return await attempt.upstream.relay.open(request)
        except ChatError as exc:
            self._end(attempt, _outcome_of(exc))
            raise
        except BaseException:
            self._end(attempt, Outcome.CANCELLED)
            raise

    # -- choosing --------------------------------------------------------------------------
    def _sync(self, upstream: Upstream) -> EngineStatus:
        """Admit or eject the engine as its monitor's last word says."""
        status = upstream.monitor.current()
        engine = self.fleet.engine(upstream.name)
        if self._drains is not None:
            engine.draining = self._drains.get(upstream.name)
        if status.healthy != engine.admitted:
            if status.healthy:
                self.fleet.admit(upstream.name)
                if self._loaded.get(engine.model):
                    self._reload(upstream)
            else:
                self.fleet.eject(upstream.name)
                if self.single is None:
                    log.warning("engine %s is out of rotation: %s", upstream.name, status.detail)
        return status

    def _select(
        self, model: str, features: RequestFeatures, exclude: Collection[str] = ()
    ) -> _Attempt:
        upstreams = self._by_model.get(model)
        if upstreams is None:
            raise ModelNotFound(model)
        if not upstreams:
            raise EngineUnavailable(self._why_not(model, exclude))
        for upstream in upstreams:
            self._sync(upstream)
        only = upstreams[0].name if len(upstreams) == 1 else None
        if only is not None and not exclude and self.fleet.engine(only).routable(self._clock()):
            decision = Decision(model, only, Reason.FALLBACK, features)  # nothing to choose
        else:
            try:
                decision = self.fleet.choose(model, features, exclude)
            except NoEngineAvailable:
                decision = self._fallback(model, features, exclude)
        return self._dispatch(decision)

    def _dispatch(self, decision: Decision) -> _Attempt:
        ticket = self.fleet.on_dispatch(decision)
        self.observer.dispatched(decision.engine, decision.reason.value)
        if self.single is None and (routed := ROUTED.get()) is not None:
            routed.append((decision.engine, decision.reason.value))
        return _Attempt(self.upstreams[decision.engine], ticket)

    def _fallback(
        self, model: str, features: RequestFeatures, exclude: Collection[str]
    ) -> Decision:
        """No engine of the model is admitted (none has passed a health check lately, or their
        breakers hold them off). One whose state still lets a request through (an external
        engine not checked yet, a running one failing its checks) takes it, rather than a
        certain 503."""
        candidates = [
            self.upstreams[e.name]
            for e in self.fleet.serving(model, features.adapter)
            if e.name not in exclude
            and not e.draining
            and self.upstreams[e.name].monitor.current().accepts_requests
        ]
        if not candidates:
            raise EngineUnavailable(self._why_not(model, exclude))
        chosen = min(candidates, key=lambda u: self.fleet.engine(u.name).requests)
        return Decision(model, chosen.name, Reason.FALLBACK, features)

    def _why_not(self, model: str, exclude: Collection[str]) -> str:
        if self.single is not None:
            if self.fleet.engine(self.single.name).draining:
                return f"engine {self.single.name} is draining"
            status = self.single.monitor.current()
            return status.detail or f"vLLM is {status.state.value}"
        if not self._by_model[model]:
            return (
                f"no engine of model {model} is known now: none is found at "
                f"{self._discovered.get(model, 'its discovery')} (looked for again every "
                "few seconds)"
            )
        reasons = []
        for upstream in self._by_model[model]:
            if upstream.name in exclude:
                continue
            if self.fleet.engine(upstream.name).draining:
                reasons.append(f"{upstream.name}: draining")
            else:
                status = upstream.monitor.current()
                reasons.append(f"{upstream.name}: {status.detail or status.state.value}")
        return f"no engine of model {model} can take the request now" + (
            f" ({'; '.join(reasons)})" if reasons else ""
        )

    def _retry(
        self, model: str, features: RequestFeatures, failed: _Attempt, exc: ChatError
    ) -> _Attempt:
        try:
            attempt = self._select(model, features, exclude={failed.upstream.name})
        except EngineUnavailable:
            raise exc from None
        self.observer.retried(failed.upstream.name)
        log.warning(
            "engine %s: %s; trying engine %s", failed.upstream.name, exc.message,
            attempt.upstream.name,
        )  # fmt: skip
        return attempt

    def _end(self, attempt: _Attempt, outcome: Outcome) -> None:
        if attempt.ended:
            return
        attempt.ended = True
        self.fleet.on_end(attempt.ticket, outcome)
        self.observer.ended(attempt.upstream.name, outcome is Outcome.FAILED)
        if self._leaving:
            leaving = self._leaving.get(id(attempt.upstream))
            if leaving is not None:
                leaving.requests -= 1
                if leaving.requests <= 0:
                    del self._leaving[id(attempt.upstream)]
                    leaving.done.set()
                    self._gone(attempt.upstream.name)

    # -- engines joining and leaving -------------------------------------------------------
    def add(self, upstream: Upstream) -> None:
        """A new engine: it takes requests once its monitor says it is healthy."""
        if upstream.name in self.upstreams:
            raise ValueError(f"engine {upstream.name!r} is already in the fleet")
        self.fleet.add(Engine(upstream.name, upstream.model))
        self.upstreams[upstream.name] = upstream
        self._by_model.setdefault(upstream.model, []).append(upstream)
        self.single = None
        self._sync(upstream)

    def remove(self, name: str) -> Upstream:
        """Take the engine out: it takes no new request (a retry included); the requests it
        has in flight finish (`drained` says when). Raises UnknownEngine."""
        engine = self.fleet.remove(name)
        upstream = self.upstreams.pop(name)
        peers = self._by_model[upstream.model]
        peers.remove(upstream)
        if not peers and upstream.model not in self._discovered:
            del self._by_model[upstream.model]
        for notes in (self._metrics, self._states, self._probed_at, self._event_batches):
            notes.pop(name, None)
        if self._drains is not None and engine.draining:
            self._drains.set(name, False)  # an engine found again later is a new one
        if engine.requests > 0:
            self._leaving[id(upstream)] = _Leaving(upstream, engine.requests)
        else:
            self._gone(name)
        return upstream

    def _gone(self, name: str) -> None:
        """A removed engine's last request has ended: unless an engine of the same name has
        joined since, its per-engine metrics go."""
        if name not in self.upstreams:
            self.observer.removed(name)

    async def drained(self, upstream: Upstream) -> None:
        """Returns once no request is in flight on `upstream`, an engine removed."""
        leaving = self._leaving.get(id(upstream))
        if leaving is not None:
            await leaving.done.wait()

    # -- models, health, operators ---------------------------------------------------------
    def ensure(self, upstream: Upstream) -> None:
        status = upstream.monitor.current()
        if not status.accepts_requests:
            raise EngineUnavailable(status.detail or f"vLLM is {status.state.value}")

    async def models(self) -> bytes:
        """`GET /v1/models`: a fleet of one relays its engine's list; a fleet lists each model
        once, as the first of its engines that answers lists it."""
        if self.single is not None:
            self.ensure(self.single)
            return await self.single.chat.models()
        serving = [u for u in self.upstreams.values() if u.monitor.current().accepts_requests]
        if not serving:
            raise EngineUnavailable("no engine can serve now")
        answers = await asyncio.gather(*(u.chat.models() for u in serving), return_exceptions=True)
        self._note_adapters(serving, answers)
        seen: set[str] = set()
        data: list[Any] = []
        for item in _listed(answers):
            if item.get("id") not in seen:
                seen.add(item.get("id"))
                data.append(item)
        if not data:
            first = next((a for a in answers if isinstance(a, ChatError)), None)
            raise first or EngineFailed("no engine listed a model")
        return orjson.dumps({"object": "list", "data": data})

    def upstream(self, name: str | None) -> Upstream:
        """The engine called `name` (the first one for None); UnknownEngine if none is."""
        if name is None:
            if not self.upstreams:
                raise EngineUnavailable("no engine is known now")
            return next(iter(self.upstreams.values()))
        self.fleet.engine(name)  # raises UnknownEngine
        return self.upstreams[name]

    async def check(self) -> FleetHealth:
        """A fresh status of every engine, asked at once. A check that raises (an engine
        leaving, its client closed under it) leaves that engine's last status."""
        upstreams = list(self.upstreams.values())
        await asyncio.gather(*(u.monitor.check() for u in upstreams), return_exceptions=True)
        return self.health()

    def health(self) -> FleetHealth:
        views = self.views()
        ready = {model: False for model in self._by_model}
        for view in views:
            ready[view.model] = ready.get(view.model, False) or (view.healthy and not view.draining)
        healthy = all(ready.values())
        if self.single is not None:
            status = self.single.monitor.current()
            state = status.state.value
            detail = "healthy" if healthy else (views[0].detail or state)
            if status.healthy and not healthy:
                detail = f"engine {self.single.name} is draining"
        else:
            state = "ready" if healthy else "degraded"
            missing = [m for m, ok in ready.items() if not ok]
            detail = "healthy" if healthy else f"no ready engine for model {', '.join(missing)}"
        return FleetHealth(healthy, state, detail, views)

    def views(self) -> list[EngineView]:
        now = self._clock()
        snapshots = {s.name: s for s in self.fleet.snapshot()}
        views = []
        for upstream in self.upstreams.values():
            status = self._sync(upstream)
            snap = snapshots[upstream.name]
            state = _state_of(status, snap.draining, snap.breaker)
            since = self._states.get(upstream.name)
            if since is None or since[0] != state:
                since = self._states[upstream.name] = (state, now)
            scraped = self._metrics.get(upstream.name)
            views.append(
                EngineView(
                    name=upstream.name,
                    model=upstream.model,
                    base_url=upstream.base_url,
                    auto_start=upstream.auto_start,
                    state=state,
                    state_seconds=round(now - since[1], 3),
                    detail=status.detail,
                    healthy=status.healthy,
                    draining=snap.draining,
                    breaker=snap.breaker,
                    requests_in_flight=snap.requests,
                    tokens_in_flight=snap.tokens,
                    waiting=snap.waiting,
                    kv_cache_usage=snap.kv_cache_usage,
                    restarts=int(getattr(upstream.monitor, "total_restarts", 0) or 0),
                    dispatched=snap.dispatched,
                    failures=snap.failures,
                    estimated_hit_rate=snap.hit_rate,
                    prefix_cache_hit_rate=scraped.prefix_cache_hit_rate if scraped else None,
                    kv_event_batches=(
                        self._event_batches.get(upstream.name, 0) if self.kv_events else None
                    ),
                    cached_blocks=(
                        self.fleet.mirror.blocks(upstream.name) if self.kv_events else None
                    ),
                )
            )
        return views

    def view(self, name: str) -> EngineView:
        self.fleet.engine(name)  # raises UnknownEngine
        return next(v for v in self.views() if v.name == name)

    def drain(self, name: str) -> EngineView:
        self.fleet.drain(name)
        if self._drains is not None:
            self._drains.set(name, True)
        log.info("engine %s is draining: no new requests", name)
        return self.view(name)

    def resume(self, name: str) -> EngineView:
        self.fleet.resume(name)
        if self._drains is not None:
            self._drains.set(name, False)
        log.info("engine %s takes requests again", name)
        return self.view(name)

    # -- the engines' own account of their caches (precise mode) ---------------------------
    def cache_events(self, name: str, events: Iterable[CacheEvent]) -> None:
        """An engine's KV-cache events, as its publisher sent them."""
        if name in self.upstreams:
            self.fleet.cache_events(name, events)
            self._event_batches[name] = self._event_batches.get(name, 0) + 1

    def cache_restarted(self, name: str) -> None:
        if name in self.upstreams:
            self.fleet.cache_restarted(name)
            log.info("engine %s: its KV-cache events start again (it restarted)", name)

    # -- the watcher -----------------------------------------------------------------------
    async def watch(self, scrape_interval: float = SCRAPE_INTERVAL) -> None:
        """Runs for the app's life: checks the engines only this process can ask (`probe`),
        admits or ejects each as its status changes, and reads each ready engine's own metrics
        every `scrape_interval` (its queue and KV cache, for routing; a failed read leaves
        the last values to go stale)."""
        try:
            await self._watch(scrape_interval)
        finally:  # the app stops: so do a read of the block size begun by a request, and
            # the loads of adapters sent to an engine that came back
            if self._block_scrape is not None:
                self._block_scrape.cancel()
            for task in list(self._reloads):
                task.cancel()

    async def _watch(self, scrape_interval: float) -> None:
        scraped_at = -scrape_interval
        listed_at = -ADAPTERS_INTERVAL
        while True:
            now = self._clock()
            due = [
                u
                for u in self.upstreams.values()
                if u.probe and now - self._probed_at.get(u.name, -1e9) >= u.health_interval
            ]
            for upstream in due:
                self._probed_at[upstream.name] = now
            if due:
                await asyncio.gather(*(u.monitor.check() for u in due), return_exceptions=True)
            self.views()  # admits or ejects, and notes when each engine's state changed
            if self.single is None and now - scraped_at >= scrape_interval:
                scraped_at = now
                await self.scrape()
                if now - listed_at >= ADAPTERS_INTERVAL:
                    listed_at = now
                    await self.read_adapters()
            await asyncio.sleep(WATCH_TICK)

    async def read_adapters(self, upstreams: Iterable[Upstream] | None = None) -> None:
        """Which LoRA adapters each ready engine (of `upstreams`, else of all) lists, loaded
        at its start or since."""
        pool = self.upstreams.values() if upstreams is None else upstreams
        ready = [u for u in pool if u.monitor.current().healthy]
        answers = await asyncio.gather(*(u.chat.models() for u in ready), return_exceptions=True)
        self._note_adapters(ready, answers)

    def _note_adapters(
        self, upstreams: Sequence[Upstream], answers: Sequence[bytes | BaseException]
    ) -> None:
        """Notes the adapters each engine lists in its answer to GET /v1/models: those whose
        `parent` is the engine's model (a failed answer leaves what was known)."""
        for upstream, answer in zip(upstreams, answers, strict=True):
            gone = self.upstreams.get(upstream.name) is not upstream  # removed while read
            if isinstance(answer, BaseException) or gone:
                continue
            engine = self.fleet.engine(upstream.name)
            engine.adapters = frozenset(
                item["id"]
                for item in _listed([answer])
                if isinstance(item.get("id"), str)
                and item.get("parent") == engine.model
                and item["id"] not in self._by_model
            )

    async def scrape(self) -> None:
        ready = [u for u in self.upstreams.values() if u.monitor.current().healthy]
        read = await asyncio.gather(
            *(u.chat.engine_gauges() for u in ready), return_exceptions=True
        )
        for upstream, metrics in zip(ready, read, strict=True):
            if self.upstreams.get(upstream.name) is not upstream:
                continue  # removed while it was read
            if isinstance(metrics, EngineMetrics):
                self._metrics[upstream.name] = metrics
                self.fleet.observe(
                    upstream.name,
                    waiting=metrics.waiting,
                    kv_cache_usage=metrics.kv_cache_usage,
                    cache_tokens=metrics.cache_tokens,
                    block_tokens=metrics.block_tokens,
                )
            elif isinstance(metrics, Exception):
                log.debug("engine %s: metrics not read: %s", upstream.name, metrics)


class _Settled:
    """An answer read whole (RelayAnswer)."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], content: bytes) -> None:
        self.status = status
        self.headers = headers
        self._content = content

    async def _chunks(self) -> AsyncIterator[bytes]:
        yield self._content

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def read(self) -> bytes:
        return self._content

    async def aclose(self) -> None:
        return None


def _naming(features: RequestFeatures, adapter: str | None) -> RequestFeatures:
    return features if adapter is None else dataclasses.replace(features, adapter=adapter)


def _listed(answers: Iterable[bytes | BaseException]) -> Iterator[dict[str, Any]]:
    """The models listed in engines' answers to GET /v1/models (failures and junk skipped)."""
    for answer in answers:
        if isinstance(answer, BaseException):
            continue
        try:
            listed = orjson.loads(answer).get("data")
        except (orjson.JSONDecodeError, AttributeError):
            continue
        for item in listed if isinstance(listed, list) else ():
            if isinstance(item, dict):
                yield item


def _quietly(task: asyncio.Task[Any]) -> None:
    """A background read's end: its error, if any, is logged rather than left unread."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("engines' metrics not read: %s", task.exception())


def _state_of(status: EngineStatus, draining: bool, breaker: str) -> str:
    if draining:
        return "draining"
    if status.healthy:
        return "ready" if breaker == "closed" else "ejected"
    if status.state is EngineState.EXTERNAL:
        return "unhealthy"
    return status.state.value


# A response's id in vLLM's answer creating it: the body's first "id" (the response object's,
# or, streamed, that of the response in the first event). Looked for in the first bytes only.
_RESPONSE_ID = re.compile(rb'"id"\s*:\s*"(resp_[^"\\]{1,200})"')
_ID_HORIZON = 4096


class _TrackedAnswer:
    """A relayed answer whose end ends its engine's ticket: the first chunk is its first token,
    a 5xx or a broken body its failure, a close before the end a cancellation."""

    def __init__(
        self,
        answer: RelayAnswer,
        engines: Engines,
        attempt: _Attempt,
        creates_response: bool = False,
    ) -> None:
        self._answer = answer
        self._engines = engines
        self._attempt = attempt
        self.status = answer.status
        self.headers = answer.headers
        self._done = False
        self._failed = answer.status >= 500
        # The id of the response it creates is looked for in its first bytes (a streamed
        # answer's first event, `response.created`, holds it), if it is a success.
        self._seek_id = creates_response and answer.status == 200
        self._seen = b""

    async def _chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._answer:
                if not self._attempt.first_token and chunk:
                    self._attempt.first_token = True
                    self._engines.fleet.on_first_token(self._attempt.ticket)
                if self._seek_id:
                    self._look_for_id(chunk)
                yield chunk
            self._done = True
        except ChatError:
            self._failed = True
            raise

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def read(self) -> bytes:
        try:
            content = await self._answer.read()
        except ChatError:
            self._failed = True
            await self.aclose()
            raise
        self._done = True
        if self._seek_id:
            self._look_for_id(content)
        await self.aclose()
        return content

    def _look_for_id(self, chunk: bytes) -> None:
        self._seen += chunk[: _ID_HORIZON - len(self._seen)]
        found = _RESPONSE_ID.search(self._seen)
        if found is not None:
            response_id = found.group(1).decode()
            self._engines.fleet.stored(response_id, self._attempt.upstream.name)
            self._seek_id = False
        elif len(self._seen) >= _ID_HORIZON:
            self._seek_id = False
        if not self._seek_id:
            self._seen = b""

    async def aclose(self) -> None:
        try:
            await self._answer.aclose()
        finally:
            outcome = (
                Outcome.FAILED
                if self._failed
                else (Outcome.OK if self._done else Outcome.CANCELLED)
            )
            self._engines._end(self._attempt, outcome)
