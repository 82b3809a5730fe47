"""Where memory beyond the local window is attended once the cache outgrows the model's trained context.

Under cache positions (rope.py) every held entry takes its rank in time order. That stays inside the
trained range while the cache holds no more than the trained context (a compacted stream). A block store
that holds more (a long document read with sparse selection and nothing evicted) would put the selected
blocks at distances the model never saw. Option `memory_placement` decides what a query sees then:

- "cache": the held ranks, unchanged (distances may leave the trained range).
- "fixed": every attended entry outside the query's local window (sinks, selected blocks, slots) sits at
  one distance, `local_tokens`, just before the local window: memory is position-free and only its
  content ranks it (InfLLM's choice).
- "ordered": the attended entries outside the local window keep their time order, packed right before it:
  the newest selected block ends at distance `local_tokens`, each older selected (or sink-holding) block
  one block further, the slots before all of them (ReAttention's choice: in-range positions that still
  tell the model which memory came first). Needs a bounded selection (`top_k_blocks`, no fraction or
  mass), so that what a query attends fits the trained context.

With either placement the selection scores a block by the query at distance `local_tokens` against the
block's keys with their positions taken out, so which block is chosen does not depend on where it sits.
Keys inside the local window keep their own distances, which are in range.

RoPE makes this cheap: q(p) . k(p') depends on p' - p only, so a key is moved to distance d by rotating
the query to d and taking the key's own rotation out once (`rope.shift_keys`).
"""

from dataclasses import dataclass

import torch

from .rope import shift_keys

PLACEMENTS = ("cache", "fixed", "ordered")


def check_placement(scheme) -> str:
    if scheme not in PLACEMENTS:
        raise ValueError(f"`memory_placement` must be one of {PLACEMENTS}, got {scheme!r}")
    return scheme


def check_placement_options(scheme: str, positions: str, top_k_blocks, block_fraction, block_mass) -> None:
    """Option combinations a placement cannot honour, named."""
    if scheme == "cache":
        return
    if positions == "logical":
        raise ValueError(
            f"memory_placement={scheme!r} places memory once the cache outgrows the trained context, which "
            "positions='logical' never leaves; use positions='auto' or 'cache'"
        )
    if top_k_blocks is None:
        raise ValueError(f"memory_placement={scheme!r} places selected blocks; it needs `top_k_blocks` (sparse selection)")
    if scheme == "ordered" and (block_fraction is not None or block_mass is not None):
        raise ValueError(
            "memory_placement='ordered' packs the selected blocks before the local window and needs a bounded "
            "selection: set block_fraction=None and block_mass=None (top_k_blocks alone)"
        )


@dataclass
class Placement:
    """The placement of one forward pass of one layer.

    scheme: "fixed" or "ordered" (see the module docstring). rotary: the model's rotary embedding (its
    `inv_freq`). query_rope [Q] / key_rope [N]: the RoPE positions the queries / held keys are rotated at
    now. distance: where the newest placed entry sits from the query (`local_tokens`). block_size: the
    block store's block size (how far "ordered" moves an entry per newer attended block).
    """

    scheme: str
    rotary: torch.nn.Module
    query_rope: torch.Tensor
    key_rope: torch.Tensor
    distance: int
    block_size: int

    def far_queries(self, query: torch.Tensor, start: int, stop: int, extra=0) -> torch.Tensor:
        """`query` [..., q, D] (the queries start..stop) rotated as if each sat `distance + extra` positions
        after a key at RoPE position 0; `extra` is an int or a tensor broadcasting to [..., q]."""
        return shift_keys(self.rotary, query, self.distance + extra - self.query_rope[start:stop])

    def free_keys(self, keys: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """`keys` [B, Hkv, N, D] (at logical positions `key_positions` [N]) with their positions taken out: at 0
        ("fixed"), or at minus their offset from the end of their block ("ordered": a block then reads as one
        contiguous run that ends at 0)."""
        delta = -self.key_rope
        if self.scheme == "ordered":
            delta = delta - (self.block_size - 1 - key_positions % self.block_size)
        return shift_keys(self.rotary, keys, delta)

    def free_slots(self, slots):
        """The slot tier with the slot keys' positions taken out."""
        return slots.moved(shift_keys(self.rotary, slots.keys, -slots.rope), torch.zeros_like(slots.rope))

    def placed_logits(self, query, far, start, stop, free_keys, key_blocks, occupied_after, scaling: float):
        """Logits [B, Hkv, G, q, N] of `query` [B, Hkv, G, q, D] against every key at its placed distance.

        far: `far_queries(query, start, stop)` (the queries at the placement distance, which selection scored
        with); free_keys [B, Hkv, N, D] from `free_keys`; key_blocks [N] their block ids; occupied_after
        [B, Hkv, q, nb]: per query, how many attended blocks (selected or holding sinks) are newer than
        each block (used by "ordered" only). Entries that are not attended are masked by the caller."""
        batch, kv_heads, groups, n_q, dim = query.shape
        flat_keys = free_keys.transpose(-1, -2)
        if self.scheme == "fixed":
            return (far.reshape(batch, kv_heads, groups * n_q, dim) @ flat_keys).mul_(scaling).view(batch, kv_heads, groups, n_q, -1)
        # "ordered": a key in a block with m attended blocks newer than it sits m blocks further away
        after = occupied_after.gather(-1, key_blocks.view(1, 1, 1, -1).expand(batch, kv_heads, n_q, -1))
        logits = None
        for m in torch.unique(after).tolist():
            at_m = far if m == 0 else self.far_queries(query, start, stop, m * self.block_size)
            part = (at_m.reshape(batch, kv_heads, groups * n_q, dim) @ flat_keys).mul_(scaling).view(batch, kv_heads, groups, n_q, -1)
            logits = part if logits is None else torch.where((after == m)[:, :, None], part, logits)
        return logits


def occupied_blocks_after(selected: torch.Tensor, block_first: torch.Tensor, sink_tokens: int):
    """Per query, the attended blocks, where a block is attended when selected or when it holds sinks: (how
    many are newer than each block [B, Hkv, q, nb], how many there are [B, Hkv, q]). `block_first` [nb]:
    each block's first logical position."""
    count = (selected | (block_first < sink_tokens)).long()
    return count.flip(-1).cumsum(-1).flip(-1) - count, count.sum(-1)
