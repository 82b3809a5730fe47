"""SparseMemCache: logical positions, tier edits, crop/batch ops, byte report."""

import pytest
import torch
from conftest import make_base_model

import sparsemem
from sparsemem import SlotTier, SparseMemCache

OPTIONS = dict(top_k_blocks=None, block_size=8, sink_tokens=2, local_tokens=8)


def _ids(length, batch=1, seed=0):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _replace_block_by_exact_slots(cache, first, last):
    """Evict positions first..last of every layer and add them back as slots (beta = 0): exact."""
    for layer in cache.layers:
        span = (layer.positions >= first) & (layer.positions <= last)
        count = int(span.sum())
        layer.add_slots(
            SlotTier.from_heads(
                keys=layer.keys[:, :, span].clone(),
                values=layer.values[:, :, span].clone(),
                beta=torch.zeros(layer.keys.shape[0], layer.keys.shape[1], count),
                block=torch.full((count,), -1),
                position=torch.full((count,), last),
            )
        )
        layer.evict(span)


@torch.no_grad()
def test_positions_stay_logical_after_eviction(family):
    base = make_base_model(family)
    sparse = sparsemem.convert(base, **OPTIONS)
    ids = _ids(45)
    cache = SparseMemCache(sparse.config)
    sparse(ids[:, :40], past_key_values=cache)
    _replace_block_by_exact_slots(cache, 8, 23)
    assert cache.get_seq_length() == 40 and cache.physical_lengths() == [24, 24]
    got = sparse(ids[:, 40:], past_key_values=cache).logits
    expected = base(ids).logits[:, 40:]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert cache.get_seq_length() == 45


@torch.no_grad()
def test_dense_implementation_refuses_a_compacted_cache():
    sparse = sparsemem.convert(make_base_model("llama"), **OPTIONS)
    cache = SparseMemCache(sparse.config)
    ids = _ids(30)
    sparse(ids[:, :25], past_key_values=cache)
    _replace_block_by_exact_slots(cache, 8, 15)
    sparse.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="sparsemem"):
        sparse(ids[:, 25:], past_key_values=cache)


@torch.no_grad()
def test_crop_then_continue_equals_a_fresh_run():
    sparse = sparsemem.convert(make_base_model("mistral"), **OPTIONS)
    ids = _ids(60)
    cache = SparseMemCache(sparse.config)
    sparse(ids[:, :50], past_key_values=cache)
    cache.crop(-10)
    assert cache.get_seq_length() == 40
    got = sparse(ids[:, 40:], past_key_values=cache).logits
    torch.testing.assert_close(got, sparse(ids).logits[:, 40:], rtol=0, atol=1e-5)
    _replace_block_by_exact_slots(cache, 8, 23)
    with pytest.raises(ValueError, match="slot"):
        cache.crop(20)


@torch.no_grad()
def test_batch_select_and_beam_search():
    base = make_base_model("qwen3")
    sparse = sparsemem.convert(base, **OPTIONS)
    ids = _ids(30, batch=2)
    cache = SparseMemCache(sparse.config)
    sparse(ids[:, :25], past_key_values=cache)
    cache.batch_select_indices(torch.tensor([1]))
    got = sparse(ids[1:, 25:], past_key_values=cache).logits
    torch.testing.assert_close(got, base(ids[1:]).logits[:, 25:], rtol=0, atol=1e-4)
    beams = dict(max_new_tokens=8, num_beams=3, do_sample=False, attention_mask=torch.ones(2, 20, dtype=torch.long))
    assert torch.equal(base.generate(ids[:, :20], **beams), sparse.generate(ids[:, :20], **beams))


@torch.no_grad()
def test_memory_bytes_per_tier():
    sparse = sparsemem.convert(make_base_model("llama"), **OPTIONS)  # 2 layers, 2 KV heads, head dim 16, fp32
    cache = SparseMemCache(sparse.config)
    sparse(_ids(64), past_key_values=cache)
    per_token = 2 * 2 * 16 * 4  # K and V, 2 heads, 16 dims, 4 bytes
    assert cache.memory_bytes() == {
        "anchors": 2 * 10 * per_token,
        "block_store": 2 * 54 * per_token,
        "slots": 0,
        "total": 2 * 64 * per_token,
    }
    _replace_block_by_exact_slots(cache, 8, 15)
    report = cache.memory_bytes()
    assert report["block_store"] == 2 * 46 * per_token
    assert report["slots"] == 2 * 8 * (per_token + 2 * 4)  # keys, values and one beta per KV head


def test_slot_validation():
    good = dict(keys=torch.zeros(1, 3, 4), values=torch.zeros(1, 3, 4), beta=torch.zeros(1, 3), head=torch.zeros(3, dtype=torch.long),
                block=torch.full((3,), -1), position=torch.zeros(3, dtype=torch.long))
    SlotTier(**good)
    with pytest.raises(ValueError, match="beta"):
        SlotTier(**{**good, "beta": torch.zeros(1, 4)})
    with pytest.raises(ValueError, match="non-finite"):
        SlotTier(**{**good, "keys": torch.full((1, 3, 4), float("nan"))})
    with pytest.raises(ValueError, match="beta"):
        SlotTier(**{**good, "beta": torch.full((1, 3), float("nan"))})


def test_offloaded_block_store_needs_a_cuda_model():
    from conftest import make_base_model

    model = sparsemem.convert(make_base_model("llama"))
    cache = sparsemem.SparseMemCache(model.config, offload_blocks=True)
    with pytest.raises(ValueError, match="offload_blocks"):
        model(torch.randint(3, 100, (1, 12)), past_key_values=cache)
