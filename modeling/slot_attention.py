"""Attention over the slot tier (consolidated `(k, v, beta)` entries), as one LSE state to merge.

Shared by every attention backend, so the slot tier is computed by the same code whatever computes the
full-resolution tiers.
"""

import torch

from .anchors import blocks_touching_anchors
from .slots import SlotTier
from .merge import masked_attention


def slot_attention(
    query: torch.Tensor,
    query_positions: torch.Tensor,
    slots: SlotTier,
    selected: torch.Tensor,
    scaling: float,
    block_size: int,
    sink_tokens: int,
    local_tokens: int,
    sliding_window: int | None,
    slot_block: torch.Tensor | None = None,
    block_first: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`query` [B, Hkv, G, q, D] (fp32) against the packed slots of every KV head.

    `selected` [B, Hkv, q, nb] marks the blocks each query attends at full resolution; a slot standing
    for such a block, or for a block touching the query's anchors, is not counted (no token twice).
    `slot_block` and `block_first` replace `slots.block` and the blocks' first positions when the caller
    numbers only the blocks it holds (see `attention.compact_block_ids`).
    Returns (output [B, Hkv, G, q, D], lse [B, Hkv, G, q], slot pairs attended per (KV head, query)).
    """
    batch, kv_heads, groups, n_q, _ = query.shape
    num_blocks = selected.shape[-1]
    # packed slots: score every slot against every KV head, keep each slot's own head
    logits = torch.einsum("bhgqd,bsd->bhgqs", query, slots.keys.float()).mul_(scaling)
    logits = logits + slots.beta.float()[:, None, None, None, :]
    own_head = slots.head[None, :] == torch.arange(kv_heads, device=slots.head.device)[:, None]  # [Hkv, S]
    visible = slots.position[None, :] < query_positions[:, None]  # [q, S]
    if sliding_window is not None:
        visible = visible & (slots.position[None, :] > query_positions[:, None] - sliding_window)
    touched = blocks_touching_anchors(query_positions, num_blocks, block_size, sink_tokens, local_tokens, block_first)
    block = slots.block if slot_block is None else slot_block
    index = block.clamp(min=0)
    covered = selected.gather(-1, index.view(1, 1, 1, -1).expand(batch, kv_heads, n_q, -1))
    covered = (covered | touched[:, index][None, None]) & (block >= 0)  # touched: [q, nb]
    mask = own_head[None, :, None, :] & visible[None, None] & ~covered & torch.isfinite(slots.beta)[:, None, None, :]
    values = slots.values.float()[:, None].expand(batch, kv_heads, -1, -1)
    out, lse = masked_attention(logits, mask[:, :, None], values)
    return out, lse, mask.sum()
