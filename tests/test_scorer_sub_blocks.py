"""The "subminmax" block scorer and its sub-block summaries against closed forms."""

import math

import pytest
import torch

from sparsemem.modeling.block_decode import BlockSummaryCache
from sparsemem.modeling.scorer import PooledKeyScorer, summarize_blocks, summarize_contiguous_blocks

B, HKV, G, Q, D = 2, 3, 2, 5, 16


def exact_block_max(query, keys, block_ids, num_blocks):
    """max over the group's query heads and the block's keys of q.k: [B, Hkv, Q, nb], -inf for empty blocks."""
    logits = torch.einsum("bhgqd,bhnd->bhqgn", query, keys).amax(3)  # [B, Hkv, Q, N]
    out = logits.new_full((*logits.shape[:-1], num_blocks), float("-inf"))
    return out.scatter_reduce(-1, block_ids.expand_as(logits), logits, "amax")


@pytest.mark.parametrize("total", [64, 77, 200])
def test_unit_sub_blocks_give_the_exact_max_and_whole_blocks_give_minmax(total):
    gen = torch.Generator().manual_seed(total)
    keys, query = torch.randn(B, HKV, total, D, generator=gen), torch.randn(B, HKV, G, Q, D, generator=gen)
    block_size = 16
    num_blocks = math.ceil(total / block_size) + 1  # one empty block past the keys
    block_ids = torch.arange(total) // block_size

    exact = PooledKeyScorer("subminmax", 1)(query, summarize_contiguous_blocks(keys, block_size, num_blocks, 1))
    torch.testing.assert_close(exact, exact_block_max(query, keys, block_ids, num_blocks), rtol=1e-5, atol=1e-5)

    whole = PooledKeyScorer("subminmax", block_size)(query, summarize_contiguous_blocks(keys, block_size, num_blocks, block_size))
    minmax = PooledKeyScorer("minmax")(query, summarize_contiguous_blocks(keys, block_size, num_blocks))
    torch.testing.assert_close(whole, minmax, rtol=1e-5, atol=1e-5)

    # in between: the best of the 4-token sub-blocks' minmax bounds, each computed as its own block
    fine = PooledKeyScorer("minmax")(query, summarize_contiguous_blocks(keys, 4, num_blocks * 4))
    want = fine.view(B, HKV, Q, num_blocks, 4).amax(-1)
    got = PooledKeyScorer("subminmax", 4)(query, summarize_contiguous_blocks(keys, block_size, num_blocks, 4))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (exact <= got + 1e-5).all() and (got <= minmax + 1e-5).all()  # tighter than minmax, still a bound
    assert torch.isinf(got[..., -1]).all() and torch.isfinite(got[..., :-1]).all()


def test_sub_block_summaries_after_eviction():
    """Keys with gaps (evicted entries): sub-blocks are read from the logical positions."""
    gen = torch.Generator().manual_seed(0)
    positions = torch.tensor([0, 1, 2, 9, 10, 17, 30, 31, 40, 47, 48, 63])
    keys, query = torch.randn(B, HKV, positions.numel(), D, generator=gen), torch.randn(B, HKV, G, Q, D, generator=gen)
    block_ids = positions // 16
    summaries = summarize_blocks(keys, block_ids, 4, positions, 16, 1)
    exact = exact_block_max(query, keys, block_ids, 4)
    torch.testing.assert_close(PooledKeyScorer("subminmax", 1)(query, summaries), exact, rtol=1e-5, atol=1e-5)
    # the same sub-block extrema as the contiguous summaries of the keys put back at their positions
    summaries = summarize_blocks(keys, block_ids, 4, positions, 16, 4)
    want = torch.full_like(summaries.sub_max, float("-inf")).view(B, HKV, 16, D)
    for index, position in enumerate(positions.tolist()):
        want[:, :, position // 4] = torch.maximum(want[:, :, position // 4], keys[:, :, index])
    assert torch.equal(summaries.sub_max, want.view_as(summaries.sub_max))
    assert summaries.sub_count.tolist() == [[3, 0, 2, 0], [1, 0, 0, 2], [0, 0, 1, 1], [1, 0, 0, 1]]
    torch.testing.assert_close(summaries.key_max, summarize_blocks(keys, block_ids, 4).key_max)


def test_summary_cache_keeps_sub_blocks_across_appends():
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 2, 300, D, generator=gen)
    cache = BlockSummaryCache(32, sub_block=8)
    for total in (5, 32, 33, 100, 300, 40):  # the last one is a crop: rebuilt from scratch
        got = cache.update(keys[:, :, :total])
        want = summarize_contiguous_blocks(keys[:, :, :total], 32, math.ceil(total / 32), 8)
        assert got.sub_block == 8
        for name in ("key_min", "key_max", "key_mean", "count", "sub_min", "sub_max", "sub_count"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=1e-6)


def test_bad_sub_block_values_raise_named_errors():
    with pytest.raises(ValueError, match="scorer_sub_block"):
        PooledKeyScorer("subminmax")
    with pytest.raises(ValueError, match="scorer_sub_block"):
        PooledKeyScorer("subminmax", 0)
    with pytest.raises(ValueError, match="scorer_sub_block.*subminmax"):
        PooledKeyScorer("minmax", 8)
    with pytest.raises(ValueError, match="scorer"):
        PooledKeyScorer("oracle")
    with pytest.raises(ValueError, match="scorer_sub_block.*divide"):
        summarize_contiguous_blocks(torch.randn(1, 1, 20, D), 16, 2, 6)
    with pytest.raises(ValueError, match="scorer_sub_block.*divide"):
        BlockSummaryCache(16, sub_block=5)
    keys, query = torch.randn(1, 1, 32, D), torch.randn(1, 1, 1, 1, D)
    with pytest.raises(ValueError, match="sub_block=4"):  # summaries without (or with other) sub-blocks
        PooledKeyScorer("subminmax", 4)(query, summarize_contiguous_blocks(keys, 16, 2))
    with pytest.raises(ValueError, match="sub_block=4"):
        PooledKeyScorer("subminmax", 4)(query, summarize_contiguous_blocks(keys, 16, 2, 8))


def test_reference_path_over_evicted_keys_with_whole_sub_blocks_equals_minmax():
    """Sub-blocks as large as the block: the "subminmax" selection is the "minmax" one, with gaps in the keys."""
    from types import SimpleNamespace

    from sparsemem.modeling.attention import MemoryView, sparsemem_attention_forward

    gen = torch.Generator().manual_seed(2)
    keep = torch.rand(160, generator=gen) < 0.7
    keep[-8:] = True
    positions = torch.arange(160)[keep]
    q = torch.randn(1, 4, 8, D, generator=gen)
    k, v = torch.randn(1, 2, positions.numel(), D, generator=gen), torch.randn(1, 2, positions.numel(), D, generator=gen)
    outputs = []
    for scorer in (PooledKeyScorer("minmax"), PooledKeyScorer("subminmax", 16), PooledKeyScorer("subminmax", 2)):
        config = SimpleNamespace(block_size=16, sink_tokens=4, local_tokens=8, top_k_blocks=2, block_fraction=None,
                                 query_chunk_size=4, attention_backend="reference")
        view = MemoryView(positions[-8:], positions, None, None, contiguous=False)
        out, _ = sparsemem_attention_forward(SimpleNamespace(config=config, scorer=scorer), q, k, v, None, D**-0.5, sparsemem=view)
        assert torch.isfinite(out).all()
        outputs.append(out)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    assert not torch.allclose(outputs[2], outputs[0])  # finer sub-blocks select other blocks here


def test_model_with_whole_sub_blocks_generates_as_minmax():
    """A converted model: "subminmax" with `scorer_sub_block=block_size` is "minmax", prefill and decode."""
    import sparsemem
    from conftest import make_base_model

    base = make_base_model("llama")
    options = dict(block_size=8, top_k_blocks=2, block_fraction=None, local_tokens=8, sink_tokens=4)
    minmax = sparsemem.convert(base, scorer="minmax", **options)
    sub = sparsemem.convert(base, scorer="subminmax", scorer_sub_block=8, **options)
    finer = sparsemem.convert(base, scorer="subminmax", scorer_sub_block=2, **options)
    assert (sub.model.layers[0].self_attn.scorer.sub_block, sub.config.scorer_sub_block) == (8, 8)
    ids = torch.randint(3, 256, (1, 90), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(sub(ids).logits, minmax(ids).logits, rtol=0, atol=0)
        assert not torch.allclose(finer(ids).logits, minmax(ids).logits)
        kwargs = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
        assert torch.equal(sub.generate(ids, **kwargs), minmax.generate(ids, **kwargs))
