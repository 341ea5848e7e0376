"""Which engine recently saw which prompt prefix, from hashed blocks of the rendered request.

The gateway does not tokenize: it renders the request to a canonical byte string and cuts it
into fixed-size blocks, each named by a hash chained with the previous block's, so one hash
names the whole prefix up to the end of its block. Two requests that share a prefix share
the hashes of its whole blocks, which is what vLLM's prefix cache can reuse.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# 64 bytes are about 16 tokens of English or code (about 4 bytes a token), vLLM's default KV
# block: the unit its prefix cache reuses, so a finer block could not name more reuse, and a
# coarser one would drop up to a block of each turn's reuse. CJK text (3 bytes a character,
# 1-2 characters a token) makes blocks of fewer tokens, which only makes the index finer.
# Token-id prompts are rendered at 4 bytes a token, so a block is exactly 16 tokens.
BLOCK_BYTES = 64
BYTES_PER_TOKEN = 4
# The block size, in tokens, that a request's token ids are cut into before any engine of its
# model said its own (vLLM's default on GPUs; the CPU build's is 128, learnt from the engine's
# metrics or its first KV-cache event).
DEFAULT_BLOCK_TOKENS = 16

# Separators no chat text is expected to hold, so that "a" + "bc" and "ab" + "c" differ.
_MESSAGE = "\x1e"
_FIELD = "\x1f"
_PART = "\x1d"


def _canonical(value: Any) -> str:
    try:
        return json.dumps(
            value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str
        )
    except (RecursionError, TypeError, ValueError):  # absurd nesting, or keys of mixed types
        return "\x00"


def _render_content(content: Any, out: list[str]) -> None:
    if content is None:
        return
    if isinstance(content, str):
        out.append(content)
        return
    if not isinstance(content, list):
        out.append(_canonical(content))
        return
    for part in content:
        out.append(_PART)
        if isinstance(part, Mapping):
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
                continue
            if kind == "image_url" and isinstance(part.get("image_url"), Mapping):
                out.append(str(part["image_url"].get("url", "")))
                continue
        out.append(part if isinstance(part, str) else _canonical(part))


def render_chat(messages: Any, tools: Any = None) -> bytes:
    """The conversation as one canonical byte string: the tools first (chat templates put them
    at the head of the prompt), then every message in order, its role and its content with the
    parts flattened, then its other fields (tool calls, name, tool_call_id) in key order."""
    out: list[str] = []
    if tools:
        out += [_MESSAGE, "tools", _FIELD, _canonical(tools)]
    if not isinstance(messages, (list, tuple)):  # vLLM will refuse it; routing need not
        messages = [messages]
    for message in messages:
        out.append(_MESSAGE)
        if not isinstance(message, Mapping):
            out.append(_canonical(message))
            continue
        out += [str(message.get("role", "")), _FIELD]
        _render_content(message.get("content"), out)
        for key in sorted(k for k in message if k not in ("role", "content")):
            value = message[key]
            if value is not None:
                out += [_FIELD, str(key), _FIELD, _canonical(value)]
    return "".join(out).encode("utf-8", "surrogatepass")


def render_prompt(prompt: Any) -> bytes:
    """A completions prompt as bytes: its text, or its token ids at 4 bytes each. Of a batch
    (a list of prompts) the first stands for all: batched prompts usually share a template."""
    if isinstance(prompt, str):
        return prompt.encode("utf-8", "surrogatepass")
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            try:
                return struct.pack(f"<{len(prompt)}I", *prompt)
            except struct.error:  # ids out of range: vLLM will refuse the request anyway
                return _canonical(prompt).encode()
        return render_prompt(prompt[0])
    if prompt is None or prompt == []:
        return b""
    return _canonical(prompt).encode("utf-8", "surrogatepass")


def block_hashes(rendered: bytes, block_size: int = BLOCK_BYTES) -> tuple[int, ...]:
    """One hash per whole block, each chained with the one before it; the tail that does not
    fill a block is left out, as vLLM only caches whole blocks. Python's own hash is used: it
    is several times faster than hashlib here, and the index lives in one process."""
    hashes: list[int] = []
    previous = 0
    for start in range(0, len(rendered) - block_size + 1, block_size):
        previous = hash((previous, rendered[start : start + block_size]))
        hashes.append(previous)
    return tuple(hashes)


def root_key(lora_name: str | None = None) -> int:
    """What a prompt's first block is chained to: the adapter it is computed for, if any."""
    return 0 if lora_name is None else hash(("lora", lora_name))


def token_block_hashes(
    token_ids: Sequence[int], block_tokens: int, root: int = 0
) -> tuple[int, ...]:
    """One name per whole block of `block_tokens` tokens, each chained with the one before it;
    the tail that does not fill a block is left out, as vLLM only caches whole blocks."""
    hashes: list[int] = []
    previous = root
    for start in range(0, len(token_ids) - block_tokens + 1, block_tokens):
        previous = hash((previous, tuple(token_ids[start : start + block_tokens])))
        hashes.append(previous)
    return tuple(hashes)


@dataclass(frozen=True, slots=True)
class RequestFeatures:
    """What routing needs to know of a request: its prefix hashes, its size, its session, and
    the LoRA adapter it names, if any."""

    hashes: tuple[int, ...] = ()
    prompt_bytes: int = 0
    session_id: str | None = None
    block_size: int = BLOCK_BYTES
    adapter: str | None = None

    @classmethod
    def of_chat(
        cls,
        messages: Any,
        *,
        tools: Any = None,
        session_id: str | None = None,
        block_size: int = BLOCK_BYTES,
    ) -> RequestFeatures:
        rendered = render_chat(messages, tools)
        return cls(block_hashes(rendered, block_size), len(rendered), session_id, block_size)

    @classmethod
    def of_prompt(
        cls, prompt: Any, *, session_id: str | None = None, block_size: int = BLOCK_BYTES
    ) -> RequestFeatures:
        rendered = render_prompt(prompt)
        return cls(block_hashes(rendered, block_size), len(rendered), session_id, block_size)

    @classmethod
    def of_tokens(
        cls,
        token_ids: Sequence[int],
        block_tokens: int,
        *,
        session_id: str | None = None,
        root: int = 0,
    ) -> RequestFeatures:
        """The request's prompt as the engine will see it, its token ids: its blocks named as
        the engines' KV-cache events name theirs (kv_events.token_block_hashes)."""
        return cls(
            token_block_hashes(token_ids, block_tokens, root),
            len(token_ids) * BYTES_PER_TOKEN,
            session_id,
            block_tokens * BYTES_PER_TOKEN,
        )

    @property
    def total_blocks(self) -> int:
        return len(self.hashes)

    @property
    def estimated_tokens(self) -> int:
        return math.ceil(self.prompt_bytes / BYTES_PER_TOKEN)

    def tokens_in(self, blocks: int) -> int:
        """About how many prompt tokens `blocks` whole blocks hold."""
        return blocks * self.block_size // BYTES_PER_TOKEN


class PrefixIndex:
    """An approximate model of each engine's prefix cache: the prompt blocks it was recently
    sent, per model and engine, each engine's bounded by a block count.

    vLLM evicts the least recently used blocks of its prefix cache; so does each engine's table
    here, once it holds more than `blocks_per_engine` blocks (or what `resize` set from the
    engine's real cache size). A request's blocks are recorded deepest first, so a prefix's
    first blocks are always more recent than its later ones and eviction cuts prefixes from
    their tail, as a radix tree evicts leaves. An entry costs about 100 bytes: the default,
    32768 blocks of 64 bytes (some 512k tokens), is about 3 MB an engine."""

    def __init__(self, blocks_per_engine: int = 32_768) -> None:
        if blocks_per_engine < 1:
            raise ValueError("blocks_per_engine must be at least 1")
        self.blocks_per_engine = blocks_per_engine
        self._tables: dict[str, dict[str, _Table]] = {}  # model -> engine -> its blocks

    def __len__(self) -> int:
        return sum(len(t.blocks) for tables in self._tables.values() for t in tables.values())

    def match(self, model: str, hashes: Sequence[int]) -> dict[str, int]:
        """For each engine that holds the request's first block, how many of its leading blocks
        it holds in a row."""
        matched: dict[str, int] = {}
        for engine, table in self._tables.get(model, {}).items():
            blocks = table.blocks
            n = 0
            for h in hashes:
                if h not in blocks:
                    break
                n += 1
            if n:
                matched[engine] = n
        return matched

    def record(self, model: str, hashes: Sequence[int], engine: str) -> None:
        """`engine` was sent this prefix: it will hold its blocks in its cache."""
        tables = self._tables.setdefault(model, {})
        table = tables.get(engine)
        if table is None:
            table = tables[engine] = _Table(self.blocks_per_engine)
        table.touch(hashes)

    def resize(self, model: str, engine: str, blocks: int) -> None:
        """Bound `engine`'s table by its real cache size, in blocks of the index."""
        tables = self._tables.setdefault(model, {})
        table = tables.get(engine)
        if table is None:
            table = tables[engine] = _Table(self.blocks_per_engine)
        table.resize(max(1, blocks))

    def discard(self, model: str, engine: str, hashes: Iterable[int]) -> None:
        """`engine` no longer holds these blocks (it evicted them)."""
        table = self._tables.get(model, {}).get(engine)
        if table is not None:
            for h in hashes:
                table.blocks.pop(h, None)

    def forget(self, model: str, engine: str) -> None:
        """Drop what `engine` was thought to hold (it restarted, or left the fleet)."""
        table = self._tables.get(model, {}).get(engine)
        if table is not None:
            table.blocks.clear()


class _Table:
    """One engine's blocks, least recently used first."""

    def __init__(self, capacity: int) -> None:
        # A plain dict in recency order (re-inserting moves a key to its end) does the LRU's
        # work at a third of OrderedDict's cost a block; evicting in batches of a sixteenth
        # keeps a dict's head, which fills with holes as keys move, from being walked often.
        self.blocks: dict[int, None] = {}
        self.resize(capacity)

    def resize(self, capacity: int) -> None:
        self.capacity = capacity
        self._limit = capacity + capacity // 16
        self._evict()

    def touch(self, hashes: Sequence[int]) -> None:
        blocks = self.blocks
        for h in reversed(hashes):
            blocks.pop(h, None)
            blocks[h] = None
        if len(blocks) > self._limit:
            self._evict()

    def _evict(self) -> None:
        excess = len(self.blocks) - self.capacity
        if excess > 0:
            for h in list(itertools.islice(self.blocks, excess)):
                del self.blocks[h]
