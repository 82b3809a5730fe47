"""The attention function against closed-form references."""

import math
from types import SimpleNamespace

import pytest
import torch

from sparsemem.modeling.attention import MemoryView, sparsemem_attention_forward
from sparsemem.modeling.slots import SlotTier
from sparsemem.modeling.merge import masked_attention, merge_attention_states

B, H, HKV, D = 2, 4, 2, 8


def module(**options):
    config = SimpleNamespace(
        block_size=4, sink_tokens=2, local_tokens=4, top_k_blocks=None, block_fraction=None, scorer="minmax",
        query_chunk_size=3,
    )
    for name, value in options.items():
        setattr(config, name, value)
    return SimpleNamespace(config=config)


def dense_reference(q, k, v, q_pos, k_pos, extra_k=None, extra_v=None, extra_bias=None):
    """Causal softmax attention with GQA, optionally over extra (always visible) keys with a logit bias."""
    k = k.repeat_interleave(H // HKV, dim=1)
    v = v.repeat_interleave(H // HKV, dim=1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(D)
    logits = logits.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    values = v
    if extra_k is not None:
        ek = extra_k.repeat_interleave(H // HKV, dim=1)
        ev = extra_v.repeat_interleave(H // HKV, dim=1)
        extra_logits = q @ ek.transpose(-1, -2) / math.sqrt(D) + extra_bias.repeat_interleave(H // HKV, dim=1)[:, :, None]
        logits = torch.cat([logits, extra_logits], dim=-1)
        values = torch.cat([v, ev], dim=-2)
    return (torch.softmax(logits, dim=-1) @ values).transpose(1, 2)


def run(mod, q, k, v, q_pos, k_pos, slots=None, mask=None):
    view = MemoryView(q_pos, k_pos, slots, None)
    out, _ = sparsemem_attention_forward(mod, q, k, v, mask, scaling=1 / math.sqrt(D), sparsemem=view)
    return out


@pytest.fixture
def qkv():
    torch.manual_seed(0)
    n = 29
    return torch.randn(B, H, n, D), torch.randn(B, HKV, n, D), torch.randn(B, HKV, n, D), torch.arange(n)


def test_every_block_is_dense(qkv):
    q, k, v, pos = qkv
    out = run(module(), q, k, v, pos, pos)
    torch.testing.assert_close(out, dense_reference(q, k, v, pos, pos), rtol=0, atol=1e-5)


def test_decode_query_against_dense(qkv):
    q, k, v, pos = qkv
    out = run(module(), q[:, :, -1:], k, v, pos[-1:], pos)
    torch.testing.assert_close(out, dense_reference(q[:, :, -1:], k, v, pos[-1:], pos), rtol=0, atol=1e-5)


def test_top1_attends_anchors_and_the_planted_block():
    torch.manual_seed(1)
    n = 40
    q = torch.randn(1, H, 1, D)
    k = torch.randn(1, HKV, n, D) * 0.1
    v = torch.randn(1, HKV, n, D)
    pos = torch.arange(n)
    # plant a key matching every query head of each group in block 5 (positions 20..23)
    k[:, :, 21] = q[0].view(HKV, H // HKV, D).sum(1) * 3
    out = run(module(top_k_blocks=1), q, k, v, pos[-1:], pos)
    keep = (pos < 2) | (pos > 39 - 4) | ((pos >= 20) & (pos < 24))
    expected = dense_reference(q, k[:, :, keep], v[:, :, keep], pos[-1:], pos[keep])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_duplicate_keys_as_slots_with_log_count_bias():
    """A span of duplicated (k, v) pairs equals one slot per distinct pair with beta = log(count)."""
    torch.manual_seed(2)
    n = 32
    q = torch.randn(B, H, 1, D)
    k = torch.randn(B, HKV, n, D)
    v = torch.randn(B, HKV, n, D)
    pos = torch.arange(n)
    # positions 8..19 hold only 3 distinct pairs, repeated 2, 4 and 6 times
    distinct_k, distinct_v = k[:, :, 8:11].clone(), v[:, :, 8:11].clone()
    pattern = [0] * 2 + [1] * 4 + [2] * 6
    k[:, :, 8:20], v[:, :, 8:20] = distinct_k[:, :, pattern], distinct_v[:, :, pattern]
    dense = dense_reference(q, k, v, pos[-1:], pos)

    keep = (pos < 8) | (pos >= 20)
    counts = torch.tensor([2.0, 4.0, 6.0])
    slots = SlotTier.from_heads(
        keys=distinct_k,
        values=distinct_v,
        beta=counts.log().expand(B, HKV, 3).clone(),
        block=torch.full((3,), -1),
        position=torch.full((3,), 19),
    )
    out = run(module(), q, k[:, :, keep], v[:, :, keep], pos[-1:], pos[keep], slots=slots)
    torch.testing.assert_close(out, dense, rtol=0, atol=1e-5)


def test_slots_of_a_selected_block_are_not_counted_twice():
    torch.manual_seed(3)
    n = 32
    q = torch.randn(B, H, 1, D)
    k, v, pos = torch.randn(B, HKV, n, D) * 0.1, torch.randn(B, HKV, n, D), torch.arange(n)
    k[:, :, 21] = q[:, :, 0].view(B, HKV, H // HKV, D).sum(2) * 3  # block 5 (20..23) wins top-1
    # exact copies (beta = 0) of block 3 (positions 12..15) as slots standing for that block
    slots = SlotTier.from_heads(
        k[:, :, 12:16].clone(), v[:, :, 12:16].clone(), torch.zeros(B, HKV, 4), torch.full((4,), 3), torch.full((4,), 15)
    )
    # every block selected: the slots must be ignored, or block 3 would count twice
    out = run(module(top_k_blocks=None), q, k, v, pos[-1:], pos, slots=slots)
    torch.testing.assert_close(out, dense_reference(q, k, v, pos[-1:], pos), rtol=0, atol=1e-5)
    # top-1: anchors (0,1 and 28..31) + block 5 exactly + block 3 through its slots
    out = run(module(top_k_blocks=1), q, k, v, pos[-1:], pos, slots=slots)
    keep = (pos < 2) | (pos >= 28) | ((pos >= 20) & (pos < 24)) | ((pos >= 12) & (pos < 16))
    torch.testing.assert_close(out, dense_reference(q, k[:, :, keep], v[:, :, keep], pos[-1:], pos[keep]), rtol=0, atol=1e-5)


def test_padding_mask_hides_left_pads(qkv):
    q, k, v, pos = qkv
    padding = torch.ones(B, pos.numel(), dtype=torch.bool)
    padding[1, :5] = False
    out = run(module(), q, k, v, pos, pos, mask=padding)
    expected_row0 = dense_reference(q[:1], k[:1], v[:1], pos, pos)
    expected_row1 = dense_reference(q[1:, :, 5:], k[1:, :, 5:], v[1:, :, 5:], pos[5:], pos[5:])
    torch.testing.assert_close(out[:1], expected_row0, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1:, 5:], expected_row1, rtol=0, atol=1e-5)
    assert torch.count_nonzero(out[1, :5]) == 0  # a query that sees nothing outputs zeros, not NaN


def test_merge_of_disjoint_tiers_is_the_joint_softmax():
    torch.manual_seed(4)
    logits = torch.randn(1, 1, 2, 3, 10)
    values = torch.randn(1, 1, 10, 5)
    first = torch.zeros(10, dtype=torch.bool)
    first[:4] = True
    a = masked_attention(logits.clone(), first, values)
    b = masked_attention(logits.clone(), ~first, values)
    merged, lse = merge_attention_states([a, b])
    joint = torch.einsum("bhgqn,bhnd->bhgqd", torch.softmax(logits, -1), values)
    torch.testing.assert_close(merged, joint, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), rtol=0, atol=1e-5)


def test_gradients_stay_finite_for_rows_without_keys():
    logits = torch.randn(1, 1, 1, 2, 4, requires_grad=True)
    values = torch.randn(1, 1, 4, 3, requires_grad=True)
    mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    out, lse = masked_attention(logits, mask, values)
    merged, _ = merge_attention_states([(out, lse), (torch.zeros_like(out), torch.full_like(lse, float("-inf")))])
    merged.sum().backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(values.grad).all()


def test_packed_slots_with_different_budgets_per_head():
    """Head 0 keeps 3 slots and head 1 keeps 1: each head sees only its own, as if stored separately."""
    torch.manual_seed(5)
    n = 24
    q = torch.randn(1, H, 1, D)
    k, v, pos = torch.randn(1, HKV, n, D), torch.randn(1, HKV, n, D), torch.arange(n)
    keep = (pos < 8) | (pos >= 16)  # positions 8..15 evicted; head 0 keeps 8,9,10 and head 1 keeps 12 as exact slots
    slots = SlotTier(
        keys=torch.stack([k[0, 0, 8], k[0, 0, 9], k[0, 0, 10], k[0, 1, 12]])[None],
        values=torch.stack([v[0, 0, 8], v[0, 0, 9], v[0, 0, 10], v[0, 1, 12]])[None],
        beta=torch.zeros(1, 4),
        head=torch.tensor([0, 0, 0, 1]),
        block=torch.full((4,), -1),
        position=torch.full((4,), 15),
    )
    out = run(module(), q, k[:, :, keep], v[:, :, keep], pos[-1:], pos[keep], slots=slots)
    for head, extra in ((0, [8, 9, 10]), (1, [12])):
        sel = keep.clone()
        sel[extra] = True
        ref = dense_reference(q, k[:, :, sel], v[:, :, sel], pos[-1:], pos[sel])
        group = slice(head * (H // HKV), (head + 1) * (H // HKV))
        torch.testing.assert_close(out[:, :, group], ref[:, :, group], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_held_dense_attention_equals_the_reference_over_evicted_entries_and_packed_slots(dtype):
    """The one-call SDPA form of dense-equivalent attention (held_dense.py), which CUDA runs for a cache
    under online compaction: new queries at the end of the held keys, positions with a gap, slots with
    beta and different counts per head (one dead), against the reference path."""
    from sparsemem.modeling.held_dense import held_dense_attention

    gen = torch.Generator().manual_seed(7)
    n, queries = 40, 6
    k, v, pos = torch.randn(1, HKV, n, D, generator=gen), torch.randn(1, HKV, n, D, generator=gen), torch.arange(n) * 3
    q = torch.randn(1, H, queries, D, generator=gen)
    slots = SlotTier(
        keys=torch.randn(1, 5, D, generator=gen), values=torch.randn(1, 5, D, generator=gen),
        beta=torch.tensor([[1.5, -2.0, 0.3, 4.0, float("-inf")]]), head=torch.tensor([0, 0, 0, 1, 1]),
        block=torch.full((5,), -1), position=torch.full((5,), 2),
    )
    view = MemoryView(pos[-queries:], pos, slots, None)
    expected, _ = sparsemem_attention_forward(module(), q, k, v, None, scaling=1 / math.sqrt(D), sparsemem=view)
    out, attended = held_dense_attention(q.to(dtype), k.to(dtype), v.to(dtype), slots, 1 / math.sqrt(D))
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=tolerance)
    # pairs: each query's causal exact keys on every head, plus the group's slots (the dead one counted too)
    causal = queries * (n - queries) + queries * (queries + 1) // 2
    assert attended == causal * H + queries * 5 * (H // HKV)
