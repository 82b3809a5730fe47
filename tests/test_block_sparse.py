"""The block-sparse path against the reference path, on the CPU.

FlexAttention run eagerly (CPU) applies `mask_mod` densely and ignores the block lists, so the block
lists are checked on their own against a brute-force token mask of the same function.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from sparsemem.modeling import block_sparse
from sparsemem.modeling.attention import AttentionStats, MemoryView, sparsemem_attention_forward
from sparsemem.modeling.slots import SlotTier
from sparsemem.modeling.query_blocks import aligned_chunks, pool_query_blocks
from sparsemem.modeling.scorer import PooledKeyScorer

B, H, HKV, D = 2, 4, 2, 16
OPTIONS = dict(
    block_size=16, query_block_size=16, sink_tokens=5, local_tokens=20, top_k_blocks=2, block_fraction=0.3,
    query_chunk_size=40, scorer="hybrid", attention_backend="reference",
)


def module(**overrides):
    config = SimpleNamespace(**{**OPTIONS, **overrides})
    # a learned scorer is the caller's to set
    scorer = None if config.scorer == "learned" else PooledKeyScorer(config.scorer, getattr(config, "scorer_sub_block", None))
    return SimpleNamespace(config=config, scorer=scorer, sparsemem_stats=AttentionStats())


def fast_options(mod):
    return {name: getattr(mod.config, name) for name in ("block_size", "query_block_size", "sink_tokens", "local_tokens",
                                                         "top_k_blocks", "block_fraction", "query_chunk_size")}


def random_slots(total, block_size, seed=1, per_head=7):
    gen = torch.Generator().manual_seed(seed)
    position = torch.randint(0, total, (per_head,), generator=gen)
    block = torch.div(position, block_size, rounding_mode="floor")
    block[0] = -1  # a span whose full-resolution K/V are gone
    return SlotTier.from_heads(
        torch.randn(B, HKV, per_head, D, generator=gen),
        torch.randn(B, HKV, per_head, D, generator=gen),
        torch.randn(B, HKV, per_head, generator=gen),
        block,
        position,
    )


SCORERS = [{"scorer": "hybrid"}, {"scorer": "subminmax", "scorer_sub_block": 4}]


@pytest.mark.parametrize("total, num_queries", [(150, 150), (170, 37), (96, 96)])
@pytest.mark.parametrize("with_slots", [False, True])
@pytest.mark.parametrize("scorer", SCORERS, ids=lambda s: s["scorer"])
def test_flex_function_equals_reference(total, num_queries, with_slots, scorer):
    torch.manual_seed(total + num_queries)
    q = torch.randn(B, H, num_queries, D)
    k, v = torch.randn(B, HKV, total, D), torch.randn(B, HKV, total, D)
    mod = module(**scorer)
    slots = random_slots(total, mod.config.block_size) if with_slots else None
    positions = torch.arange(total)
    view = MemoryView(positions[total - num_queries :], positions, slots, None)
    ref, _ = sparsemem_attention_forward(mod, q, k, v, None, scaling=D**-0.5, sparsemem=view)
    out, attended = block_sparse.block_sparse_attention(
        q, k, v, D**-0.5, mod.scorer, fast_options(mod), slots, compiled=False
    )
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)
    assert float(attended) == mod.sparsemem_stats.attended["prefill"]


def brute_force_mask(selected, first_query, total, opts):
    """[B, Hkv, Q, N] token mask of the block-shared function, straight from its definition."""
    q_pos = torch.arange(first_query, total)
    k_pos = torch.arange(total)
    qb = opts["query_block_size"]
    tile = torch.div(q_pos, qb, rounding_mode="floor") - first_query // qb
    chosen = selected[:, :, tile][..., torch.div(k_pos, opts["block_size"], rounding_mode="floor")]
    anchors = (k_pos[None] < opts["sink_tokens"]) | (k_pos[None] > q_pos[:, None] - opts["local_tokens"])
    return (k_pos[None] <= q_pos[:, None]) & (anchors | chosen)


@pytest.mark.parametrize("total, num_queries", [(200, 200), (203, 61), (64, 64)])
def test_block_lists_cover_the_token_mask(total, num_queries):
    opts = dict(fast_options(module()), sink_tokens=18, local_tokens=21)
    qb, kb = opts["query_block_size"], opts["block_size"]
    first = total - num_queries
    front = first % qb
    n_qb, n_b = math.ceil((front + num_queries) / qb), math.ceil(total / kb)
    selected = torch.rand(B, HKV, n_qb, n_b, generator=torch.Generator().manual_seed(total)) < 0.3
    selected &= block_sparse.block_candidates(first, total, n_qb, n_b, qb, kb, opts["sink_tokens"], opts["local_tokens"], "cpu")
    mask = brute_force_mask(selected, first, total, opts)
    partial, full = block_sparse.tile_flags(selected, first, total, qb, kb, opts["sink_tokens"], opts["local_tokens"])
    assert not (partial & full).any()
    # pad the token mask to whole tiles: rows before the first query and keys past the end attend nothing
    padded = torch.zeros(B, HKV, n_qb * qb, n_b * kb, dtype=torch.bool)
    padded[:, :, front : front + num_queries, :total] = mask
    tiles = padded.view(B, HKV, n_qb, qb, n_b, kb)
    any_pair = tiles.any(dim=(3, 5))
    real_rows = torch.zeros(n_qb * qb, dtype=torch.bool)
    real_rows[front : front + num_queries] = True
    every_pair = (tiles | ~real_rows.view(1, 1, n_qb, qb, 1, 1)).all(dim=(3, 5))
    assert not (any_pair & ~(partial | full)).any(), "a tile holding attended pairs is skipped"
    assert not (full & ~every_pair).any(), "a tile run without mask holds pairs that are not attended"
    # the lists handed to FlexAttention name exactly the flagged tiles, per query head
    for flags in (partial, full):
        counts, indices = block_sparse.block_lists(flags, H // HKV)
        rebuilt = torch.zeros(B, H, n_qb, n_b, dtype=torch.bool)
        for b in range(B):
            for h in range(H):
                for i in range(n_qb):
                    rebuilt[b, h, i, indices[b, h, i, : counts[b, h, i]].long()] = True
        assert torch.equal(rebuilt, flags.repeat_interleave(H // HKV, dim=1))
        assert (indices[..., :-1] <= indices[..., 1:]).logical_or(
            torch.arange(indices.shape[-1] - 1) >= counts[..., None] - 1
        ).all(), "indices must be increasing"
    pairs = block_sparse.attended_pairs(selected, first, total, qb, kb, opts["sink_tokens"], opts["local_tokens"])
    assert int(pairs) == int(mask.sum())


def test_query_blocks_with_all_blocks_equal_dense():
    torch.manual_seed(0)
    total = 90
    q, k, v = torch.randn(B, H, total, D), torch.randn(B, HKV, total, D), torch.randn(B, HKV, total, D)
    mod = module(top_k_blocks=None, block_fraction=None)
    out, _ = sparsemem_attention_forward(mod, q, k, v, None, scaling=D**-0.5)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, dense.transpose(1, 2), rtol=0, atol=1e-5)


def test_query_blocks_share_one_selection():
    """Every query of a block attends the same blocks: a planted match is seen by the whole block."""
    torch.manual_seed(0)
    total = 128
    q, k, v = torch.randn(1, 2, total, D) * 0.01, torch.randn(1, 1, total, D), torch.randn(1, 1, total, D)
    k[:, :, 32:48] = q[:, :1, 112:128].mean(-2, keepdim=True) * 2000  # block 2 matches the mean of query block 7
    mod = module(top_k_blocks=1, block_fraction=None, sink_tokens=0, local_tokens=16)
    out, _ = sparsemem_attention_forward(mod, q, k, v, None, scaling=D**-0.5)
    for query in range(112, 128):
        logits = (q[0, :, query] @ k[0, 0].T) * D**-0.5
        keep = torch.zeros(total, dtype=torch.bool)
        keep[32:48] = True
        keep[query - 15 : query + 1] = True
        expected = torch.softmax(logits.masked_fill(~keep, float("-inf")), -1) @ v[0, 0]
        torch.testing.assert_close(out[0, query], expected, rtol=0, atol=1e-5)


def test_pooling_and_aligned_chunks():
    query = torch.arange(10.0).view(1, 10, 1)
    pooled = pool_query_blocks(query, first_position=6, query_block_size=4)  # positions 6..15: blocks 1, 2, 3
    torch.testing.assert_close(pooled.flatten(), torch.tensor([0.5, 3.5, 7.5]))
    assert aligned_chunks(6, 10, chunk=5, query_block_size=4) == [(0, 2), (2, 6), (6, 10)]
    assert aligned_chunks(0, 10, chunk=4, query_block_size=None) == [(0, 4), (4, 8), (8, 10)]


def test_flex_backend_refuses_what_it_cannot_compute():
    mod = module(attention_backend="flex")
    q, k, v = torch.randn(1, H, 8, D), torch.randn(1, HKV, 8, D), torch.randn(1, HKV, 8, D)
    with pytest.raises(ValueError, match="attention_backend='flex'.*CUDA"):
        sparsemem_attention_forward(mod, q, k, v, None, scaling=D**-0.5)


@pytest.mark.parametrize("total", [1, 77, 160, 203])
@pytest.mark.parametrize("with_slots", [False, True])
@pytest.mark.parametrize("scorer", SCORERS, ids=lambda s: s["scorer"])
def test_block_decode_equals_reference(total, with_slots, scorer):
    """The decode path (gather variant; the Triton kernel is checked on GPU) against the reference."""
    from sparsemem.modeling.block_decode import BlockSummaryCache, block_decode_attention

    torch.manual_seed(total)
    mod = module(top_k_blocks=2, block_fraction=0.3, **scorer)
    k, v = torch.randn(B, HKV, total, D), torch.randn(B, HKV, total, D)
    q = torch.randn(B, H, 1, D)
    slots = random_slots(total, mod.config.block_size) if with_slots and total > 1 else None
    positions = torch.arange(total)
    ref, _ = sparsemem_attention_forward(mod, q, k, v, None, scaling=D**-0.5, sparsemem=MemoryView(positions[-1:], positions, slots))
    cache = BlockSummaryCache(mod.config.block_size, mod.scorer.sub_block)
    cache.update(k[:, :, : max(1, total - 40)])  # summaries built incrementally over earlier steps
    out, attended = block_decode_attention(q, k, v, D**-0.5, mod.scorer, fast_options(mod), cache, slots, use_triton=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)
    assert float(attended) == float(mod.sparsemem_stats.attended["decode"])


def test_summary_cache_follows_appends_and_resets():
    from sparsemem.modeling.block_decode import BlockSummaryCache
    from sparsemem.modeling.scorer import summarize_contiguous_blocks

    torch.manual_seed(0)
    keys = torch.randn(1, 2, 300, D)
    cache = BlockSummaryCache(16)
    for total in (5, 16, 17, 100, 300, 40):  # the last one is a crop: rebuilt from scratch
        got = cache.update(keys[:, :, :total])
        want = summarize_contiguous_blocks(keys[:, :, :total], 16, math.ceil(total / 16))
        for name in ("key_min", "key_max", "key_mean", "count"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=1e-6)


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.9, None])
@pytest.mark.parametrize("top_k", [1, 4, 40])
def test_select_blocks_keeps_the_best_ranked_candidates(fraction, top_k):
    """The top-k selection against its definition: a row keeps the candidates ranked below its budget."""
    from sparsemem.modeling.selection import select_blocks

    gen = torch.Generator().manual_seed(top_k)
    scores = torch.randn(2, 3, 5, 37, generator=gen)
    candidates = torch.rand(1, 1, 5, 37, generator=gen) < 0.7
    got = select_blocks(scores, candidates, top_k, fraction)
    count = candidates.expand_as(scores).sum(-1, keepdim=True)
    budget = torch.ceil(count * fraction).clamp(min=top_k) if fraction is not None else torch.full_like(count, top_k)
    rank = scores.masked_fill(~candidates, float("-inf")).argsort(dim=-1, descending=True).argsort(dim=-1)
    assert torch.equal(got, (rank < budget) & candidates)


def test_block_lists_are_a_stable_partition():
    gen = torch.Generator().manual_seed(0)
    for density in (0.0, 0.2, 0.7, 1.0):
        flags = torch.rand(2, 3, 5, 37, generator=gen) < density
        counts, order = block_sparse.block_lists(flags, 2)
        want = torch.argsort(flags.to(torch.uint8), dim=-1, descending=True, stable=True).to(torch.int32)
        assert torch.equal(order.view(2, 3, 2, 5, 37)[:, :, 1], want)
        assert torch.equal(counts.view(2, 3, 2, 5)[:, :, 0], flags.sum(-1, dtype=torch.int32))


@pytest.mark.parametrize("total", [77, 203, 700])
def test_decode_kernels_equal_reference_in_the_triton_interpreter(total, monkeypatch):
    """The Triton decode kernels (scores, tiles, merge) run on CPU tensors through Triton's interpreter
    where Triton is installed; on GPU machines test_gpu.py runs them compiled."""
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("set TRITON_INTERPRET=1 to run the Triton kernels on the CPU")
    from sparsemem.modeling.block_decode import BlockSummaryCache, block_decode_attention

    torch.manual_seed(total)
    mod = module(top_k_blocks=2, block_fraction=0.3, scorer="minmax")
    k, v, q = torch.randn(B, HKV, total, D), torch.randn(B, HKV, total, D), torch.randn(B, H, 1, D)
    positions = torch.arange(total)
    ref, _ = sparsemem_attention_forward(mod, q, k, v, None, scaling=D**-0.5, sparsemem=MemoryView(positions[-1:], positions, None))
    cache = BlockSummaryCache(mod.config.block_size)
    cache.update(k[:, :, : total - 40])
    out, attended = block_decode_attention(q, k, v, D**-0.5, mod.scorer, fast_options(mod), cache, None, use_triton=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)
    assert float(attended) == float(mod.sparsemem_stats.attended["decode"])
