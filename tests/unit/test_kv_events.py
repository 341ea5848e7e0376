"""Routing's precise mode: the engines' own account of their prefix caches (vLLM's KV-cache
events) mirrored in the prefix index, read off vLLM's ZeroMQ publisher, and matched against
each request's token ids, asked of an engine before the request is routed."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
import pytest
import zmq

from tests.helpers import SettableMonitor
from tide_vllm.application import engines as engines_module
from tide_vllm.application.engines import (
    NO_FEATURES,
    Engines,
    Upstream,
    chat_tokens_query,
    prompt_tokens_query,
)
from tide_vllm.domain.chat.entity import EngineFailed, EngineRejected, EngineState, EngineStatus
from tide_vllm.domain.fleet import Engine, Fleet, Reason, RequestFeatures, UnknownEngine
from tide_vllm.domain.fleet.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    CacheEvent,
    CacheMirror,
)
from tide_vllm.domain.fleet.prefix import (
    DEFAULT_BLOCK_TOKENS,
    PrefixIndex,
    root_key,
    token_block_hashes,
)
from tide_vllm.infrastructure.vllm.kv_events import KVEventsReader, KVEventsReaders, decode_batch

SIZE = 4  # tokens a block, in the domain's tests
PROMPT = tuple(range(100, 112))  # three whole blocks of SIZE
TAIL = (900, 901, 902, 903)  # a fourth block, after PROMPT


def blocks(tokens: Sequence[int], size: int = SIZE) -> int:
    return len(tokens) // size


def stored(
    tokens: Sequence[int],
    *,
    names: Sequence[Any] | None = None,
    parent: Any = None,
    size: int = SIZE,
    lora_name: str | None = None,
    extra_keys: tuple[Any, ...] | None = None,
) -> BlockStored:
    """The event of an engine that stored `tokens`' blocks; vLLM's names for them are made up
    (v<first token>) unless given."""
    if names is None:
        names = [f"v{tokens[i]}".encode() for i in range(0, len(tokens), size)]
    return BlockStored(tuple(names), parent, tuple(tokens), size, lora_name, extra_keys)


def request(tokens: Sequence[int], lora: str | None = None) -> RequestFeatures:
    return RequestFeatures.of_tokens(tokens, SIZE, root=root_key(lora))


def two_engines() -> Fleet:
    fleet = Fleet([Engine("a", "m", admitted=True), Engine("b", "m", admitted=True)])
    fleet.precise = True
    return fleet


def matched(fleet: Fleet, tokens: Sequence[int], lora: str | None = None) -> dict[str, int]:
    """The leading blocks each engine holds, as its own events say."""
    return fleet.cached.match("m", request(tokens, lora).hashes)


# -- the names of a request's blocks


def test_a_longer_prompts_blocks_start_with_a_shorter_prompts():
    short = token_block_hashes(PROMPT, SIZE)
    longer = token_block_hashes(PROMPT + TAIL, SIZE)
    assert len(short) == 3 and len(longer) == 4
    assert longer[:3] == short
    other = token_block_hashes((0,) + PROMPT[1:], SIZE)
    assert all(a != b for a, b in zip(other, short, strict=True))  # a block names its prefix


def test_the_tail_short_of_a_block_is_left_out():
    assert token_block_hashes(PROMPT + (1, 2, 3), SIZE) == token_block_hashes(PROMPT, SIZE)
    assert token_block_hashes(PROMPT[:3], SIZE) == ()


def test_an_adapters_blocks_have_names_of_their_own():
    plain = token_block_hashes(PROMPT, SIZE)
    adapted = token_block_hashes(PROMPT, SIZE, root_key("adapter"))
    assert root_key() == 0 and root_key("adapter") != 0
    assert set(adapted).isdisjoint(plain)
    assert adapted != token_block_hashes(PROMPT, SIZE, root_key("other"))


def test_a_requests_token_features_are_sized_as_its_tokens():
    features = RequestFeatures.of_tokens(PROMPT + (1,), SIZE, session_id="s")
    assert features.total_blocks == 3 and features.session_id == "s"
    assert features.estimated_tokens == len(PROMPT) + 1
    assert features.tokens_in(2) == 2 * SIZE


# -- the mirror, through the fleet


def test_an_engine_that_stored_a_prompts_blocks_takes_it():
    fleet = two_engines()
    fleet.cache_events("b", [stored(PROMPT)])
    decision = fleet.choose("m", request(PROMPT))
    assert (decision.engine, decision.reason, decision.matched_blocks) == ("b", Reason.AFFINITY, 3)
    assert fleet.mirror.blocks("b") == 3 and fleet.mirror.blocks("a") == 0


def test_a_child_event_chained_by_its_parents_vllm_hash_extends_the_match():
    fleet = two_engines()
    fleet.cache_events("b", [stored(PROMPT, names=[1, 2, 3])])
    fleet.cache_events("b", [stored(TAIL, names=[4], parent=3)])
    decision = fleet.choose("m", request(PROMPT + TAIL))
    assert (decision.engine, decision.matched_blocks) == ("b", 4)
    assert decision.match_ratio == 1.0


def test_a_removed_block_is_no_longer_matched_and_only_on_its_engine():
    fleet = two_engines()
    fleet.cache_events("a", [stored(PROMPT, names=[1, 2, 3])])
    fleet.cache_events("b", [stored(PROMPT, names=[1, 2, 3])])
    assert matched(fleet, PROMPT) == {"a": 3, "b": 3}
    fleet.cache_events("b", [BlockRemoved((3,))])
    assert matched(fleet, PROMPT) == {"a": 3, "b": 2}
    fleet.cache_events("b", [BlockRemoved((1, 2))])
    assert matched(fleet, PROMPT) == {"a": 3}
    assert fleet.mirror.blocks("a") == 3 and fleet.mirror.blocks("b") == 0
    fleet.cache_events("b", [BlockRemoved((77,))])  # never stored: nothing happens
    assert matched(fleet, PROMPT) == {"a": 3}


def test_all_blocks_cleared_clears_the_engines_blocks():
    fleet = two_engines()
    fleet.cache_events("a", [stored(PROMPT)])
    fleet.cache_events("b", [stored(PROMPT)])
    fleet.cache_events("b", [AllBlocksCleared()])
    assert matched(fleet, PROMPT) == {"a": 3}
    assert fleet.mirror.blocks("b") == 0


def test_a_stored_event_whose_parent_is_unknown_is_left_out_and_counted():
    fleet = two_engines()
    fleet.cache_events("b", [stored(TAIL + TAIL, parent=b"lost")])
    assert matched(fleet, TAIL + TAIL) == {}
    assert fleet.mirror.unnamed == 2 and fleet.mirror.blocks("b") == 0
    assert fleet.choose("m", request(TAIL + TAIL)).reason is Reason.FALLBACK


def test_an_event_whose_tokens_are_not_its_blocks_is_ignored():
    fleet = two_engines()
    fleet.cache_events("b", [BlockStored((1, 2), None, PROMPT[:7], SIZE)])  # 7 tokens, 2 blocks
    fleet.cache_events("b", [BlockStored((1,), None, (), 0)])
    assert fleet.mirror.blocks("b") == 0 and len(fleet.index) == 0
    assert fleet.block_tokens("m") == DEFAULT_BLOCK_TOKENS  # nor is its size learnt


def test_an_adapters_blocks_match_requests_of_that_adapter_only():
    fleet = two_engines()
    fleet.cache_events("b", [stored(PROMPT, lora_name="adapter")])
    assert matched(fleet, PROMPT) == {}
    assert matched(fleet, PROMPT, lora="other") == {}
    assert matched(fleet, PROMPT, lora="adapter") == {"b": 3}


def test_blocks_with_extra_keys_do_not_match_a_plain_request():
    fleet = two_engines()
    fleet.cache_events("b", [stored(PROMPT, extra_keys=("salt", None, None))])
    fleet.cache_events("a", [stored(PROMPT, extra_keys=(None, None, ["image", 0]))])  # a list
    assert matched(fleet, PROMPT) == {"a": 2}
    assert fleet.mirror.blocks("a") == 3 and fleet.mirror.blocks("b") == 3


def test_the_block_size_is_learnt_from_the_events():
    fleet = two_engines()
    assert fleet.block_tokens("m") == DEFAULT_BLOCK_TOKENS
    fleet.cache_events("a", [stored(PROMPT)])
    assert fleet.block_tokens("m") == SIZE
    assert fleet.mirror.block_tokens == {"a": SIZE}


def test_the_block_size_is_learnt_from_the_metrics_too():
    fleet = two_engines()
    fleet.observe("a", waiting=0, kv_cache_usage=0.1, block_tokens=128)
    assert fleet.block_tokens("m") == 128
    fleet.cache_events("b", [stored(PROMPT)])  # the first said stays
    assert fleet.block_tokens("m") == 128


def test_a_restarted_engine_forgets_its_blocks():
    fleet = two_engines()
    fleet.cache_events("a", [stored(PROMPT, names=[1, 2, 3])])
    fleet.cache_events("b", [stored(PROMPT, names=[1, 2, 3])])
    fleet.cache_restarted("b")
    assert fleet.mirror.blocks("b") == 0 and matched(fleet, PROMPT) == {"a": 3}
    fleet.cache_events("b", [stored(TAIL, names=[4], parent=3)])  # its old parent is gone
    assert fleet.mirror.blocks("b") == 0 and fleet.mirror.unnamed == 1


def test_an_ejected_or_removed_engine_forgets_its_blocks():
    fleet = two_engines()
    fleet.cache_events("a", [stored(PROMPT)])
    fleet.cache_events("b", [stored(PROMPT)])
    fleet.eject("b")
    assert fleet.mirror.blocks("b") == 0 and matched(fleet, PROMPT) == {"a": 3}
    fleet.remove("a")
    assert fleet.mirror.blocks("a") == 0 and matched(fleet, PROMPT) == {}


def test_the_events_of_an_engine_not_in_the_fleet_are_refused():
    with pytest.raises(UnknownEngine):
        two_engines().cache_events("zz", [stored(PROMPT)])


def test_the_names_kept_per_engine_are_bounded_the_oldest_dropped_first():
    mirror = CacheMirror(PrefixIndex(), max_blocks=2)
    mirror.apply("a", "m", [stored(PROMPT, names=[1, 2, 3])])
    assert mirror.blocks("a") == 2
    mirror.apply("a", "m", [BlockRemoved((1,))])  # forgotten already: nothing to remove
    mirror.apply("a", "m", [BlockRemoved((2, 3))])
    assert mirror.blocks("a") == 0


# -- vLLM's encoding


@pytest.fixture(scope="module")
def vllm_events() -> Any:
    """vLLM's own event classes (slow to import: the first use pays for it)."""
    return importlib.import_module("vllm.distributed.kv_events")


def vllm_stored(v: Any, **fields: Any) -> Any:
    given = {
        "block_hashes": [b"\x01" * 32, 2],
        "parent_block_hash": None,
        "token_ids": list(range(8)),
        "block_size": 4,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }
    return v.BlockStored(**{**given, **fields})


def vllm_batch(v: Any, events: list[Any], rank: int | None = None) -> bytes:
    return msgspec.msgpack.encode(v.KVEventBatch(ts=1.5, events=events, data_parallel_rank=rank))


def test_vllms_batches_become_the_domains_events(vllm_events):
    v = vllm_events
    payload = vllm_batch(
        v,
        [
            vllm_stored(v),
            vllm_stored(
                v,
                block_hashes=[3],
                parent_block_hash=2,
                token_ids=[8, 9, 10, 11],
                lora_id=1,
                lora_name="adapter",
                extra_keys=[("adapter", ("image-1", 0))],
            ),
            v.BlockRemoved(block_hashes=[b"\x01" * 32, 3], medium="GPU"),
            v.AllBlocksCleared(),
        ],
    )
    rank, events = decode_batch(payload)
    assert rank == 0
    assert events == [
        BlockStored((b"\x01" * 32, 2), None, tuple(range(8)), 4),
        BlockStored(
            (3,), 2, (8, 9, 10, 11), 4, "adapter", extra_keys=(("adapter", ("image-1", 0)),)
        ),
        BlockRemoved((b"\x01" * 32, 3)),
        AllBlocksCleared(),
    ]
    hash(events[1])  # hashable all through: the mirror keys and hashes them


def test_an_adapters_blocks_as_vllm_publishes_them_match_requests_of_that_adapter(vllm_events):
    """vLLM hashes a LoRA request's adapter into every block (its extra keys), and publishes
    the adapter's name in each block's extra keys as well as in lora_name: the name is what
    lora_name already says, not something a plain request of the adapter lacks."""
    from vllm.v1.core.kv_cache_utils import to_event_extra_keys

    v = vllm_events
    per_block = (("lora", "adapter", "/adapters/adapter"),)  # vLLM's keys of each block
    payload = vllm_batch(
        v,
        [
            vllm_stored(
                v,
                block_hashes=[1, 2, 3],
                token_ids=list(PROMPT),
                block_size=SIZE,
                lora_id=1,
                lora_name="adapter",
                extra_keys=to_event_extra_keys([per_block] * 3),
            )
        ],
    )
    _, events = decode_batch(payload)
    assert events[0].extra_keys == (("adapter",),) * 3  # type: ignore[union-attr]
    fleet = two_engines()
    fleet.cache_events("b", events)
    assert matched(fleet, PROMPT) == {}
    assert matched(fleet, PROMPT, lora="adapter") == {"b": 3}


def test_the_data_parallel_rank_comes_back(vllm_events):
    rank, events = decode_batch(vllm_batch(vllm_events, [vllm_stored(vllm_events)], rank=2))
    assert rank == 2 and len(events) == 1


def test_blocks_of_another_medium_or_another_group_are_skipped(vllm_events):
    v = vllm_events
    payload = vllm_batch(
        v,
        [
            vllm_stored(v, medium="CPU"),
            vllm_stored(v, group_idx=1),
            v.BlockRemoved(block_hashes=[2], medium="CPU"),
            v.BlockRemoved(block_hashes=[2], medium="GPU", group_idx=1),
            vllm_stored(v, medium=None, group_idx=0, block_hashes=[7, 8]),
        ],
    )
    _, events = decode_batch(payload)
    assert [e.hashes for e in events] == [(7, 8)]  # type: ignore[union-attr]


def test_an_event_of_an_unknown_kind_is_skipped(vllm_events):
    v = vllm_events
    payload = msgspec.msgpack.encode(
        [
            1.0,
            [
                {"type": "Whatever", "block_hashes": [1]},
                "not a map",
                {"type": "BlockStored", "block_hashes": [1], "token_ids": "x", "block_size": 4},
                msgspec.to_builtins(v.AllBlocksCleared()),
            ],
            3,
        ]
    )
    assert decode_batch(payload) == (3, [AllBlocksCleared()])


@pytest.mark.parametrize(
    "payload",
    [b"\xc1garbage", msgspec.msgpack.encode({"ts": 1}), msgspec.msgpack.encode([1.0])],
    ids=["not-msgpack", "a-map", "no-events"],
)
def test_what_is_not_a_batch_is_a_value_error(payload):
    with pytest.raises(ValueError):
        decode_batch(payload)


# -- the reader of one engine


class Applied:
    """The reader's callbacks, recording what they were told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, list[CacheEvent]]] = []
        self.restarts: list[str] = []

    def apply(self, engine: str, events: Iterable[CacheEvent]) -> None:
        self.events.append((engine, list(events)))

    def restarted(self, engine: str) -> None:
        self.restarts.append(engine)


def batch(*events: dict[str, Any], rank: int | None = None) -> bytes:
    return msgspec.msgpack.encode([1.0, list(events), *([] if rank is None else [rank])])


CLEARED = {"type": "AllBlocksCleared"}
STORED = {
    "type": "BlockStored",
    "block_hashes": [1],
    "parent_block_hash": None,
    "token_ids": [1, 2, 3, 4],
    "block_size": 4,
    "medium": "GPU",
}


def frames(seq: int, payload: bytes) -> list[bytes]:
    return [b"", seq.to_bytes(8, "big"), payload]


def reader(applied: Applied) -> KVEventsReader:
    return KVEventsReader("a", ["ipc:///nowhere"], applied.apply, applied.restarted)


def test_a_batchs_events_reach_apply():
    applied = Applied()
    r = reader(applied)
    last: dict[int, int] = {}
    r._read(frames(0, batch(STORED)), last)
    r._read(frames(1, batch()), last)  # no events: nothing to apply
    assert applied.events == [("a", [BlockStored((1,), None, (1, 2, 3, 4), 4)])]
    assert (r.batches, r.lost, r.unreadable, applied.restarts) == (2, 0, 0, [])


def test_a_sequence_that_goes_back_is_a_restart_and_its_batch_is_applied_after():
    applied = Applied()
    r = reader(applied)
    last: dict[int, int] = {}
    for seq in (5, 6, 0):
        r._read(frames(seq, batch(CLEARED)), last)
    assert applied.restarts == ["a"] and len(applied.events) == 3 and r.lost == 0


def test_a_gap_in_the_sequence_is_counted_as_lost_batches():
    applied = Applied()
    r = reader(applied)
    last: dict[int, int] = {}
    for seq in (0, 1, 5):
        r._read(frames(seq, batch(CLEARED)), last)
    assert r.lost == 3 and applied.restarts == [] and len(applied.events) == 3


def test_each_data_parallel_rank_counts_its_own_sequence():
    applied = Applied()
    r = reader(applied)
    last: dict[int, int] = {}
    r._read(frames(7, batch(CLEARED, rank=0)), last)
    r._read(frames(0, batch(CLEARED, rank=1)), last)
    r._read(frames(8, batch(CLEARED, rank=0)), last)
    r._read(frames(1, batch(CLEARED, rank=1)), last)
    assert (r.lost, applied.restarts, len(applied.events)) == (0, [], 4)


def test_a_data_parallel_engines_restart_forgets_its_blocks_once_not_at_each_ranks_restart():
    """vLLM restarts as a whole: every rank's sequence starts over. The blocks a rank stored
    since must not be forgotten when the next rank's first batch shows the same restart."""
    fleet = two_engines()
    r = KVEventsReader("b", ["ipc:///nowhere"], fleet.cache_events, fleet.cache_restarted)
    last: dict[int, int] = {}
    for seq in range(3):  # before the restart
        r._read(frames(seq, batch(rank=0)), last)
        r._read(frames(seq, batch(rank=1)), last)
    rank0 = {**STORED, "block_hashes": [1, 2, 3], "token_ids": list(PROMPT)}
    r._read(frames(0, batch(rank0, rank=0)), last)  # restarted: rank 0 stores a prompt
    assert fleet.mirror.blocks("b") == 3
    r._read(frames(0, batch(rank=1)), last)  # rank 1's sequence starts over too
    assert fleet.mirror.blocks("b") == 3 and matched(fleet, PROMPT) == {"b": 3}


@pytest.mark.parametrize(
    "bad",
    [
        [b"", (0).to_bytes(8, "big")],  # two frames
        [b"", b"", (0).to_bytes(8, "big"), batch(STORED)],  # four
        [b"", (0).to_bytes(4, "big"), batch(STORED)],  # a sequence of 4 bytes
        frames(0, b"\xc1 not msgpack"),
        frames(0, msgspec.msgpack.encode("not a batch")),
    ],
)
def test_malformed_frames_are_counted_and_nothing_is_applied(bad):
    applied = Applied()
    r = reader(applied)
    last: dict[int, int] = {}
    r._read(bad, last)
    assert (r.unreadable, r.batches, applied.events, applied.restarts, last) == (1, 0, [], [], {})


async def test_a_real_publisher_reaches_apply_and_aclose_ends_the_reader(tmp_path):
    endpoint = f"ipc://{tmp_path / 'kv.sock'}"
    context = zmq.Context()
    publisher = context.socket(zmq.PUB)
    publisher.setsockopt(zmq.LINGER, 0)
    publisher.bind(endpoint)
    applied = Applied()
    readers = KVEventsReaders(applied.apply, applied.restarted)
    try:
        readers.follow("a", [endpoint])
        readers.follow("a", [endpoint])  # already followed: once only
        readers.follow("b", [])  # nowhere to read: not followed
        assert list(readers.readers) == ["a"]
        # ZeroMQ's slow joiner: what is published before the subscription is set up is lost,
        # so the batch is sent again until one arrives.
        seq = 0
        async with asyncio.timeout(5):
            while not applied.events:
                publisher.send_multipart(frames(seq, batch(STORED)))
                seq += 1
                await asyncio.sleep(0.05)
        assert applied.events[0] == ("a", [BlockStored((1,), None, (1, 2, 3, 4), 4)])
        assert applied.restarts == [] and readers.readers["a"].batches >= 1
    finally:
        await readers.aclose()
        publisher.close()
        context.term()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("kv-events-")]
    assert readers.readers == {}


async def test_vllms_own_publisher_is_read(tmp_path, vllm_events):
    """vLLM's ZmqEventPublisher, as an engine runs it: its frames, sequence and encoding."""
    endpoint = f"ipc://{tmp_path / 'vllm.sock'}"
    publisher = vllm_events.ZmqEventPublisher(data_parallel_rank=0, endpoint=endpoint)
    applied = Applied()
    readers = KVEventsReaders(applied.apply, applied.restarted)
    try:
        readers.follow("a", [endpoint])
        async with asyncio.timeout(5):
            while not applied.events:
                event = vllm_stored(vllm_events)
                publisher.publish(vllm_events.KVEventBatch(ts=1.0, events=[event]))
                await asyncio.sleep(0.05)
        assert applied.events[0] == (
            "a",
            [BlockStored((b"\x01" * 32, 2), None, tuple(range(8)), 4)],
        )
        assert applied.restarts == [] and readers.readers["a"].unreadable == 0
    finally:
        await readers.aclose()
        await asyncio.to_thread(publisher.shutdown)


# -- the engines, in precise mode

IDS = list(range(1000, 1040))  # 40 tokens: 2 blocks of 16 and a tail
MESSAGES = [{"role": "user", "content": "hello"}]
TEXT = RequestFeatures.of_chat(MESSAGES)


class Tokenizer:
    """An engine's chat repository as far as tokenizing goes: answers `ids`, raises `error`, or
    never answers (`hang`); records what it was asked."""

    def __init__(
        self, ids: Sequence[int] = IDS, error: Exception | None = None, hang: bool = False
    ) -> None:
        self.ids = list(ids)
        self.error = error
        self.hang = hang
        self.asked: list[dict[str, Any]] = []

    async def tokenize(self, body: Any) -> list[int]:
        self.asked.append(dict(body))
        if self.error is not None:
            raise self.error
        if self.hang:
            await asyncio.Event().wait()
        return self.ids


def upstream(name: str, chat: Tokenizer | None = None, model: str = "m") -> Upstream:
    return Upstream(name, model, chat or Tokenizer(), None, SettableMonitor())  # type: ignore[arg-type]


def precise(*chats: Tokenizer, **options: Any) -> Engines:
    names = "abcdefgh"
    return Engines(
        [upstream(names[i], chat) for i, chat in enumerate(chats)],
        default_model="m",
        kv_events=True,
        **options,
    )


def asked(*chats: Tokenizer) -> list[dict[str, Any]]:
    return [query for chat in chats for query in chat.asked]


def build() -> RequestFeatures:
    return TEXT


async def test_a_chats_features_are_its_token_ids_blocks_asked_of_an_engine():
    a, b = Tokenizer(), Tokenizer()
    engines = precise(a, b)
    payload = {"model": "m", "messages": MESSAGES, "tools": [{"type": "function"}], "n": 2}
    features = engines.features("m", build, "s1", chat_tokens_query(payload), requested="m")
    assert callable(features)
    got = await features()  # type: ignore[operator]
    assert got == RequestFeatures.of_tokens(IDS, DEFAULT_BLOCK_TOKENS, session_id="s1")
    assert got.total_blocks == 2 and got.hashes == token_block_hashes(IDS, DEFAULT_BLOCK_TOKENS)
    assert asked(a, b) == [{"messages": MESSAGES, "tools": [{"type": "function"}], "model": "m"}]
    assert engines.tokenize_failures == 0


async def test_the_engines_are_asked_in_turn():
    a, b = Tokenizer(), Tokenizer()
    engines = precise(a, b)
    for _ in range(4):
        await engines.features("m", build, tokens={"messages": MESSAGES})()  # type: ignore[operator]
    assert len(a.asked) == len(b.asked) == 2


async def test_the_token_blocks_are_cut_to_the_size_the_engines_said():
    engines = precise(Tokenizer(), Tokenizer())
    engines.cache_events("a", [stored(IDS[:8], size=8)])
    got = await engines.features("m", build, tokens={"messages": MESSAGES})()  # type: ignore[operator]
    assert got.hashes == token_block_hashes(IDS, 8) and got.total_blocks == 5


@pytest.mark.parametrize(
    "failure",
    [
        {"error": EngineFailed("vLLM said 500", 500)},
        {"error": NotImplementedError("no /tokenize")},
        {"hang": True},
    ],
    ids=["engine-failed", "not-implemented", "too-slow"],
)
async def test_a_tokenize_failure_falls_back_to_the_texts_blocks(failure, monkeypatch):
    monkeypatch.setattr(engines_module, "TOKENIZE_TIMEOUT", 0.05)
    a, b = Tokenizer(**failure), Tokenizer(**failure)
    engines = precise(a, b)
    got = await engines.features("m", build, tokens={"messages": MESSAGES})()  # type: ignore[operator]
    assert got is TEXT and len(asked(a, b)) == 1
    assert engines.tokenize_failures == 1


async def test_a_request_vllm_refuses_to_tokenize_is_routed_on_its_text_and_not_counted():
    # A 400 is the request's own fault (vLLM says so again when it is run); a 401 is not.
    refused = EngineRejected(400, "messages: a role is missing", "messages")
    a, b = Tokenizer(error=refused), Tokenizer(error=refused)
    engines = precise(a, b)
    got = await engines.features("m", build, tokens={"messages": MESSAGES})()  # type: ignore[operator]
    assert got is TEXT and engines.tokenize_failures == 0
    a.error = b.error = EngineRejected(401, "wrong key")
    await engines.features("m", build, tokens={"messages": MESSAGES})()  # type: ignore[operator]
    assert engines.tokenize_failures == 1


async def test_token_ids_are_asked_of_the_least_busy_engine_and_in_turn_among_equals():
    a, b = Tokenizer(), Tokenizer()
    engines = precise(a, b)
    for _ in range(4):
        await engines.features("m", build, tokens={"messages": MESSAGES})()  # type: ignore[operator]
    assert len(a.asked) == len(b.asked) == 2
    engines.fleet.engine("a").requests = 3  # a is busy
    for _ in range(4):
        await engines.features("m", build, tokens={"messages": MESSAGES})()  # type: ignore[operator]
    assert len(a.asked) == 2 and len(b.asked) == 6


async def test_no_engine_ready_to_tokenize_falls_back_to_the_text_without_asking():
    a, b = Tokenizer(), Tokenizer()
    engines = precise(a, b)
    engines.upstreams["a"].monitor.status = EngineStatus(EngineState.STARTING, False, "")  # type: ignore[attr-defined]
    engines.drain("b")
    got = await engines.features("m", build, tokens={"messages": MESSAGES})()  # type: ignore[operator]
    assert got is TEXT and asked(a, b) == [] and engines.tokenize_failures == 0


async def test_a_lora_adapters_request_is_tokenized_for_it_and_its_blocks_are_its_own():
    a, b = Tokenizer(), Tokenizer()
    engines = precise(a, b)
    assert engines.model_of("adapter") == "m"  # one model: an unknown name may be its adapter
    features = engines.features("m", build, tokens={"messages": MESSAGES}, requested="adapter")
    got = await features()  # type: ignore[operator]
    assert asked(a, b) == [{"messages": MESSAGES, "model": "adapter"}]
    assert got.hashes == token_block_hashes(IDS, DEFAULT_BLOCK_TOKENS, root_key("adapter"))


async def test_token_ids_given_are_used_without_asking():
    a, b = Tokenizer(), Tokenizer()
    engines = precise(a, b)
    ids = list(range(32))
    got = await engines.features("m", build, tokens=prompt_tokens_query(ids))()  # type: ignore[operator]
    assert got.hashes == token_block_hashes(ids, DEFAULT_BLOCK_TOKENS)
    assert asked(a, b) == []
    adapted = engines.features("m", build, tokens=ids, requested="adapter")
    got = await adapted()  # type: ignore[operator]
    assert got.hashes == token_block_hashes(ids, DEFAULT_BLOCK_TOKENS, root_key("adapter"))


async def test_with_one_engine_nothing_is_asked():
    only = Tokenizer()
    engines = precise(only)
    assert engines.features("m", build, tokens={"messages": MESSAGES}) is NO_FEATURES
    assert only.asked == []


async def test_without_tokens_or_kv_events_the_text_features_are_built_at_once():
    engines = precise(Tokenizer(), Tokenizer())
    assert engines.features("m", build) is TEXT
    plain = Engines([upstream("a"), upstream("b")], default_model="m")
    assert plain.features("m", build, tokens={"messages": MESSAGES}) is TEXT
    assert not plain.kv_events
    least = Engines(
        [upstream("a"), upstream("b")], default_model="m", policy="least_load", kv_events=True
    )
    assert not least.kv_events  # precise mode is the prefix policy's only


async def test_a_request_goes_where_the_engines_events_say_its_tokens_are():
    engines = precise(Tokenizer(), Tokenizer())
    engines.cache_events("b", [stored(IDS[:32], size=16)])
    engines.cache_events("gone", [stored(IDS[:32], size=16)])  # not an engine: ignored

    async def work(u: Upstream) -> str:
        return u.name

    for _ in range(3):
        features = engines.features("m", build, tokens={"messages": MESSAGES})
        assert await engines.call("m", features, work) == "b"
    views = {v.name: v for v in engines.views()}
    assert (views["b"].kv_event_batches, views["b"].cached_blocks) == (1, 2)
    assert (views["a"].kv_event_batches, views["a"].cached_blocks) == (0, 0)
    engines.cache_restarted("b")
    assert engines.view("b").cached_blocks == 0
    assert Engines([upstream("a")], default_model="m").views()[0].cached_blocks is None


def test_a_chats_tokens_query_keeps_the_messages_and_the_template_keys():
    payload = {
        "model": "m",
        "messages": MESSAGES,
        "tools": [{"type": "function"}],
        "chat_template": "{{ x }}",
        "chat_template_kwargs": {"enable_thinking": False},
        "add_generation_prompt": True,
        "continue_final_message": False,
        "add_special_tokens": False,
        "mm_processor_kwargs": {"size": 1},
        "temperature": 0.3,
        "stream": True,
        "max_tokens": 9,
        "documents": None,
    }
    query = chat_tokens_query(payload)
    assert query == {
        k: v
        for k, v in payload.items()
        if k not in ("model", "temperature", "stream", "max_tokens", "documents")
    }
    assert chat_tokens_query({"messages": MESSAGES, "tools": None}) == {"messages": MESSAGES}


@pytest.mark.parametrize("payload", [{}, {"messages": []}, {"messages": "hi"}, {"prompt": "x"}])
def test_a_chat_without_messages_has_no_tokens_query(payload):
    assert chat_tokens_query(payload) is None


@pytest.mark.parametrize(
    ("prompt", "query"),
    [
        ("once upon", {"prompt": "once upon"}),
        ([1, 2, 3], [1, 2, 3]),
        (["first", "second"], {"prompt": "first"}),
        ([[4, 5], [6]], [4, 5]),
        ([1, True], None),  # not token ids, nor prompts
        ([], None),
        (None, None),
        (7, None),
    ],
)
def test_a_prompts_tokens_query(prompt, query):
    assert prompt_tokens_query(prompt) == query
