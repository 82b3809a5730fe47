"""Block scorers: rank the blocks of the block store for each query.

A scorer reads per-block routing summaries (pooled keys) instead of the keys themselves, so a decode
step scores O(blocks) items. Scores are shared by the query heads of one KV group (max over the
group), because the selected blocks are fetched once per KV head.
"""

from dataclasses import dataclass, fields

import torch
from torch import nn


SCORER_KINDS = ("minmax", "mean", "hybrid", "subminmax")


@dataclass
class BlockSummaries:
    """Pooled keys of each block, per (batch, KV head): [B, Hkv, num_blocks, D]; `count` is [num_blocks].

    With `sub_block` set, also the extrema of every sub-block of `sub_block` consecutive positions of a
    block: `sub_min`/`sub_max` [B, Hkv, num_blocks, block_size // sub_block, D] (+inf/-inf where a
    sub-block holds no key) and `sub_count` [num_blocks, block_size // sub_block].
    """

    key_min: torch.Tensor
    key_max: torch.Tensor
    key_mean: torch.Tensor
    count: torch.Tensor
    sub_block: int | None = None
    sub_min: torch.Tensor | None = None
    sub_max: torch.Tensor | None = None
    sub_count: torch.Tensor | None = None

    @property
    def num_blocks(self) -> int:
        return self.count.shape[0]

    def to(self, device) -> "BlockSummaries":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return BlockSummaries(**{name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in moved.items()})


def _with_sub_blocks(fine: BlockSummaries, sub_block: int, per_block: int) -> BlockSummaries:
    """Block summaries pooled from the summaries `fine` of sub-blocks (`per_block` consecutive ones make a
    block), keeping the sub-blocks' extrema for the "subminmax" scorer."""
    batch, kv_heads, _, dim = fine.key_min.shape
    sub_min = fine.key_min.view(batch, kv_heads, -1, per_block, dim)
    sub_max = fine.key_max.view(batch, kv_heads, -1, per_block, dim)
    sub_count = fine.count.view(-1, per_block)
    count = sub_count.sum(-1)
    key_sum = (fine.key_mean * fine.count.view(1, 1, -1, 1).to(fine.key_mean.dtype)).view(batch, kv_heads, -1, per_block, dim).sum(-2)
    key_mean = key_sum / count.clamp(min=1).view(1, 1, -1, 1).to(key_sum.dtype)
    return BlockSummaries(sub_min.amin(-2), sub_max.amax(-2), key_mean, count, sub_block, sub_min, sub_max, sub_count)


def _sub_blocks_per_block(block_size: int, sub_block: int) -> int:
    if block_size % sub_block:
        raise ValueError(f"`scorer_sub_block` ({sub_block}) must divide `block_size` ({block_size})")
    return block_size // sub_block


def summarize_blocks(
    keys: torch.Tensor, block_ids: torch.Tensor, num_blocks: int, positions: torch.Tensor | None = None,
    block_size: int | None = None, sub_block: int | None = None,
) -> BlockSummaries:
    """Min, max and mean of the stored keys of every block. `keys` [B, Hkv, N, D], `block_ids` [N].

    With `sub_block`, also the sub-blocks' extrema; a key's sub-block is read from its logical position
    (`positions` [N]) inside its block of `block_size` positions.
    """
    if sub_block is not None:
        per_block = _sub_blocks_per_block(block_size, sub_block)
        sub_ids = torch.div(positions % block_size, sub_block, rounding_mode="floor")
        fine = summarize_blocks(keys, block_ids * per_block + sub_ids, num_blocks * per_block)
        return _with_sub_blocks(fine, sub_block, per_block)
    batch, kv_heads, _, dim = keys.shape
    keys = keys.float()
    index = block_ids.view(1, 1, -1, 1).expand_as(keys)
    shape = (batch, kv_heads, num_blocks, dim)
    key_min = keys.new_full(shape, float("inf")).scatter_reduce(2, index, keys, "amin")
    key_max = keys.new_full(shape, float("-inf")).scatter_reduce(2, index, keys, "amax")
    key_sum = keys.new_zeros(shape).scatter_add(2, index, keys)
    count = torch.bincount(block_ids, minlength=num_blocks)
    key_mean = key_sum / count.clamp(min=1).view(1, 1, -1, 1).to(key_sum.dtype)
    return BlockSummaries(key_min, key_max, key_mean, count)


def summarize_contiguous_blocks(keys: torch.Tensor, block_size: int, num_blocks: int, sub_block: int | None = None) -> BlockSummaries:
    """`summarize_blocks` for keys at positions 0..N-1 (nothing evicted): reductions over a reshape.

    Blocks past the keys (num_blocks > ceil(N / block_size)) are empty.
    """
    if sub_block is not None:
        per_block = _sub_blocks_per_block(block_size, sub_block)
        fine = summarize_contiguous_blocks(keys, sub_block, num_blocks * per_block)
        return _with_sub_blocks(fine, sub_block, per_block)
    batch, kv_heads, total, dim = keys.shape
    whole = total // block_size
    if whole == num_blocks and total == whole * block_size:  # whole blocks only: plain reductions
        blocks = keys.view(batch, kv_heads, whole, block_size, dim)
        key_sum = blocks.sum(-2, dtype=torch.float32)
        count = torch.full((num_blocks,), block_size, dtype=torch.long, device=keys.device)
        return BlockSummaries(blocks.amin(-2).float(), blocks.amax(-2).float(), key_sum / block_size, count)
    shape = (batch, kv_heads, num_blocks, dim)
    key_min = keys.new_full(shape, float("inf"), dtype=torch.float32)
    key_max = keys.new_full(shape, float("-inf"), dtype=torch.float32)
    key_sum = keys.new_zeros(shape, dtype=torch.float32)
    count = torch.zeros(num_blocks, dtype=torch.long, device=keys.device)
    if whole:
        blocks = keys[:, :, : whole * block_size].view(batch, kv_heads, whole, block_size, dim)
        key_min[:, :, :whole] = blocks.amin(-2)
        key_max[:, :, :whole] = blocks.amax(-2)
        key_sum[:, :, :whole] = blocks.sum(-2, dtype=torch.float32)
        count[:whole] = block_size
    if total > whole * block_size:
        tail = keys[:, :, whole * block_size :]
        key_min[:, :, whole] = tail.amin(-2)
        key_max[:, :, whole] = tail.amax(-2)
        key_sum[:, :, whole] = tail.sum(-2, dtype=torch.float32)
        count[whole] = total - whole * block_size
    key_mean = key_sum / count.clamp(min=1).view(1, 1, -1, 1).to(key_sum.dtype)
    return BlockSummaries(key_min, key_max, key_mean, count)


def _standardize(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """z-score over the valid blocks of each row, so scores of different kinds can be added."""
    zeros = torch.zeros_like(scores)
    count = valid.sum(-1, keepdim=True).clamp(min=1)
    mean = torch.where(valid, scores, zeros).sum(-1, keepdim=True) / count
    var = torch.where(valid, (scores - mean) ** 2, zeros).sum(-1, keepdim=True) / count
    # clamp before the root: a constant row then has a zero gradient, not an infinite one
    return torch.where(valid, (scores - mean) / var.clamp(min=1e-12).sqrt(), zeros)


def standardization_rows(empty: torch.Tensor, candidates: torch.Tensor | None, shape) -> torch.Tensor:
    """The blocks each row of scores is standardised over: non-empty ones, among `candidates` if given."""
    valid = ~empty.expand(shape)
    return valid if candidates is None else valid & candidates.expand(shape)


class PooledKeyScorer(nn.Module):
    """Training-free scorer.

    "minmax": sum_d max(q_d * max_d, q_d * min_d), an upper bound of q.k over every key of the block, so a
        block holding one strongly matching key (a needle) ranks high even when its mean does not.
    "mean": q . mean key of the block.
    "hybrid": the sum of both after z-scoring each over the blocks of the query. On SmolLM2-135M the two
        are complementary (the bound wins in early layers, the mean in middle ones) and their sum
        captures more of the dense attention mass than either (recall of the last query's cold attention
        mass .77 vs .74 at 6K tokens), yet in pass-key retrieval the bound alone keeps the needle block
        more often, which is why "minmax" is the default.
    "subminmax": the "minmax" bound of every sub-block of `sub_block` consecutive positions, and a block
        scores its best sub-block's: several representative ranges per block. The bound over a whole
        block loosens as the block grows (each dimension takes its extreme over all its keys), so with
        GPU-sized blocks (64, 128 tokens) it stops singling out the block that holds a needle; over
        sub-blocks it stays as tight as small blocks while selection, summaries of blocks and attention
        keep the large ones. `sub_block=1` gives the exact max of q.k over the block's keys,
        `sub_block=block_size` the "minmax" bound. Needs summaries built with the same `sub_block`.
    Blocks with no stored key score -inf.
    """

    def __init__(self, kind: str = "minmax", sub_block: int | None = None):
        super().__init__()
        if kind not in SCORER_KINDS:
            raise ValueError(f"`scorer` of a PooledKeyScorer must be one of {SCORER_KINDS}, got {kind!r}")
        if kind == "subminmax":
            if isinstance(sub_block, bool) or not isinstance(sub_block, int) or sub_block < 1:
                raise ValueError(f"scorer='subminmax' needs `scorer_sub_block`, an integer >= 1, got {sub_block!r}")
        elif sub_block is not None:
            raise ValueError(f"`scorer_sub_block` is used by scorer='subminmax' alone, got it ({sub_block!r}) with scorer={kind!r}")
        self.kind = kind
        self.sub_block = sub_block

    @staticmethod
    def _group_max(scores: torch.Tensor, groups: int) -> torch.Tensor:
        """[B, Hkv, G*Q, nb] -> max over the query heads of each group: [B, Hkv, Q, nb]."""
        batch, kv_heads, rows, num_blocks = scores.shape
        return scores.view(batch, kv_heads, groups, rows // groups, num_blocks).amax(dim=2)

    @classmethod
    def bound_scores(cls, query: torch.Tensor, summaries: BlockSummaries) -> torch.Tensor:
        """The minmax bound [B, Hkv, Q, nb] of `query` [B, Hkv, G, Q, D], maxed over each group."""
        batch, kv_heads, groups, num_queries, dim = query.shape
        rows = query.reshape(batch, kv_heads, groups * num_queries, dim)  # one matrix product per KV head
        # max(q_d * max_d, q_d * min_d) picks max_d where q_d >= 0 and min_d where q_d < 0
        bound = torch.matmul(rows.clamp(min=0), summaries.key_max.transpose(-1, -2))
        bound += torch.matmul(rows.clamp(max=0), summaries.key_min.transpose(-1, -2))
        return cls._group_max(bound, groups)

    @classmethod
    def sub_bound_scores(cls, query: torch.Tensor, summaries: BlockSummaries) -> torch.Tensor:
        """The best "minmax" bound [B, Hkv, Q, nb] among the sub-blocks of each block, maxed over each group."""
        batch, kv_heads, num_blocks, per_block, dim = summaries.sub_max.shape
        empty = summaries.sub_count == 0  # [nb, S]: no key, no bound (and no inf * 0 in the products)
        fine = BlockSummaries(
            summaries.sub_min.masked_fill(empty[..., None], 0.0).view(batch, kv_heads, num_blocks * per_block, dim),
            summaries.sub_max.masked_fill(empty[..., None], 0.0).view(batch, kv_heads, num_blocks * per_block, dim),
            None, summaries.sub_count.flatten(),
        )
        bound = cls.bound_scores(query, fine).unflatten(-1, (num_blocks, per_block))
        return bound.masked_fill(empty, float("-inf")).amax(-1)

    @classmethod
    def mean_scores(cls, query: torch.Tensor, summaries: BlockSummaries) -> torch.Tensor:
        """q . mean key [B, Hkv, Q, nb], maxed over each group."""
        batch, kv_heads, groups, num_queries, dim = query.shape
        rows = query.reshape(batch, kv_heads, groups * num_queries, dim)
        return cls._group_max(torch.matmul(rows, summaries.key_mean.transpose(-1, -2)), groups)

    @classmethod
    def raw_scores(cls, query: torch.Tensor, summaries: BlockSummaries) -> tuple[torch.Tensor, torch.Tensor]:
        """(minmax bound, mean score), each maxed over the query heads of a group: [B, Hkv, Q, nb]."""
        return cls.bound_scores(query, summaries), cls.mean_scores(query, summaries)

    def forward(self, query: torch.Tensor, summaries: BlockSummaries, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """`query` [B, Hkv, G, Q, D] -> scores [B, Hkv, Q, num_blocks]. `candidates` (broadcastable to the
        scores): the blocks each query chooses among; "hybrid" standardises over them, so a query's
        ranking never depends on blocks it cannot see (prefill and decode then select alike)."""
        query = query.float()
        empty = summaries.count.view(1, 1, 1, -1) == 0
        if self.kind == "minmax":
            scores = self.bound_scores(query, summaries)
        elif self.kind == "subminmax":
            if summaries.sub_block != self.sub_block:
                raise ValueError(
                    f"scorer 'subminmax' with scorer_sub_block={self.sub_block} got summaries of sub-blocks of "
                    f"{summaries.sub_block} tokens: build them with sub_block={self.sub_block}"
                )
            scores = self.sub_bound_scores(query, summaries)
        elif self.kind == "mean":
            scores = self.mean_scores(query, summaries)
        else:
            bound, mean = self.raw_scores(query, summaries)
            valid = standardization_rows(empty, candidates, mean.shape)
            scores = _standardize(bound.masked_fill(~valid, 0.0), valid) + _standardize(mean.masked_fill(~valid, 0.0), valid)
        return scores.masked_fill(empty, float("-inf"))
