"""Constant-memory streaming: a bounded cache over a stream far longer than the budget."""

import math
from types import SimpleNamespace

import pytest
import torch

import sparsemem
from sparsemem.modeling import attention
from sparsemem.modeling.attention import MemoryView, compact_block_ids, sparsemem_attention_forward
from sparsemem.modeling.slots import SlotTier
from sparsemem.stream import TokenStream, _pieces, stream

from conftest import ByteTokenizer, make_base_model


def _attention_module(**options):
    config = SimpleNamespace(
        block_size=4, sink_tokens=2, local_tokens=4, top_k_blocks=2, block_fraction=None, scorer="minmax",
        query_chunk_size=5, attention_backend="reference",
    )
    for name, value in options.items():
        setattr(config, name, value)
    return SimpleNamespace(config=config)


@pytest.mark.parametrize("top_k", [1, 2, None])
def test_numbering_only_held_blocks_changes_nothing(monkeypatch, top_k):
    """Far past the held keys (logical positions near 10^6), numbering only the blocks that hold a key
    or a slot gives the same attention as numbering every block from position 0."""
    torch.manual_seed(0)
    batch, heads, kv_heads, dim = 1, 4, 2, 8
    far = 1_000_000
    key_positions = torch.cat([torch.arange(2), torch.arange(far - 40, far - 28), torch.arange(far - 13, far)])
    n = key_positions.numel()
    k, v = torch.randn(batch, kv_heads, n, dim), torch.randn(batch, kv_heads, n, dim)
    q = torch.randn(batch, heads, 7, dim)
    q_pos = torch.arange(far - 7, far)
    # slots: a span whose tokens were dropped (-1), a block also held at full resolution, and a block
    # touched by the recent window of some queries
    held_block = int(key_positions[4]) // 4
    recent_block = int(far - 9) // 4
    slots = SlotTier(
        keys=torch.randn(batch, 5, dim), values=torch.randn(batch, 5, dim), beta=torch.randn(batch, 5),
        head=torch.tensor([0, 0, 1, 1, 0]), block=torch.tensor([-1, held_block, -1, recent_block, held_block]),
        position=torch.tensor([far - 41, far - 37, far - 41, far - 9, far - 37]),
    )
    module = _attention_module(top_k_blocks=top_k)

    def call():
        view = MemoryView(q_pos, key_positions, slots, None, contiguous=False)
        return sparsemem_attention_forward(module, q, k, v, None, scaling=1 / math.sqrt(dim), sparsemem=view)[0]

    compacted = call()
    ids, slot_block, first = compact_block_ids(torch.div(key_positions, 4, rounding_mode="floor"), slots, 4)
    assert first.numel() <= n  # held blocks, not the ~250K blocks since position 0
    assert torch.equal(first[ids], torch.div(key_positions, 4, rounding_mode="floor") * 4)
    assert slot_block.tolist()[0] == -1 and bool((first[slot_block[1:].clamp(min=0)] // 4 == slots.block[1:].clamp(min=0)).all())

    def every_block(block_ids, slot_tier, block_size):
        count = max(int(block_ids.max()), int(slot_tier.block.max())) + 1
        return block_ids, slot_tier.block, torch.arange(count) * block_size

    monkeypatch.setattr(attention, "compact_block_ids", every_block)
    reference = call()
    torch.testing.assert_close(compacted, reference, rtol=0, atol=1e-6)


def test_text_stream_is_lazy_cycles_and_says_so(tmp_path):
    first, second = tmp_path / "a.py", tmp_path / "b.py"
    first.write_text("x = 1\n" * 50)
    second.write_text("def f():\n    return 2\n")
    tokenizer = ByteTokenizer()
    source = TokenStream(tokenizer, [first, second])
    assert tokenizer.calls == 0  # nothing is read before it is asked for
    one_cycle = len((first.read_text() + "\n\n").encode()) + len((second.read_text() + "\n\n").encode())
    ids = source.take(one_cycle + 10)
    assert source.cycles == 1 and source.tokens_per_cycle == one_cycle
    assert ids[one_cycle:] == ids[:10]
    assert "".join(_pieces("ab\ncd\nef", size=4)) == "ab\ncd\nef"
    assert all(p.endswith("\n") for p in list(_pieces("ab\ncd\nef\n", size=4)))


def test_default_stream_is_the_standard_library():
    source = TokenStream(ByteTokenizer())
    assert "standard library" in source.source
    assert [p.suffix for p in source.files[:20]] == [".py"] * 20
    assert source.files == sorted(source.files)
    assert len(source.take(5000)) == 5000


@pytest.mark.parametrize("method", ["am", "streaming-llm"])
def test_stream_keeps_the_cache_within_budget_and_flat(method):
    """A tiny Llama streams 1000 tokens of real text (the standard library) in 64-token chunks under a
    96-entry budget: the cache never holds more than the budget after a chunk, and from the first
    compaction on its bytes (and, once the reference-query ring is full, every byte of tensors it keeps
    alive) are the same after every chunk."""
    model = sparsemem.convert(make_base_model("llama"), top_k_blocks=None, block_fraction=None)
    budget, chunk, tokens = 96, 64, 1000
    run, source = stream(model, ByteTokenizer(), tokens, chunk=chunk, budget=budget, method=method, progress=False)
    records = run.records
    assert len(records) == math.ceil(tokens / chunk) and records[-1]["tokens"] == tokens
    assert records[-1]["logical_length"] == tokens  # positions stay logical
    assert max(r["physical_max"] for r in records) <= budget
    first = run.summary["first_compaction_chunk"]
    assert first is not None and first <= math.ceil(budget / chunk)
    compacted = run.summary["compacted_to"]["after_compaction"]
    layers, kv_heads, head_dim = model.config.num_hidden_layers, model.config.num_key_value_heads, 16
    entry_bytes = 2 * kv_heads * head_dim * 4  # fp32 K and V of one position
    for r in records[first:]:
        # 64-token chunks on 72 compacted entries reach the budget every chunk, so every chunk compacts
        assert r["chunk_compactions"] == layers
        assert r["physical_max"] == compacted
        assert r["cache_bytes"] <= layers * (budget * entry_bytes + budget * kv_heads * 4)  # K/V (+ beta) of the budget
    steady = records[first:]
    assert len({r["cache_bytes"] for r in steady}) == 1
    # what the cache keeps alive also holds the newest 256 queries per layer (compaction's reference
    # queries): flat once that ring is full, and no larger than the budget's K/V, slots and positions plus it
    full_ring = max(first, math.ceil(256 / chunk) - 1)
    assert len({r["cache_storage_bytes"] for r in records[full_ring:]}) == 1
    assert all(r["cache_storage_bytes"] <= records[full_ring]["cache_storage_bytes"] for r in records)
    queries = model.config.num_attention_heads * 256 * head_dim * 4
    assert records[-1]["cache_storage_bytes"] <= layers * (budget * (entry_bytes + kv_heads * 4 + 3 * 8) + queries + 256 * 8)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["loss_no_memory"]) for r in records)
    assert run.summary["budget_respected"] and run.summary["tokens"] == tokens


def test_stream_time_limit_stops_early_and_says_so():
    model = sparsemem.convert(make_base_model("llama"), top_k_blocks=None, block_fraction=None)
    run, _ = stream(model, ByteTokenizer(), 10_000, chunk=64, budget=96, method="streaming-llm", time_limit=0.0, progress=False)
    assert run.records == [] and "time limit" in run.stopped


@pytest.mark.slow
def test_bench_stream_section_on_smollm2(tmp_path, smollm2_dir):
    """`sparsemem bench --stream-tokens` on the CPU: SmolLM2 over the standard library, report files written."""
    import json

    from sparsemem.cli import main

    code = main(["bench", "--stream-tokens", "700", "--stream-chunk", "256", "--stream-budget", "256", "--device", "cpu",
                 "--stream-methods", "streaming-llm", "--stream-no-baseline", "--output", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    run = report["stream"]["runs"][0]
    assert [r["tokens"] for r in run["records"]] == [256, 512, 700]
    assert max(r["physical_max"] for r in run["records"]) <= 256
    assert run["summary"]["compactions"] > 0 and all(r["loss"] < 8 for r in run["records"])
    assert "trained context of 8192" in (tmp_path / "bench.md").read_text()
    try:
        import matplotlib  # noqa: F401  (plots are optional: skipped with a warning without matplotlib)
    except ImportError:
        assert not (tmp_path / "stream.png").exists()
    else:
        assert (tmp_path / "stream.png").is_file()


@pytest.mark.slow
def test_memory_helps_beyond_the_trained_window_on_smollm2(smollm2_dir):
    """24K tokens of the standard library's sources through SmolLM2-135M (trained context 8K) under a
    budget of 2048 entries per head, 1024-token chunks, AM consolidation, positions="auto": past the
    trained context the memory must make the next-token loss lower than reading each chunk alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model = sparsemem.convert(base.eval(), top_k_blocks=None, block_fraction=None)
    assert model.config.positions == "auto"
    run, _ = stream(model, tokenizer, 24 * 1024, chunk=1024, budget=2048, method="am", progress=False)
    summary = run.summary
    assert summary["budget_respected"] and summary["compactions"] > 0
    beyond = [r for r in run.records if r["tokens"] - r["chunk_tokens"] >= 8192]
    assert len(beyond) == 16 and all(r["rope_offset"] > 0 for r in beyond)
    assert summary["loss_beyond_window"] <= summary["no_memory_loss_beyond_window"]
