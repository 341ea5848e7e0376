"""The engines' own account of their prefix caches: vLLM's KV-cache events.

A vLLM started with `--kv-events-config` publishes, as it runs, the blocks it stores in its
prefix cache (`BlockStored`: their hashes, the parent block's hash, their token ids), those it
evicts (`BlockRemoved`) and a reset (`AllBlocksCleared`). The mirror here applies them to the
prefix index, so that it holds what each engine really caches rather than what it was sent.

vLLM names a block by a hash of its own (sha256 or a seeded hash, per engine); the gateway
names it by a hash chained over its token ids (`token_block_hashes`), which it can compute for
a request too, once it has the request's token ids. A stored block's name is the parent's name
(found from the parent's vLLM hash, which the mirror remembers) chained with its tokens. So
the index's keys for a request and for the engines' events are the same, and a request matches
the blocks an engine holds, block for block.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from .prefix import PrefixIndex, root_key


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Blocks an engine now holds, in prompt order: `hashes` are vLLM's names for them,
    `parent` the name of the block before the first one (None at the prompt's start), and
    `token_ids` the tokens of all of them, `block_size` a block. `lora_name` is the adapter
    the blocks were computed for; `extra_keys`, one per block, what else vLLM hashed into
    them (the adapter's name again, images, a cache salt): blocks with more than the adapter
    among them are named apart, as no plain request can match them."""

    hashes: tuple[Hashable, ...]
    parent: Hashable | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_name: str | None = None
    extra_keys: tuple[Any, ...] | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    hashes: tuple[Hashable, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


CacheEvent = BlockStored | BlockRemoved | AllBlocksCleared


class CacheMirror:
    """Applies each engine's events to the prefix index, and remembers, per engine, the name it
    gave each block vLLM still holds (to chain a child to it, and to remove it).

    A stored block whose parent the mirror does not know (events lost, or published before the
    gateway listened) cannot be named, so it is left out with the rest of its event. The names
    kept per engine are bounded (`max_blocks`, oldest dropped first) in case removals are lost.
    """

    def __init__(self, index: PrefixIndex, max_blocks: int = 1 << 20) -> None:
        self.index = index
        self.max_blocks = max_blocks
        self._names: dict[str, dict[Hashable, int]] = {}  # engine -> vLLM hash -> our name
        self.block_tokens: dict[str, int] = {}  # engine -> its block size, from its events
        self.unnamed = 0  # stored blocks left out: their parent was unknown

    def apply(self, engine: str, model: str, events: Iterable[CacheEvent]) -> None:
        names = self._names.setdefault(engine, {})
        for event in events:
            if isinstance(event, BlockStored):
                self._stored(engine, model, names, event)
            elif isinstance(event, BlockRemoved):
                gone = [n for n in (names.pop(h, None) for h in event.hashes) if n is not None]
                if gone:
                    self.index.discard(model, engine, gone)
            elif isinstance(event, AllBlocksCleared):
                names.clear()
                self.index.forget(model, engine)

    def _stored(
        self, engine: str, model: str, names: dict[Hashable, int], event: BlockStored
    ) -> None:
        size = event.block_size
        if size < 1 or len(event.token_ids) != size * len(event.hashes):
            return  # blocks skipped inside the run (sliding windows): not a plain prefix
        self.block_tokens[engine] = size
        if event.parent is None:
            previous = root_key(event.lora_name)
        else:
            known = names.get(event.parent)
            if known is None:
                self.unnamed += len(event.hashes)
                return
            previous = known
        named: list[int] = []
        tokens = event.token_ids
        extra = event.extra_keys
        for i, vllm_hash in enumerate(event.hashes):
            block = tuple(tokens[i * size : (i + 1) * size])
            keys = extra[i] if extra and i < len(extra) else None
            if keys and event.lora_name is not None and keys[0] == event.lora_name:
                keys = keys[1:]  # the adapter, named in every block: the root says it already
            if not keys:
                previous = hash((previous, block))
            else:
                try:
                    previous = hash((previous, block, keys))
                except TypeError:  # a list among them
                    previous = hash((previous, block, repr(keys)))
            names.pop(vllm_hash, None)  # re-inserted last: the most recent
            names[vllm_hash] = previous
            named.append(previous)
        if len(names) > self.max_blocks:
            for stale in list(names)[: len(names) - self.max_blocks]:
                del names[stale]
        self.index.record(model, named, engine)

    def blocks(self, engine: str) -> int:
        """How many blocks the engine's events say it holds (those the mirror could name)."""
        return len(self._names.get(engine, ()))

    def forget(self, engine: str) -> None:
        """The engine restarted or left: its blocks are gone, and so are their names."""
        self._names.pop(engine, None)
