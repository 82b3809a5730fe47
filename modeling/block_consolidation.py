"""Learned block consolidation: every complete block of the block store also gets a few `(k, v, beta)` slots.

A query attends its anchors and its selected blocks exactly; without slots the mass of every other
cold block is simply dropped and the softmax renormalises over what was kept. With `block_slots=s`
each complete block of `block_size` keys is consolidated into `s` slots, and a query counts a block's
slots exactly when it does not attend that block (see slot_attention.py), so an unselected block is
answered by its compact memory instead of by nothing.

Per layer and KV head the consolidator learns, for each of the `s` slots,
  - where it pools from inside the block: a positional logit per offset, plus a content term
    `u_j . k_t / sqrt(d)` (one pooling query for the slot key, one for the slot value);
  - a gain on the pooled key, an offset on beta and a weight on the spread of the pooled keys.
The slot key is the gain times the pooled keys, the slot value the pooled values, and
beta = log(block_size / s) + offset + w * spread: a slot stands for its share of the block's tokens, and
the spread (the pooled squared distance of the keys to their mean, per dimension) lets beta follow how
much a block's mass exceeds what its mean key gives, which grows with that spread
(log mean exp(q.k) ~ q.mean k + q' Cov q / 2 for Gaussian keys). Untrained, slot
`j` is the mean of the `j`-th contiguous segment of the block (gain 1, offset 0). Since
exp(q.mean k) <= mean exp(q.k), such slots under-count a block's mass, which training corrects; they
already answer an unselected block better than dropping it (measured, see the calibration report).

Phase 1 trains the consolidator on the attention-output error of the sparse attention with the slots
against dense attention (training/objectives.py); phase 2 trains it end to end with the scorer.
"""

import math

import torch
from torch import nn

from .slots import SlotTier

SEGMENT_LOGIT = 8.0  # initial positional preference of a slot for its own segment of the block


class BlockConsolidator(nn.Module):
    """`forward(keys, values)` with keys/values [B, Hkv, nb, block_size, D] of complete blocks ->
    (slot keys [B, Hkv, nb, s, D], slot values [B, Hkv, nb, s, D], beta [B, Hkv, nb, s]), fp32."""

    def __init__(self, num_kv_heads: int, head_dim: int, block_size: int, slots_per_block: int):
        super().__init__()
        if not 1 <= slots_per_block <= block_size:
            raise ValueError(f"`block_slots` must lie in [1, block_size={block_size}], got {slots_per_block!r}")
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.block_size, self.slots_per_block = block_size, slots_per_block
        self.segment_logits = nn.Parameter(torch.empty(num_kv_heads, slots_per_block, block_size))
        self.key_query = nn.Parameter(torch.empty(num_kv_heads, slots_per_block, head_dim))
        self.value_query = nn.Parameter(torch.empty(num_kv_heads, slots_per_block, head_dim))
        self.key_gain = nn.Parameter(torch.empty(num_kv_heads, slots_per_block))
        self.beta_offset = nn.Parameter(torch.empty(num_kv_heads, slots_per_block))
        self.spread_weight = nn.Parameter(torch.empty(num_kv_heads, slots_per_block))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # slot j prefers offsets of its own contiguous segment: the segment means, up to e^-8 leakage
        segment = torch.arange(self.block_size) * self.slots_per_block // self.block_size
        own = segment[None, :] == torch.arange(self.slots_per_block)[:, None]
        logits = torch.where(own, 0.0, -SEGMENT_LOGIT).to(self.segment_logits)
        self.segment_logits.copy_(logits.expand_as(self.segment_logits))
        self.key_query.zero_()
        self.value_query.zero_()
        self.key_gain.fill_(1.0)
        self.beta_offset.zero_()
        self.spread_weight.zero_()

    def forward(self, keys: torch.Tensor, values: torch.Tensor):
        keys, values = keys.float(), values.float()
        if keys.shape[-2] != self.block_size:
            raise ValueError(f"block consolidation expects blocks of {self.block_size} keys, got {keys.shape[-2]}")
        scale = 1.0 / math.sqrt(self.head_dim)
        position = self.segment_logits.float()[None, :, None]  # [1, Hkv, 1, s, bs]
        key_logits = position + torch.einsum("hsd,bhntd->bhnst", self.key_query.float(), keys) * scale
        value_logits = position + torch.einsum("hsd,bhntd->bhnst", self.value_query.float(), keys) * scale
        weights = torch.softmax(key_logits, dim=-1)
        pooled = weights @ keys
        # pooled E[k^2] - (E k)^2 per dimension, averaged: no [.., s, block_size, D] difference tensor
        spread = ((weights @ keys.pow(2)) - pooled.pow(2)).mean(-1).clamp(min=0.0)  # [B, Hkv, nb, s]
        slot_keys = pooled * self.key_gain.float()[None, :, None, :, None]
        slot_values = torch.softmax(value_logits, dim=-1) @ values
        beta = math.log(self.block_size / self.slots_per_block) + self.beta_offset.float()[None, :, None]
        beta = beta + self.spread_weight.float()[None, :, None] * spread
        return slot_keys, slot_values, beta


def complete_blocks(key_positions: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block ids [nb], index of each one's first key [nb]) of the blocks whose `block_size` positions are
    all held, keys sorted by position. After eviction a block may be held in part; it gets no slots."""
    if key_positions.numel() == 0:
        empty = key_positions.new_zeros(0)
        return empty, empty
    blocks = torch.div(key_positions, block_size, rounding_mode="floor")
    ids, counts = torch.unique_consecutive(blocks, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    whole = counts == block_size
    return ids[whole], starts[whole]


def build_consolidator(config) -> BlockConsolidator | None:
    """The layer's consolidator when `config.block_slots` is set."""
    if getattr(config, "block_slots", None) is None:
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    return BlockConsolidator(kv_heads, head_dim, config.block_size, config.block_slots)


def block_slots(consolidator: BlockConsolidator, key: torch.Tensor, value: torch.Tensor,
                key_positions: torch.Tensor | None = None, first_block: int = 0) -> SlotTier | None:
    """The slots of every complete block of `key`/`value` [B, Hkv, N, D] (positions `key_positions` [N],
    sorted), from block `first_block` on, packed over KV heads as a `SlotTier` (None when there is none).
    `key_positions=None`: the keys are exactly positions 0..N-1, so blocks are read without an index."""
    size = consolidator.block_size
    batch, kv_heads, total, dim = key.shape
    if key_positions is None:
        whole = total // size
        if whole <= first_block:
            return None
        ids = torch.arange(first_block, whole, device=key.device)
        k = key[:, :, first_block * size : whole * size].view(batch, kv_heads, whole - first_block, size, dim)
        v = value[:, :, first_block * size : whole * size].view(batch, kv_heads, whole - first_block, size, dim)
    else:
        ids, starts = complete_blocks(key_positions, size)
        keep = ids >= first_block
        ids, starts = ids[keep], starts[keep]
        if ids.numel() == 0:
            return None
        index = (starts[:, None] + torch.arange(size, device=key.device)[None]).reshape(-1)
        k = key[:, :, index].view(batch, kv_heads, ids.numel(), size, dim)
        v = value[:, :, index].view(batch, kv_heads, ids.numel(), size, dim)
    slot_keys, slot_values, beta = consolidator(k, v)
    per_head = ids.numel() * consolidator.slots_per_block
    heads = torch.arange(kv_heads, device=key.device).repeat_interleave(per_head)
    block = ids.repeat_interleave(consolidator.slots_per_block).repeat(kv_heads)
    return SlotTier(
        slot_keys.reshape(batch, kv_heads * per_head, dim).to(key.dtype),
        slot_values.reshape(batch, kv_heads * per_head, dim).to(value.dtype),
        beta.reshape(batch, kv_heads * per_head),
        heads,
        block,
        block * size + size - 1,  # a block's slots are seen by the queries after its last key
    )


class BlockSlotCache:
    """Block slots of a cache layer whose keys sit at positions 0..N-1, kept across decode steps: complete
    blocks are consolidated once, when they complete. The owner drops it when its keys change other than
    by appending (eviction, crop, beam reordering), as it drops the block summaries."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.slots: SlotTier | None = None
        self.complete = 0  # blocks consolidated so far

    def refresh(self, consolidator: BlockConsolidator, key: torch.Tensor, value: torch.Tensor, device=None) -> SlotTier | None:
        """The slots of every complete block of `key`/`value` [B, Hkv, N, D], on `device` (default: the keys';
        the compute device when the keys are in host memory)."""
        device = key.device if device is None else device
        whole = key.shape[-2] // self.block_size
        if whole < self.complete or (self.slots is not None and (self.slots.keys.shape[0] != key.shape[0] or self.slots.keys.device != device)):
            self.slots, self.complete = None, 0
        if whole > self.complete:
            new = block_slots(consolidator, key, value, first_block=self.complete).to(device)
            self.slots = SlotTier.cat(self.slots, new)
            self.complete = whole
        return self.slots
