"""The slot tier: consolidated `(k, v, beta)` entries of one cache layer, packed over KV heads.

Slots stand for spans (or blocks) of the layer whose full-resolution K/V are not attended: compaction makes
them (compaction.py), the cache holds them (cache.py) and lays them out in time (`timeline`), and every
attention path reads them (slot_attention.py, held_dense.py).
"""

from dataclasses import dataclass

import torch


@dataclass
class SlotTier:
    """Consolidated memory of one layer, packed over KV heads so budgets may differ per head.

    keys, values: [B, S, D]; beta: [B, S] logit bias (-inf marks an unused slot); head: [S] KV head of
    each slot; block: [S] block id the slot stands for while that block is also stored at full
    resolution, or -1 for a span whose full-resolution K/V were dropped; position: [S] last logical
    position the slot covers; rope: [B, S] the RoPE position each slot key is rotated at (a fitted slot
    keeps the rotation of the key it was chosen from; default: `position`).
    """

    keys: torch.Tensor
    values: torch.Tensor
    beta: torch.Tensor
    head: torch.Tensor
    block: torch.Tensor
    position: torch.Tensor
    rope: torch.Tensor | None = None

    def __post_init__(self):
        batch, num, _ = self.keys.shape
        if self.rope is None:
            self.rope = self.position.to(self.keys.device)[None].expand(batch, -1).clone()
        checks = {
            "values": (self.values.shape[:2], (batch, num)),
            "beta": (self.beta.shape, (batch, num)),
            "head": (self.head.shape, (num,)),
            "block": (self.block.shape, (num,)),
            "position": (self.position.shape, (num,)),
            "rope": (self.rope.shape, (batch, num)),
        }
        for name, (got, want) in checks.items():
            if tuple(got) != tuple(want):
                raise ValueError(f"slot `{name}` has shape {tuple(got)}, expected {tuple(want)} (+ head dim for values)")
        for name in ("keys", "values"):
            if not torch.isfinite(getattr(self, name)).all():
                raise ValueError(f"slot `{name}` contain non-finite values")
        if torch.isnan(self.beta).any() or (self.beta == float("inf")).any():
            raise ValueError("slot `beta` must be finite or -inf (unused slot)")

    @classmethod
    def from_heads(cls, keys, values, beta, block, position) -> "SlotTier":
        """Build from a uniform per-head layout: keys/values [B, Hkv, S, D], beta [B, Hkv, S], block/position [S]."""
        batch, heads, num, dim = keys.shape
        return cls(
            keys.reshape(batch, heads * num, dim),
            values.reshape(batch, heads * num, values.shape[-1]),
            beta.reshape(batch, heads * num),
            torch.arange(heads, device=keys.device).repeat_interleave(num),
            block.repeat(heads),
            position.repeat(heads),
        )

    def map(self, fn) -> "SlotTier":
        """Apply `fn` to the batch-carrying tensors (keys, values, beta, rope)."""
        return SlotTier(fn(self.keys), fn(self.values), fn(self.beta), self.head, self.block, self.position, fn(self.rope))

    def to(self, device) -> "SlotTier":
        fields = (self.keys, self.values, self.beta, self.head, self.block, self.position, self.rope)
        return SlotTier(*(t.to(device) for t in fields))

    @staticmethod
    def cat(first: "SlotTier | None", second: "SlotTier") -> "SlotTier":
        if first is None:
            return second
        return SlotTier(
            torch.cat([first.keys, second.keys], dim=1),
            torch.cat([first.values, second.values], dim=1),
            torch.cat([first.beta, second.beta], dim=1),
            torch.cat([first.head, second.head]),
            torch.cat([first.block, second.block]),
            torch.cat([first.position, second.position]),
            torch.cat([first.rope, second.rope.to(first.rope.device)], dim=1),
        )

    def __len__(self) -> int:
        return self.head.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.beta))

    def timeline(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where the slots sit in time. Slots made by one compaction share their `position` (a slot group);
        within a group each KV head's slots are in time order (storage order).

        Returns (group positions [g] sorted, group widths [g] = the most slots any head has in the group,
        offset [S] of each slot inside its group's width: a head with fewer slots than the width has them
        at the group's end, next to what follows the group). Memoised: a tier changes only by replacement."""
        memo = self.__dict__.get("_timeline")
        if memo is not None:
            return memo
        groups, group_of = torch.unique(self.position, return_inverse=True)
        heads = int(self.head.max()) + 1 if len(self) else 1
        key = group_of * heads + self.head
        counts = torch.bincount(key, minlength=groups.numel() * heads).view(groups.numel(), heads)
        widths = counts.max(dim=1).values
        order = torch.sort(key, stable=True).indices
        first = torch.cumsum(counts.flatten(), 0) - counts.flatten()  # first sorted index of each (group, head)
        rank = torch.empty_like(key)
        rank[order] = torch.arange(key.numel(), device=key.device) - first[key[order]]
        offset = widths[group_of] - counts.flatten()[key] + rank
        self.__dict__["_timeline"] = (groups, widths, offset, group_of, int(widths.sum()))
        return self.__dict__["_timeline"]

    def moved(self, keys: torch.Tensor, rope: torch.Tensor) -> "SlotTier":
        """The same slots with keys re-rotated to the RoPE positions `rope` [B, S] (no re-validation: only
        the rotation changed; the time line stays)."""
        tier = object.__new__(SlotTier)
        tier.__dict__.update(self.__dict__)
        tier.__dict__.pop("_held_dense", None)
        tier.keys, tier.rope = keys, rope
        return tier
