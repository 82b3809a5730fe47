"""Block-sparse decode: one new query per sequence attends anchors + its selected blocks + slots.

Per step the scorer reads the cached block summaries (`BlockSummaryCache`, O(blocks) work, updated as
tokens arrive), picks the blocks as the reference path does, and only those blocks' keys are read:
on CUDA by a Triton split-K kernel that reads them in place (no gathered copy), elsewhere by a gather.
The anchors (sinks + recent window, a few hundred keys) and the slot tier are computed apart; all tiers
are merged by log-sum-exp. Same function as the reference path, whatever `query_block_size` (a decode
query forms its own query block).
"""

import math

import torch

from .merge import masked_attention, merge_attention_states
from .scorer import BlockSummaries, summarize_contiguous_blocks
from .selection import select_blocks
from .slot_attention import slot_attention

try:  # Triton ships with CUDA builds of torch; the gather path needs nothing
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


class BlockSummaryCache:
    """Block summaries of a cache layer whose keys sit at positions 0..N-1, kept across decode steps.

    Complete blocks are summarised once, into buffers that grow by doubling; the newest, incomplete
    block is re-summarised on every call (at most `block_size` keys). The owner drops the cache when its
    keys change other than by appending (eviction, crop, beam reordering).
    """

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.complete = 0  # complete blocks summarised
        self.buffers = None  # (min, max, sum) [B, Hkv, capacity, D] fp32

    def _grow(self, keys: torch.Tensor, needed: int) -> None:
        batch, kv_heads, _, dim = keys.shape
        capacity = max(needed, 64, 2 * (0 if self.buffers is None else self.buffers[0].shape[2]))
        fresh = tuple(torch.empty(batch, kv_heads, capacity, dim, dtype=torch.float32, device=keys.device) for _ in range(3))
        if self.buffers is not None and self.complete:
            for new, old in zip(fresh, self.buffers):
                new[:, :, : self.complete] = old[:, :, : self.complete]
        self.buffers = fresh

    def update(self, keys: torch.Tensor) -> BlockSummaries:
        batch, kv_heads, total, dim = keys.shape
        size = self.block_size
        if self.buffers is not None and (self.buffers[0].shape[:2] != (batch, kv_heads) or total < self.complete * size):
            self.complete, self.buffers = 0, None
        num_blocks = math.ceil(total / size)
        if self.buffers is None or self.buffers[0].shape[2] < num_blocks:
            self._grow(keys, num_blocks)
        key_min, key_max, key_sum = self.buffers
        whole = total // size
        if whole > self.complete:
            new = keys[:, :, self.complete * size : whole * size].view(batch, kv_heads, whole - self.complete, size, dim)
            key_min[:, :, self.complete : whole] = new.amin(-2)
            key_max[:, :, self.complete : whole] = new.amax(-2)
            key_sum[:, :, self.complete : whole] = new.sum(-2, dtype=torch.float32)
            self.complete = whole
        if total > whole * size:  # the incomplete newest block, written where it will complete
            tail = keys[:, :, whole * size :]
            key_min[:, :, whole] = tail.amin(-2)
            key_max[:, :, whole] = tail.amax(-2)
            key_sum[:, :, whole] = tail.sum(-2, dtype=torch.float32)
        count = torch.full((num_blocks,), size, dtype=torch.long, device=keys.device)
        count[-1] = total - (num_blocks - 1) * size
        key_mean = key_sum[:, :, :num_blocks] / count.view(1, 1, -1, 1).to(torch.float32)
        return BlockSummaries(key_min[:, :, :num_blocks], key_max[:, :, :num_blocks], key_mean, count)


def unsupported_decode_reason(query, attention_mask, sliding_window, contiguous: bool) -> str | None:
    if not query.is_cuda:
        return "the inputs are not on a CUDA device"
    if query.shape[-2] != 1:
        return "more than one query"
    if attention_mask is not None:
        return "a padding or 4D attention mask"
    if sliding_window is not None:
        return "a sliding window"
    if not contiguous:
        return "evicted tokens (the block store is not contiguous)"
    return None


def selection_budget(num_candidates: int, top_k: int | None, fraction: float | None) -> int:
    """Blocks `select_blocks` keeps for a query with `num_candidates` candidates (same arithmetic)."""
    if top_k is None:
        return num_candidates
    if fraction is None:
        return min(top_k, num_candidates)
    budget = torch.ceil(torch.tensor([num_candidates]) * fraction).clamp(min=top_k)
    return min(int(budget), num_candidates)


if triton is not None:

    @triton.jit
    def _selected_blocks_kernel(
        Q, K, V, IDX, ACC, M, L,
        stride_qb, stride_qh, stride_qg,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_ib, stride_ih,
        num_selected, per_split, total, low, high, scale,
        KV_HEADS: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    ):
        # one program: one (sequence, KV head) and a range of its selected blocks; G query heads as rows
        pid = tl.program_id(0)
        split = tl.program_id(1)
        num_splits = tl.num_programs(1)
        b = pid // KV_HEADS
        h = pid % KV_HEADS
        rows = tl.arange(0, GP)
        dims = tl.arange(0, D)
        offs = tl.arange(0, BS)
        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qg + dims[None, :], mask=rows[:, None] < G, other=0.0)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        start = split * per_split
        stop = tl.minimum(start + per_split, num_selected)
        for i in range(start, stop):
            block = tl.load(IDX + b * stride_ib + h * stride_ih + i)
            tokens = block * BS + offs
            valid = (tokens < total) & (tokens >= low) & (tokens <= high)
            k = tl.load(K + b * stride_kb + h * stride_kh + tokens[:, None] * stride_kn + dims[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(V + b * stride_vb + h * stride_vh + tokens[:, None] * stride_vn + dims[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = (pid * num_splits + split) * G
        row_ok = rows < G
        tl.store(ACC + (out + rows[:, None]) * D + dims[None, :], acc, mask=row_ok[:, None])
        tl.store(M + out + rows, m_i, mask=row_ok)
        tl.store(L + out + rows, l_i, mask=row_ok)


def _selected_blocks_triton(query, key, value, index, low, high, scaling, block_size):
    """Attention of query [B, Hkv, G, D] over the selected blocks index [B, Hkv, S] (int32), keys
    restricted to positions low..high: (output [B, Hkv, G, D] fp32, lse [B, Hkv, G])."""
    batch, kv_heads, groups, dim = query.shape
    num_selected = index.shape[-1]
    per_split = 8
    splits = max(1, math.ceil(num_selected / per_split))
    acc = torch.empty(batch * kv_heads * splits * groups, dim, dtype=torch.float32, device=query.device)
    m = torch.empty(batch * kv_heads * splits * groups, dtype=torch.float32, device=query.device)
    l = torch.empty_like(m)
    if num_selected:
        _selected_blocks_kernel[(batch * kv_heads, splits)](
            query, key, value, index, acc, m, l,
            query.stride(0), query.stride(1), query.stride(2),
            key.stride(0), key.stride(1), key.stride(2),
            value.stride(0), value.stride(1), value.stride(2),
            index.stride(0), index.stride(1),
            num_selected, per_split, key.shape[-2], low, high, scaling,
            KV_HEADS=kv_heads, G=groups, GP=max(16, triton.next_power_of_2(groups)), D=dim, BS=block_size,
        )
    else:
        m.fill_(float("-inf"))
        l.zero_()
        acc.zero_()
    m = m.view(batch, kv_heads, splits, groups)
    l = l.view(batch, kv_heads, splits, groups)
    acc = acc.view(batch, kv_heads, splits, groups, dim)
    top = m.amax(dim=2, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weight = torch.exp(m - top)
    total = (weight * l).sum(2)
    out = (weight[..., None] * acc).sum(2) / total.clamp(min=torch.finfo(torch.float32).tiny)[..., None]
    lse = torch.where(total > 0, top.squeeze(2) + torch.log(total), torch.full_like(total, float("-inf")))
    return out, lse


def _selected_blocks_gather(query, key, value, index, low, high, scaling, block_size):
    """Same as `_selected_blocks_triton`, by gathering the selected keys (any device)."""
    batch, kv_heads, groups, dim = query.shape
    if index.shape[-1] == 0:
        return query.new_zeros(query.shape, dtype=torch.float32), query.new_full(query.shape[:-1], float("-inf"), dtype=torch.float32)
    tokens = (index.long()[..., None] * block_size + torch.arange(block_size, device=key.device)).flatten(-2)
    valid = (tokens < key.shape[-2]) & (tokens >= low) & (tokens <= high)
    gather = tokens.clamp(max=key.shape[-2] - 1)[..., None].expand(-1, -1, -1, dim)
    k, v = key.gather(2, gather).float(), value.gather(2, gather).float()
    logits = torch.einsum("bhgd,bhnd->bhgn", query.float(), k).mul_(scaling)
    out, lse = masked_attention(logits[:, :, :, None], valid[:, :, None, None], v)
    return out[:, :, :, 0], lse[:, :, :, 0]


def block_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    scorer,
    options: dict,
    summary_cache: BlockSummaryCache | None = None,
    slots=None,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """query [B, H, 1, D] at position N-1, key/value [B, Hkv, N, D] at 0..N-1.

    Returns (output [B, 1, H, D] in the query dtype, attended (query head, key) pairs as a 0-d tensor).
    """
    batch, heads, _, dim = query.shape
    kv_heads, total = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    size, sink, local = options["block_size"], options["sink_tokens"], options["local_tokens"]
    position = total - 1
    num_blocks = math.ceil(total / size)
    if slots is not None and len(slots) and slots.block.numel():
        num_blocks = max(num_blocks, int(slots.block.max()) + 1)
    device = query.device

    if summary_cache is not None and num_blocks == math.ceil(total / size):
        summaries = summary_cache.update(key)
    else:
        summaries = summarize_contiguous_blocks(key, size, num_blocks)
    q = query.view(batch, kv_heads, groups, 1, dim)
    # candidates: blocks holding a key in [sink, position - local]
    high = position - local
    first, last = sink // size, (high // size if high >= 0 else -1)
    block_ids = torch.arange(num_blocks, device=device)
    candidates = (block_ids >= first) & (block_ids <= last) & (block_ids * size <= high)
    num_candidates = max(0, min(last, num_blocks - 1) - first + 1)
    budget = selection_budget(num_candidates, options["top_k_blocks"], options["block_fraction"])
    selected = select_blocks(scorer(q, summaries), candidates, options["top_k_blocks"], options["block_fraction"])
    index = torch.argsort(selected.to(torch.uint8), dim=-1, descending=True, stable=True)[..., 0, :budget]
    index = index.to(torch.int32).contiguous()  # [B, Hkv, S]

    q_rows = query.view(batch, kv_heads, groups, dim)
    if use_triton is None:
        # tl.dot needs tiles of at least 16 along each axis; smaller blocks or heads take the gather route
        use_triton = triton is not None and query.is_cuda and size >= 16 and dim >= 16
    tier = _selected_blocks_triton if use_triton else _selected_blocks_gather
    block_out, block_lse = tier(q_rows, key, value, index, sink, high, scaling, size)

    # anchors: the sinks and the recent window (disjoint ranges of positions), a few hundred keys
    sink_end = min(sink, total)
    window_start = max(position - local + 1, sink_end)
    anchor_keys = torch.cat([key[:, :, :sink_end], key[:, :, window_start:]], dim=2).float()
    anchor_values = torch.cat([value[:, :, :sink_end], value[:, :, window_start:]], dim=2).float()
    logits = torch.einsum("bhgd,bhnd->bhgn", q_rows.float(), anchor_keys).mul_(scaling)
    anchor_out, anchor_lse = masked_attention(
        logits[:, :, :, None], torch.ones(1, 1, 1, 1, 1, dtype=torch.bool, device=device), anchor_values
    )
    states = [(block_out, block_lse), (anchor_out[:, :, :, 0], anchor_lse[:, :, :, 0])]

    block_first = index.long() * size
    per_block = (torch.clamp(block_first + size - 1, max=min(high, total - 1)) - torch.clamp(block_first, min=sink) + 1).clamp(min=0)
    attended = (per_block.sum() + anchor_keys.shape[2] * batch * kv_heads) * groups
    if slots is not None and len(slots) > 0:
        selected_mask = selected[:, :, 0].clone()
        slot_out, slot_lse, slot_pairs = slot_attention(
            q_rows.float()[:, :, :, None], torch.tensor([position], device=device), slots, selected_mask[:, :, None],
            scaling, size, sink, local, None,
        )
        states.append((slot_out[:, :, :, 0], slot_lse[:, :, :, 0]))
        attended = attended + slot_pairs * groups
    out = merge_attention_states(states)[0]
    return out.view(batch, 1, heads, dim).to(query.dtype), attended
