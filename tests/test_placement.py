"""Memory placement beyond the trained context (`memory_placement`): position-free selection, in-range distances."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

import sparsemem
from sparsemem.modeling.attention import MemoryView, sparsemem_attention_forward
from sparsemem.modeling.placement import Placement

from conftest import make_base_model

HEADS, KV_HEADS, DIM = 4, 2, 16
BLOCK, SINK, LOCAL = 8, 4, 16


def _rotary():
    config = LlamaConfig(hidden_size=64, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=DIM,
                         max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return LlamaRotaryEmbedding(config=config)


def _rotate(rotary, raw: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`raw` [B, H, n, D] rotated at `positions` [n] as the model does it (transformers' cos/sin)."""
    cos, sin = rotary(raw, positions[None])
    return apply_rotary_pos_emb(raw, raw, cos, sin)[1]


def _module(top_k):
    config = SimpleNamespace(block_size=BLOCK, sink_tokens=SINK, local_tokens=LOCAL, top_k_blocks=top_k,
                             block_fraction=None, scorer="minmax", query_chunk_size=2)
    return SimpleNamespace(config=config)


def _attend(scheme, rotary, q, k, v, q_pos, k_pos, key_rope, top_k):
    placement = None if scheme == "cache" else Placement(scheme, rotary, q_pos, key_rope, LOCAL, BLOCK)
    view = MemoryView(q_pos, k_pos, None, None, contiguous=True, placement=placement, fallback="placement")
    return sparsemem_attention_forward(_module(top_k), q, k, v, None, scaling=DIM**-0.5, sparsemem=view)[0]


def _inputs(keys=96, queries=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q_raw = torch.randn(1, HEADS, queries, DIM, generator=gen)
    k_raw, v = torch.randn(1, KV_HEADS, keys, DIM, generator=gen), torch.randn(1, KV_HEADS, keys, DIM, generator=gen)
    return q_raw, k_raw, v, torch.arange(keys - queries, keys), torch.arange(keys)


def _placed_distance(scheme, query_position, key_position) -> int | None:
    """The distance a key is attended at with every candidate block selected, written out by rule: None when the
    key is not attended (future), its own distance inside the local window, else the placement's."""
    if key_position > query_position:
        return None
    if key_position > query_position - LOCAL:
        return query_position - key_position
    if scheme == "fixed":
        return LOCAL
    # "ordered": attended blocks are those holding sinks or a visible key outside the local window
    attended = {p // BLOCK for p in range(query_position - LOCAL + 1)} | {p // BLOCK for p in range(SINK)}
    newer = sum(1 for block in attended if block > key_position // BLOCK)
    return LOCAL + newer * BLOCK + (BLOCK - 1 - key_position % BLOCK)


@pytest.mark.parametrize("scheme", ["fixed", "ordered"])
def test_placed_attention_equals_keys_computed_at_their_placed_distances(scheme):
    """Every candidate block selected: the output equals softmax attention in which each key outside the local
    window was computed by the model's rotary embedding at its placed distance from the query."""
    rotary = _rotary()
    q_raw, k_raw, v, q_pos, k_pos = _inputs()
    got = _attend(scheme, rotary, _rotate(rotary, q_raw, q_pos), _rotate(rotary, k_raw, k_pos), v, q_pos, k_pos, k_pos, 64)
    expected = []
    for i, p in enumerate(q_pos.tolist()):
        distances = [_placed_distance(scheme, p, j) for j in k_pos.tolist()]
        seen = torch.tensor([d is not None for d in distances])
        # the query at 0 and each key at minus its distance: transformers' rotation, not the shift under test
        keys = torch.stack([_rotate(rotary, k_raw[:, :, j : j + 1], torch.tensor([-(d or 0)]))[:, :, 0]
                            for j, d in enumerate(distances)], dim=2)
        query = _rotate(rotary, q_raw[:, :, i : i + 1], torch.tensor([0]))
        keys, values = keys.repeat_interleave(HEADS // KV_HEADS, 1), v.repeat_interleave(HEADS // KV_HEADS, 1)
        logits = (query @ keys.transpose(-1, -2) / math.sqrt(DIM)).masked_fill(~seen, float("-inf"))
        expected.append((torch.softmax(logits, -1) @ values).transpose(1, 2))
    torch.testing.assert_close(got, torch.cat(expected, dim=1), atol=2e-5, rtol=0)


@pytest.mark.parametrize("scheme", ["fixed", "ordered"])
def test_selection_and_attention_do_not_depend_on_where_far_memory_sits(scheme):
    """Two of nine candidate blocks selected. Moving every key outside the local windows 1000 positions
    further (as a block store longer than the trained context would) changes nothing once placed, and
    changes the output when the held positions are used ("cache")."""
    rotary = _rotary()
    q_raw, k_raw, v, q_pos, k_pos = _inputs(seed=1)
    q = _rotate(rotary, q_raw, q_pos)
    far = k_pos <= int(q_pos[0]) - LOCAL
    moved_rope = torch.where(far, k_pos - 1000, k_pos)
    near_keys, moved_keys = _rotate(rotary, k_raw, k_pos), _rotate(rotary, k_raw, moved_rope)
    for name in (scheme, "cache"):
        here = _attend(name, rotary, q, near_keys, v, q_pos, k_pos, k_pos, 2)
        there = _attend(name, rotary, q, moved_keys, v, q_pos, k_pos, moved_rope, 2)
        if name == "cache":
            assert (here - there).abs().max() > 1e-2
        else:
            torch.testing.assert_close(there, here, atol=2e-5, rtol=0)


def _read(model, ids, chunk=16):
    cache = sparsemem.SparseMemCache(model.config)
    with torch.no_grad():
        logits = [model(ids[:, s : s + chunk], past_key_values=cache).logits for s in range(0, ids.shape[1], chunk)]
    return torch.cat(logits, dim=1), cache


def test_placement_starts_where_the_cache_outgrows_the_trained_context():
    base = make_base_model("llama", max_position_embeddings=64)
    options = dict(top_k_blocks=2, block_fraction=None, block_size=BLOCK, sink_tokens=SINK, local_tokens=LOCAL)
    ids = torch.randint(3, 256, (1, 160), generator=torch.Generator().manual_seed(5))
    held, _ = _read(sparsemem.convert(base, **options), ids)
    for scheme in ("fixed", "ordered"):
        model = sparsemem.convert(base, memory_placement=scheme, **options)
        placed, cache = _read(model, ids)
        assert cache.cache_positions and torch.isfinite(placed).all()
        # inside the trained context nothing changes, bit for bit; past it the placement is honoured
        assert torch.equal(placed[:, :64], held[:, :64])
        assert (placed[:, 64:] - held[:, 64:]).abs().max() > 1e-3
        out = model.generate(ids[:, :100], max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert out.shape[1] == 105


def test_bad_placement_options_raise_naming_the_option():
    base = make_base_model("llama")
    with pytest.raises(ValueError, match="memory_placement"):
        sparsemem.convert(base, memory_placement="near")
    with pytest.raises(ValueError, match="positions='logical'"):
        sparsemem.convert(base, memory_placement="fixed", positions="logical")
    with pytest.raises(ValueError, match="top_k_blocks"):
        sparsemem.convert(base, memory_placement="fixed", top_k_blocks=None)
    with pytest.raises(ValueError, match="block_fraction=None"):
        sparsemem.convert(base, memory_placement="ordered", top_k_blocks=4, block_fraction=0.2)
