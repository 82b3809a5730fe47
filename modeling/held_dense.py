"""Dense-equivalent attention over what a cache holds, in one SDPA call.

With `top_k_blocks=None` every held entry is attended exactly and the slots stand for what was evicted,
so the three-tier function reduces to one softmax over [slots, held keys] where a slot's logit carries
its beta and the new queries (the newest held entries) see the keys in lower-right causal order. That is
what a streaming cache under online compaction computes at every chunk, at any length.

beta enters through the keys: with q' = [q, 1, 1] and k' = [k, hi, lo], where hi + lo = beta / scaling
split over two coordinates so a bf16 key still carries beta to ~1e-5, SDPA's scaled dot product gives
q.k * scaling + beta. Head dims are padded to a multiple of 8 for the fused kernels.
"""

import torch
import torch.nn.functional as F

try:
    from torch.nn.attention.bias import causal_lower_right
except ImportError:  # older torch: the caller falls back to the reference path
    causal_lower_right = None


def unsupported_held_reason(query, attention_mask, sliding_window, options, queries_newest: bool) -> str | None:
    """Why `held_dense_attention` cannot compute this call exactly, or None when it can."""
    if options["top_k_blocks"] is not None:
        return "top_k_blocks is set (block selection)"
    if causal_lower_right is None:
        return "this torch build has no lower-right causal bias"
    if attention_mask is not None:
        return "a padding or explicit attention mask"
    if sliding_window is not None:
        return "a sliding window"
    if not queries_newest:
        return "the queries are not the newest held entries"
    return None


def _by_head(slots, kv_heads: int, dtype, scaling: float):
    """The packed slots laid out per KV head: keys' [B, Hkv, S, D'] with beta folded in as two coordinates,
    values [B, Hkv, S, D]; heads with fewer slots are padded with slots that take no weight. Memoised on
    the slot tier (it changes only by being replaced)."""
    memo = slots.__dict__.get("_held_dense")
    if memo is not None and memo[0] == (kv_heads, dtype, scaling):
        return memo[1]
    batch, _, dim = slots.keys.shape
    counts = torch.bincount(slots.head, minlength=kv_heads)
    width = int(counts.max())
    order = torch.sort(slots.head, stable=True).indices
    first = torch.cumsum(counts, 0) - counts
    head = slots.head[order]
    column = torch.arange(order.numel(), device=order.device) - first[head]
    keys = slots.keys.new_zeros(batch, kv_heads, width, dim).float()
    values = slots.values.new_zeros(batch, kv_heads, width, slots.values.shape[-1])
    beta = torch.zeros((batch, kv_heads, width), device=slots.keys.device)
    dead = torch.ones((batch, kv_heads, width), dtype=torch.bool, device=slots.keys.device)
    keys[:, head, column] = slots.keys[:, order].float()
    values[:, head, column] = slots.values[:, order]
    # a slot standing for a block still held at full resolution is covered by that block: never counted here
    live = (slots.block[order] < 0) & torch.isfinite(slots.beta[:, order])
    beta[:, head, column] = torch.where(live, slots.beta[:, order].float(), torch.zeros_like(slots.beta[:, order].float()))
    dead[:, head, column] = ~live
    # padding and dead slots: a logit of about -3e4 x scaling, which exp() turns into 0 (and fp16 can hold)
    shifted = torch.where(dead, torch.full_like(beta, -3e4), beta / scaling)
    hi = shifted.to(dtype)
    lo = (shifted - hi.float()).to(dtype)
    layout = (keys.to(dtype), hi, lo, values.to(dtype))
    slots.__dict__["_held_dense"] = ((kv_heads, dtype, scaling), layout)
    return layout


def held_dense_attention(query, key, value, slots, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """query [B, H, Q, D] (the newest Q held entries), key/value [B, Hkv, N, D] in time order, slots a
    `SlotTier` or None -> (output [B, Q, H, D], attended (query head, key) pairs)."""
    batch, heads, num_queries, dim = query.shape
    kv_heads, held = key.shape[1], key.shape[2]
    dtype = query.dtype
    pad = (-(dim + 2)) % 8
    extra = 2 + pad
    has_slots = slots is not None and len(slots) > 0
    if has_slots:
        slot_keys, hi, lo, slot_values = _by_head(slots, kv_heads, dtype, scaling)
        slot_keys = torch.cat([slot_keys, hi[..., None], lo[..., None], slot_keys.new_zeros(*hi.shape, pad)], dim=-1)
        exact_keys = F.pad(key.to(dtype), (0, extra))
        keys = torch.cat([slot_keys, exact_keys], dim=2)
        values = torch.cat([slot_values.to(dtype), value.to(dtype)], dim=2)
    else:
        keys, values = F.pad(key.to(dtype), (0, extra)), value.to(dtype)
    ones = query.new_ones(*query.shape[:-1], 2)
    q = torch.cat([query, ones, query.new_zeros(*query.shape[:-1], pad)], dim=-1)
    groups = heads // kv_heads
    keys = keys.repeat_interleave(groups, dim=1)
    values = values.repeat_interleave(groups, dim=1)
    total = keys.shape[2]
    mask = causal_lower_right(num_queries, total)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
    slot_count = 0 if not has_slots else int(slots.head.numel())  # every live slot of a head, per query
    exact_pairs = num_queries * (held - num_queries) + num_queries * (num_queries + 1) // 2
    attended = batch * (exact_pairs * heads + num_queries * slot_count * groups)
    return out.transpose(1, 2), attended
