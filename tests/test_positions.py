"""RoPE position policies: re-rotating held keys to their ranks in the cache (`positions="cache"`/"auto")."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

import sparsemem
from sparsemem.modeling.cache import SparseMemLayer
from sparsemem.modeling.slots import SlotTier
from sparsemem.modeling.online_compaction import OnlineCompaction
from sparsemem.modeling.rope import shift_keys, trained_context

from conftest import make_base_model

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
}


def _rotary(rope: str):
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=512, rope_parameters=dict(ROPES[rope]))
    return LlamaRotaryEmbedding(config=config), config


def _rotate(rotary, raw: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`raw` [B, H, n, D] rotated at `positions` [n] as the model does it."""
    cos, sin = rotary(raw, positions[None])
    return apply_rotary_pos_emb(raw, raw, cos, sin)[1]


@pytest.mark.parametrize("rope", list(ROPES))
def test_shifting_a_key_equals_computing_it_at_the_shifted_position(rope):
    rotary, _ = _rotary(rope)
    raw = torch.randn(1, 2, 50, 16, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(150, 200)
    delta = -torch.arange(50) * 3 - 1  # a different shift for every key
    shifted = shift_keys(rotary, _rotate(rotary, raw, positions), delta)
    # fp32 RoPE itself rounds its angles (position x frequency) by up to ~1e-5 rad at these positions
    torch.testing.assert_close(shifted, _rotate(rotary, raw, positions + delta), atol=3e-5, rtol=0)
    # shifting back and forth is the identity
    torch.testing.assert_close(shift_keys(rotary, shifted, -delta), _rotate(rotary, raw, positions), atol=3e-6, rtol=0)


@pytest.mark.parametrize("rope", ["default", "llama3"])
def test_laid_out_cache_attends_like_keys_computed_at_their_ranks(rope):
    """Sinks 0-3 and tokens 24-39 stay exact; tokens 4-23 are replaced by slots (5 for KV head 0, 3 for head
    1) chosen among them. Laid out, the sinks take ranks 0-3, the slot group ranks 4-8 (head 1's three slots
    at its end, 6-8), the exact tokens 9-24; a query at rank 25 then attends as if every key had been computed
    at its rank."""
    rotary, _ = _rotary(rope)
    gen = torch.Generator().manual_seed(1)
    raw, values = torch.randn(1, 2, 40, 16, generator=gen), torch.randn(1, 2, 40, 16, generator=gen)
    logical = torch.arange(40)
    layer = SparseMemLayer()
    layer.update(_rotate(rotary, raw, logical), values)
    chosen = {0: torch.tensor([5, 9, 12, 20, 23]), 1: torch.tensor([4, 15, 22])}
    slot_keys = torch.cat([_rotate(rotary, raw, logical)[:, h, chosen[h]] for h in (0, 1)], dim=1)
    slot_values = torch.cat([values[:, h, chosen[h]] for h in (0, 1)], dim=1)
    beta = torch.randn(1, 8, generator=gen)
    head = torch.tensor([0] * 5 + [1] * 3)
    layer.add_slots(SlotTier(slot_keys, slot_values, beta, head, torch.full((8,), -1), torch.full((8,), 23),
                             torch.cat([chosen[0], chosen[1]])[None]))
    layer.evict((logical >= 4) & (logical < 24))
    assert layer.timeline_width() == 4 + 5 + 16
    layer.lay_out_positions(25, rotary)

    held = torch.cat([torch.arange(4), torch.arange(24, 40)])
    expected_exact = _rotate(rotary, raw[:, :, held], torch.cat([torch.arange(4), torch.arange(9, 25)]))
    torch.testing.assert_close(layer.keys, expected_exact, atol=1e-5, rtol=0)
    slot_ranks = {0: torch.arange(4, 9), 1: torch.arange(6, 9)}
    expected_slots = torch.cat([_rotate(rotary, raw[:, h : h + 1, chosen[h]], slot_ranks[h])[:, 0] for h in (0, 1)], dim=1)
    torch.testing.assert_close(layer.slots.keys, expected_slots, atol=1e-5, rtol=0)
    assert layer.slots.rope[0].tolist() == [4, 5, 6, 7, 8, 6, 7, 8]
    assert layer.rope_offset == 40 - 25

    # attention of a new query at rank 25 over both tiers, against keys computed at the ranks from scratch
    query = _rotate(rotary, torch.randn(1, 2, 1, 16, generator=gen), torch.tensor([25]))
    def attend(exact_keys, slot_keys):
        outs = []
        for h in (0, 1):
            own = head == h
            keys = torch.cat([slot_keys[:, own], exact_keys[:, h]], dim=1)
            bias = torch.cat([beta[:, own], torch.zeros(1, exact_keys.shape[2])], dim=1)
            weights = torch.softmax(query[:, h] @ keys.transpose(-1, -2) * 0.25 + bias[:, None], dim=-1)
            outs.append(weights @ torch.cat([slot_values[:, own], values[:, h, held]], dim=1))
        return torch.stack(outs)
    torch.testing.assert_close(attend(layer.keys, layer.slots.keys), attend(expected_exact, expected_slots), atol=1e-5, rtol=0)


def _stream_logits(model, ids, budget, chunk, method="am", positions=None):
    online = OnlineCompaction(budget, keep_first=4, method=method)
    cache = sparsemem.SparseMemCache(model.config, online=online, positions=positions)
    with torch.no_grad():
        logits = [model(ids[:, s : s + chunk], past_key_values=cache).logits for s in range(0, ids.shape[1], chunk)]
    return torch.cat(logits, dim=1), cache


def test_auto_equals_logical_inside_the_trained_window():
    model = sparsemem.convert(make_base_model("llama", max_position_embeddings=1024), top_k_blocks=None)
    ids = torch.randint(3, 256, (1, 300), generator=torch.Generator().manual_seed(2))
    auto, cache = _stream_logits(model, ids, budget=64, chunk=20, positions="auto")
    logical, _ = _stream_logits(model, ids, budget=64, chunk=20, positions="logical")
    assert online_compacted(cache)
    assert torch.equal(auto, logical)
    # the option is honoured: cache positions differ once entries have left
    ranked, ranked_cache = _stream_logits(model, ids, budget=64, chunk=20, positions="cache")
    assert not torch.allclose(ranked, logical, atol=1e-4)
    assert ranked_cache.rope_offset > 0


def online_compacted(cache) -> bool:
    return cache.online.compactions > 0 and all(layer.slots is not None for layer in cache.layers)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_beyond_the_window_auto_keeps_every_distance_in_range(family):
    model = sparsemem.convert(make_base_model(family, max_position_embeddings=96), top_k_blocks=None)
    assert trained_context(model.config) == 96
    ids = torch.randint(3, 256, (1, 400), generator=torch.Generator().manual_seed(3))
    logits, cache = _stream_logits(model, ids, budget=48, chunk=16)
    assert torch.isfinite(logits).all()
    assert cache.cache_positions and cache.get_seq_length() == 400
    for layer in cache.layers:
        ranks = torch.cat([layer.rope_positions, layer.slots.rope[0]])
        next_position = layer.logical_length - layer.rope_offset
        # every held entry sits within the budget of the next token's position, in time order
        assert int(ranks.min()) >= 0 and int(ranks.max()) < next_position <= 48 + 16
        assert torch.equal(layer.rope_positions, torch.sort(layer.rope_positions).values)
    _, logical_cache = _stream_logits(model, ids, budget=48, chunk=16, positions="logical")
    assert not logical_cache.cache_positions and logical_cache.rope_offset == 0


def test_compacted_document_keeps_its_positions_across_save_and_load(tmp_path):
    model = sparsemem.convert(make_base_model("llama", max_position_embeddings=64), top_k_blocks=None, positions="cache")
    ids = torch.randint(3, 256, (1, 160), generator=torch.Generator().manual_seed(4))
    _, cache = _stream_logits(model, ids[:, :150], budget=48, chunk=10)
    cache.online = None  # a saved document is read without a budget
    sparsemem.save_document(cache, model, tmp_path / "doc")
    loaded = sparsemem.load_document(tmp_path / "doc", model)
    assert loaded.positions == "cache" and loaded.cache_positions
    for a, b in zip(cache.layers, loaded.layers):
        assert torch.equal(a.rope_positions, b.rope_positions) and a.rope_offset == b.rope_offset
        assert torch.equal(a.slots.rope, b.slots.rope)
    with torch.no_grad():
        expected = model(ids[:, 150:], past_key_values=cache).logits
        got = model(ids[:, 150:], past_key_values=loaded).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_bad_position_options_raise_naming_the_option():
    base = make_base_model("llama")
    with pytest.raises(ValueError, match="positions"):
        sparsemem.convert(base, positions="relative")
    model = sparsemem.convert(base)
    with pytest.raises(ValueError, match="positions"):
        sparsemem.SparseMemCache(model.config, positions="rank")
    dynamic = make_base_model("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match="rope_type"):
        sparsemem.convert(dynamic, positions="cache")(torch.tensor([[5, 6]]))
    # logical positions need no re-rotation: dynamic RoPE is fine there
    sparsemem.convert(dynamic, positions="logical")(torch.tensor([[5, 6]]))


def test_generation_under_a_budget_past_the_window_uses_cache_positions():
    """generate() under online compaction (a cache with max_kv_tokens) follows the policy: past the trained
    context the held entries sit at their ranks and every new token right after them."""
    model = sparsemem.convert(make_base_model("llama", max_position_embeddings=64), top_k_blocks=None)
    prompt = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(6))
    cache = sparsemem.SparseMemCache(model.config, max_kv_tokens=32)
    out = model.generate(prompt, past_key_values=cache, max_new_tokens=80, do_sample=False, min_new_tokens=80)
    assert out.shape[1] == 120 and cache.cache_positions
    for layer in cache.layers:
        next_position = layer.logical_length - layer.rope_offset
        ranks = torch.cat([layer.rope_positions, layer.slots.rope[0]])
        assert int(ranks.max()) < next_position <= 32 + 1


def test_learned_consolidation_refines_slots_where_the_layout_puts_them():
    """Under cache positions the closed form fits beta and values to the slot keys moved to where the
    layout will put them; the learned press must refine them there too and hand the keys back at the
    rotation they were chosen at. With no steps it returns the closed form's slots; with steps it is
    never worse on the held-out queries, measured at the placed keys."""
    from sparsemem.modeling.attention_matching import SpanProblem
    from sparsemem.modeling.compaction import HeadSpan, SlotPlacement
    from sparsemem.modeling.attention_matching_press import AttentionMatchingPress
    from sparsemem.modeling.consolidation import LearnedConsolidationPress, consolidation_loss

    rotary, _ = _rotary("default")
    generator = torch.Generator().manual_seed(4)
    raw = torch.randn(2, 60, 16, generator=generator)
    positions = torch.arange(60)
    keys = _rotate(rotary, raw[None], positions)[0]
    values = torch.randn(2, 60, 16, generator=generator)
    queries = _rotate(rotary, torch.randn(1, 2, 160, 16, generator=generator), torch.arange(300, 460))[0]
    logits = queries @ keys.transpose(-1, -2) * 0.25
    problem = SpanProblem(queries, keys, values, torch.zeros(2, 60), torch.logsumexp(logits, -1) + 0.5, 0.25)
    placement = SlotPlacement(rotary, end=250)  # far from where the keys were chosen
    span = HeadSpan(problem, positions, torch.full((160,), -1), positions[None].expand(2, -1), placement)
    closed = AttentionMatchingPress(exact_newest=0.0).compact(span, 10)
    same = LearnedConsolidationPress(exact_newest=0.0, steps=0, max_ratio=None).compact(span, 10)
    for got, want in zip(same, closed):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    learned = LearnedConsolidationPress(exact_newest=0.0, steps=40, max_ratio=None).compact(span, 10)
    held_out = torch.arange(160) % 4 == 0
    placed = lambda result: (placement.place(result[1], span.rope.gather(1, result[0])), result[2], result[3])  # noqa: E731
    before = consolidation_loss(problem, *placed(closed), held_out)
    after = consolidation_loss(problem, *placed(learned), held_out)
    assert bool((after < before).all())
