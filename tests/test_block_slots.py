"""`block_slots`: every complete block is also consolidated into a few learned slots that answer it for
the queries that do not select it (block_consolidation.py), trained in phase 1 (objectives.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import fast_and_reference_on_the_gpu, make_base_model, perturb_learned_modules, whole_and_stepwise_logits

import sparsemem
from sparsemem.modeling.block_consolidation import BlockConsolidator, block_slots, complete_blocks
from sparsemem.training.objectives import DISTILL_ATTENTION, ScorerDistillation, distilling, register_distillation_attention
from sparsemem.training.trainer import attention_modules, learned_modules

OPTIONS = dict(block_size=8, sink_tokens=4, local_tokens=16, top_k_blocks=2, block_fraction=None)


def _kl(logits, reference):
    return float(F.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean"))


def test_untrained_slots_are_the_segment_means():
    consolidator = BlockConsolidator(num_kv_heads=2, head_dim=4, block_size=8, slots_per_block=2)
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 2, 3, 8, 4, generator=generator), torch.randn(1, 2, 3, 8, 4, generator=generator)
    slot_keys, slot_values, beta = consolidator(keys, values)
    # slot j: the mean of the j-th half of the block (the other half leaks in with weight ~e^-8 each)
    torch.testing.assert_close(slot_keys, keys.view(1, 2, 3, 2, 4, 4).mean(-2), atol=3e-3, rtol=0)
    torch.testing.assert_close(slot_values, values.view(1, 2, 3, 2, 4, 4).mean(-2), atol=3e-3, rtol=0)
    torch.testing.assert_close(beta, torch.full_like(beta, math.log(4)))


def test_slots_of_an_evicted_layer_cover_only_complete_blocks():
    consolidator = perturb_learned_modules(torch.nn.ModuleList([BlockConsolidator(2, 4, 4, 1)]))[0]
    generator = torch.Generator().manual_seed(1)
    key, value = torch.randn(1, 2, 16, 4, generator=generator), torch.randn(1, 2, 16, 4, generator=generator)
    whole = block_slots(consolidator, key, value)
    # position 5 evicted: block 1 is held in part and gets no slots; blocks 0, 2, 3 keep theirs
    keep = torch.arange(16) != 5
    holed = block_slots(consolidator, key[:, :, keep], value[:, :, keep], torch.arange(16)[keep])
    ids, starts = complete_blocks(torch.arange(16)[keep], 4)
    assert ids.tolist() == [0, 2, 3] and starts.tolist() == [0, 7, 11]
    same = whole.block != 1
    torch.testing.assert_close(holed.keys, whole.keys[:, same])
    torch.testing.assert_close(holed.values, whole.values[:, same])
    assert holed.block.tolist() == whole.block[same].tolist() and holed.head.tolist() == whole.head[same].tolist()
    assert holed.position.tolist() == [3, 11, 15, 3, 11, 15]  # seen by the queries after a block's last key


def test_one_slot_per_token_answers_unselected_blocks_almost_exactly(family):
    """With as many slots as tokens, untrained slots are the block's own keys (beta 0): the unselected
    complete blocks then count as if attended, so the model comes close to dense where dropping them does not."""
    base = make_base_model(family)
    ids = torch.randint(3, 256, (1, 160), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = base(ids).logits[0]
        dropped = sparsemem.convert(base, **OPTIONS)(ids).logits[0]
        answered = sparsemem.convert(base, **OPTIONS, block_slots=8)(ids).logits[0]
        half = sparsemem.convert(base, **OPTIONS, block_slots=2)(ids).logits[0]
    kl_dropped, kl_answered, kl_half = _kl(dropped, dense), _kl(answered, dense), _kl(half, dense)
    assert kl_answered < 0.2 * kl_dropped  # what is left: edge blocks half inside a query's window (or Mistral's sliding window)
    assert kl_half < kl_dropped  # segment means help too (on random weights nearly as much)


def test_block_slots_prefill_equals_decode_and_are_cached(family):
    base = make_base_model(family)
    model = perturb_learned_modules(sparsemem.convert(base, **OPTIONS, scorer="learned", scorer_dim=8, block_slots=2))
    ids = torch.randint(3, 256, (1, 120), generator=torch.Generator().manual_seed(2))
    whole, stepwise = whole_and_stepwise_logits(model, ids, prefill=70)
    torch.testing.assert_close(stepwise, whole, atol=2e-4, rtol=2e-4)
    cache = sparsemem.SparseMemCache(model.config)
    with torch.no_grad():
        model(ids[:, :70], past_key_values=cache)
        model(ids[:, 70:75], past_key_values=cache)
    layer = cache.layers[0]
    assert layer.block_slot_cache.complete == 75 // 8
    assert len(layer.block_slot_cache.slots) == (75 // 8) * 2 * base.config.num_key_value_heads


def test_phase1_trains_the_consolidator():
    """The phase-1 slot loss (error with slots over error with unselected blocks dropped) falls with training."""
    register_distillation_attention()
    base = make_base_model("llama")
    with torch.no_grad():  # sharper attention than random weights give: the segment means then fall short
        for layer in base.model.layers:
            layer.self_attn.q_proj.weight.mul_(3.0)
            layer.self_attn.k_proj.weight.mul_(3.0)
    model = sparsemem.convert(base, **OPTIONS, scorer="learned", scorer_dim=8, block_slots=2)
    model.requires_grad_(False)
    for module in learned_modules(model):
        module.requires_grad_(True)
    consolidators = [m.consolidator for m in attention_modules(model)]
    optimizer = torch.optim.Adam([p for m in consolidators for p in m.parameters()], lr=3e-2)
    ids = torch.randint(3, 256, (2, 160), generator=torch.Generator().manual_seed(3))
    config = model.config
    ratios = []
    for step in range(30):
        collector = ScorerDistillation(config, 48, torch.Generator().manual_seed(step % 3))
        config._attn_implementation = DISTILL_ATTENTION
        try:
            with torch.no_grad(), distilling(collector):
                model(ids, use_cache=False)
        finally:
            config._attn_implementation = "sparsemem"
        loss = collector.slot_loss()
        ratios.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert 0 < ratios[0] < 1  # untrained slots already beat dropping the unselected blocks
    # the same three query samples open and close the run
    assert sum(ratios[-3:]) / 3 < 0.92 * sum(ratios[:3]) / 3
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in consolidators[0].parameters())


def test_block_slots_travel_with_the_modules_and_are_checked():
    model = perturb_learned_modules(sparsemem.convert(make_base_model("qwen3"), **OPTIONS, block_slots=2))
    state = model.sparsemem_module_state_dict()
    assert any(".consolidator.segment_logits" in key for key in state)
    fresh = sparsemem.convert(make_base_model("qwen3"), **OPTIONS, block_slots=2)
    fresh.load_sparsemem_modules(state)
    ids = torch.randint(3, 256, (1, 100), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits)
    for bad in (0, 9, 1.5):
        with pytest.raises(ValueError, match="block_slots"):
            sparsemem.convert(make_base_model("llama"), **OPTIONS, block_slots=bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_block_slots_fast_paths_equal_reference_on_the_gpu():
    """Block-sparse prefill (FlexAttention) and the decode kernel with block slots, against the reference path."""
    base = make_base_model("llama", max_position_embeddings=4096).to("cuda", torch.bfloat16)
    options = dict(block_size=128, query_block_size=128, sink_tokens=16, local_tokens=200, top_k_blocks=2,
                   block_fraction=None, block_slots=4, query_chunk_size=256)
    ids = torch.randint(3, 256, (1, 1500), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    results = fast_and_reference_on_the_gpu(base, options, ids, 1300)
    logits = {k: v[0] for k, v in results.items()}
    error = float((logits["auto"] - logits["reference"]).norm() / logits["reference"].norm())
    assert error < 2e-2
