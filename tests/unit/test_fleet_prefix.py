"""The prefix index: how requests are rendered and hashed, and what the index remembers."""

from __future__ import annotations

from tide_vllm.domain.fleet import (
    BLOCK_BYTES,
    PrefixIndex,
    RequestFeatures,
    block_hashes,
    render_chat,
    render_prompt,
)

SYSTEM = {"role": "system", "content": "You are a careful assistant. " * 20}


def chat(*turns: str) -> list[dict[str, str]]:
    roles = ["user", "assistant"]
    return [SYSTEM] + [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


def test_a_block_hash_names_the_whole_prefix_before_it():
    a = block_hashes(b"x" * 64 + b"y" * 64)
    b = block_hashes(b"z" * 64 + b"y" * 64)
    assert a[1] != b[1]  # same second block, different first
    assert block_hashes(b"x" * 64 + b"q" * 64)[0] == a[0]


def test_only_whole_blocks_are_hashed():
    assert len(block_hashes(b"a" * (3 * BLOCK_BYTES - 1))) == 2
    assert block_hashes(b"a" * (BLOCK_BYTES - 1)) == ()


def test_a_conversation_that_grows_keeps_the_hashes_of_its_earlier_turns():
    first = RequestFeatures.of_chat(chat("What is a KV cache?"))
    second = RequestFeatures.of_chat(chat("What is a KV cache?", "It stores...", "And paging?"))
    whole_blocks_of_first = len(render_chat(chat("What is a KV cache?"))) // BLOCK_BYTES
    assert second.hashes[:whole_blocks_of_first] == first.hashes[:whole_blocks_of_first]
    assert len(second.hashes) > len(first.hashes)


def test_role_and_content_parts_and_tools_all_count():
    text = [{"role": "user", "content": "hello"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    as_system = [{"role": "system", "content": "hello"}]
    assert render_chat(text) != render_chat(as_system)
    assert render_chat(parts) != render_chat(text)  # parts are framed, not merged silently
    assert b"hello" in render_chat(parts)
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert render_chat(text, tools).startswith(render_chat([], tools))
    assert render_chat(text, tools) != render_chat(text)


def test_tool_calls_and_images_are_part_of_the_rendering():
    call = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u://1"}}]}
    assert b'"c1"' in render_chat([call])
    assert b"u://1" in render_chat([image])


def test_odd_messages_render_without_raising():
    assert render_chat([{"content": {"x": 1}}, "not a message", {"role": "user", "content": 5}])
    assert render_chat([{"role": "user", "content": "\ud800 lone surrogate"}])
    assert render_chat(None) and render_chat({"role": "user"})
    deep: list[object] = []
    for _ in range(5000):
        deep = [deep]
    assert render_chat([{"role": "user", "content": {"x": deep}}])


def test_a_completions_prompt_is_its_text_or_its_token_ids_at_four_bytes_each():
    assert render_prompt("once upon") == b"once upon"
    assert len(render_prompt(list(range(16)))) == 64  # one block: vLLM's 16-token block
    assert render_prompt(["first", "second"]) == b"first"
    assert render_prompt([[1, 2], [3]]) == render_prompt([1, 2])
    assert render_prompt([-1]) and render_prompt(None) == b"" and render_prompt([]) == b""


def test_features_estimate_tokens_from_bytes():
    features = RequestFeatures.of_prompt("a" * 400, session_id="s")
    assert features.estimated_tokens == 100
    assert features.total_blocks == 400 // BLOCK_BYTES
    assert features.session_id == "s"


def test_the_index_knows_how_many_leading_blocks_each_engine_holds():
    index = PrefixIndex()
    long = RequestFeatures.of_chat(chat("q1", "a1", "q2")).hashes
    short = long[:5]
    index.record("m", short, "e1")
    index.record("m", long, "e2")
    assert index.match("m", long) == {"e1": 5, "e2": len(long)}
    assert index.match("m", short) == {"e1": 5, "e2": 5}


def test_a_prefix_that_diverges_matches_only_up_to_the_divergence():
    index = PrefixIndex()
    index.record("m", (1, 2, 3, 4), "e1")
    assert index.match("m", (1, 2, 9, 4)) == {"e1": 2}
    assert index.match("m", (9, 2, 3)) == {}


def test_models_are_separate_namespaces():
    index = PrefixIndex()
    index.record("a", (1, 2, 3), "e1")
    assert index.match("b", (1, 2, 3)) == {}
    index.record("b", (1, 2), "e9")
    assert index.match("a", (1, 2, 3)) == {"e1": 3}
    assert index.match("b", (1, 2, 3)) == {"e9": 2}


def test_each_engines_memory_is_bounded_and_its_least_recent_prefixes_go_first():
    index = PrefixIndex(blocks_per_engine=6)
    index.record("m", (1, 2, 3), "e1")
    index.record("m", (7, 8, 9), "e1")
    index.record("m", (4, 5), "e1")
    index.record("m", (1, 2, 3), "e2")  # another engine's table is its own
    assert index.match("m", (1, 2, 3)) == {"e1": 1, "e2": 3}  # e1 lost the tail first
    assert index.match("m", (7, 8, 9)) == {"e1": 3}
    assert len(index) == 6 + 3


def test_a_table_may_run_over_its_bound_by_a_sixteenth_before_a_batch_is_evicted():
    index = PrefixIndex(blocks_per_engine=160)
    for start in range(0, 2000, 20):
        index.record("m", tuple(range(start, start + 20)), "e1")
        assert len(index) <= 170
    assert index.match("m", tuple(range(1980, 2000))) == {"e1": 20}


def test_an_engines_bound_can_be_set_to_its_real_cache_size():
    index = PrefixIndex(blocks_per_engine=100)
    index.record("m", tuple(range(50)), "e1")
    index.resize("m", "e1", 10)
    assert len(index) == 10
    assert index.match("m", tuple(range(50))) == {"e1": 10}
    index.resize("m", "e2", 5)
    index.record("m", tuple(range(50)), "e2")
    assert index.match("m", tuple(range(50))) == {"e1": 10, "e2": 5}


def test_forgetting_an_engine_keeps_what_others_hold():
    index = PrefixIndex()
    index.record("m", (1, 2, 3), "e1")
    index.record("m", (1, 2), "e2")
    index.forget("m", "e1")
    index.forget("m", "nobody")
    assert index.match("m", (1, 2, 3)) == {"e2": 2}
    assert len(index) == 2
