"""Model classes against their dense base models, for the four families."""

import pytest
import torch
from conftest import make_base_model

import sparsemem

DENSE_OPTIONS = dict(top_k_blocks=None, block_size=8, sink_tokens=2, local_tokens=8)


def _ids(batch, length, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (batch, length), generator=generator)


@torch.no_grad()
def test_dense_equivalent_prefill_and_generation(family):
    base = make_base_model(family)
    sparse = sparsemem.convert(base, **DENSE_OPTIONS)
    assert sparse.config._attn_implementation == "sparsemem"
    ids = _ids(2, 120)  # longer than the Mistral/Qwen2 sliding window of 48
    diff = (base(ids).logits - sparse(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff
    expected = base.generate(ids[:, :60], attention_mask=torch.ones(2, 60), max_new_tokens=32, do_sample=False)
    got = sparse.generate(ids[:, :60], attention_mask=torch.ones(2, 60), max_new_tokens=32, do_sample=False)
    assert torch.equal(expected, got)


@torch.no_grad()
def test_left_padded_batch_matches_dense(family):
    base = make_base_model(family)
    sparse = sparsemem.convert(base, **DENSE_OPTIONS)
    ids = _ids(3, 70, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    mask[2, :40] = 0
    ids = ids.masked_fill(mask == 0, base.config.pad_token_id)
    expected = base.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    got = sparse.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    assert torch.equal(expected, got)
    # and each padded row equals that row run alone without padding
    alone = sparse.generate(ids[2:, 40:], max_new_tokens=16, do_sample=False)
    assert torch.equal(got[2, 40:], alone[0])


@torch.no_grad()
def test_sparse_mode_differs_from_dense_and_reports_density():
    base = make_base_model("llama")
    sparse = sparsemem.convert(base, top_k_blocks=2, block_fraction=None, block_size=8, sink_tokens=2, local_tokens=8)
    ids = _ids(1, 200)
    diff = (base(ids).logits - sparse(ids).logits).abs().max().item()
    assert diff > 1e-3  # blocks really are skipped
    stats = sparse.sparsemem_stats()
    # every query attends at most 2 sink + 8 local + 2 blocks of 8 (+ partial anchor blocks) = 26 keys
    per_query = [min(p + 1, 26) for p in range(200)]
    assert stats["prefill_density"] <= sum(per_query) / sum(range(1, 201)) + 1e-9
    assert 0 < stats["prefill_density"] < 0.5


@torch.no_grad()
def test_plain_model_with_sparsemem_attention_implementation():
    """`attn_implementation="sparsemem"` on a plain transformers model uses the default options."""
    base = make_base_model("llama")
    ids = _ids(1, 150)
    base.set_attn_implementation("sparsemem")
    plain = base(ids).logits
    base.set_attn_implementation("eager")
    converted = sparsemem.convert(base)(ids).logits
    torch.testing.assert_close(plain, converted, rtol=0, atol=1e-5)


@torch.no_grad()
def test_dense_implementations_on_a_sparsemem_model():
    base = make_base_model("qwen3")
    sparse = sparsemem.convert(base, top_k_blocks=1)
    ids = _ids(1, 90)
    sparse.set_attn_implementation("sdpa")
    torch.testing.assert_close(sparse(ids).logits, base(ids).logits, rtol=0, atol=1e-4)


def test_convert_shares_weights():
    base = make_base_model("qwen2")
    sparse = sparsemem.convert(base)
    assert sparse.model.layers[0].self_attn.q_proj.weight is base.model.layers[0].self_attn.q_proj.weight
    assert sparse.lm_head.weight.data_ptr() == base.lm_head.weight.data_ptr()
    assert sparse.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2 q/k/v bias kept
