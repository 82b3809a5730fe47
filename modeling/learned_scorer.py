"""Learned block scorer: a trained mix of the training-free scores plus a trained low-rank relevance projection.

For each KV head h the scorer maps the query (per query head of the group) and the pooled keys of each
block (max, min and mean of its post-RoPE keys, so the block's positions are already rotated in) to a
small space of `scorer_dim` dimensions and adds their dot product to the mixed training-free scores:

    score[b] = a_h * z(minmax bound) + c_h * z(q . mean key) + max_g (W_q,h q_g) . (W_k,h [max_b; min_b; mean_b]) / sqrt(r)

The query side is maxed over the query heads of a KV group, like the training-free scorer, so the
choice is shared by the group. `W_k` starts at zero and `(a_h, c_h)` at (1, 0) for `init="minmax"` or
(1, 1) for `init="hybrid"`, so an untrained scorer ranks blocks exactly as that training-free scorer
(z-scoring one term keeps its order) and a calibration starts no worse than it.
`inverse_temperature` only shapes the scorer's softmax distribution used for training; ranking (and so
selection) does not depend on it.

`relevance` is the trained score (what phase 1 fits); `forward` is what selection ranks by: with
`union="minmax"` a block's better rank under the trained score and under the bound, so the budget
takes the best blocks of both orders. The z-scores are taken over the blocks a query may choose (its
`candidates`), so a query's ranking never depends on blocks after it.
"""

import math

import torch
from torch import nn

from .scorer import BlockSummaries, PooledKeyScorer, _standardize, standardization_rows


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry within its row, 0 for the largest."""
    order = scores.argsort(dim=-1, descending=True)
    return torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))


class LearnedBlockScorer(nn.Module):
    """Per-layer learned block scorer; `forward(query [B, Hkv, G, Q, D], summaries)` -> [B, Hkv, Q, nb]."""

    def __init__(self, num_kv_heads: int, head_dim: int, dim: int = 64, init: str = "minmax", union: str | None = "minmax"):
        super().__init__()
        if init not in ("minmax", "hybrid"):
            raise ValueError(f"`scorer_init` must be 'minmax' or 'hybrid', got {init!r}")
        if union not in (None, "minmax"):
            raise ValueError(f"`scorer_union` must be None or 'minmax', got {union!r}")
        self.num_kv_heads, self.head_dim, self.dim, self.init, self.union = num_kv_heads, head_dim, dim, init, union
        self.query_proj = nn.Parameter(torch.empty(num_kv_heads, head_dim, dim))
        self.key_proj = nn.Parameter(torch.empty(num_kv_heads, 3 * head_dim, dim))
        self.mix = nn.Parameter(torch.empty(num_kv_heads, 2))
        self.inverse_temperature = nn.Parameter(torch.empty(num_kv_heads))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # W_q random (so W_k receives gradient from the first step), W_k zero: the learned term starts at 0
        generator = torch.Generator(device="cpu").manual_seed(0)
        weight = torch.randn(self.query_proj.shape, generator=generator) / math.sqrt(self.head_dim)
        self.query_proj.copy_(weight.to(self.query_proj.device, self.query_proj.dtype))
        self.key_proj.zero_()
        self.mix.fill_(1.0)
        if self.init == "minmax":
            self.mix[:, 1] = 0.0
        self.inverse_temperature.fill_(1.0)

    def relevance(self, query: torch.Tensor, summaries: BlockSummaries, candidates=None) -> torch.Tensor:
        """The trained score, [B, Hkv, Q, nb]: the mixed standardised terms plus the learned projection term
        (the distribution phase 1 fits; -inf on empty blocks)."""
        return self.scores(query, summaries, candidates)[0]

    def forward(self, query: torch.Tensor, summaries: BlockSummaries, candidates=None) -> torch.Tensor:
        """Selection scores [B, Hkv, Q, nb] (see `scores`)."""
        return self.scores(query, summaries, candidates)[1]

    def scores(self, query: torch.Tensor, summaries: BlockSummaries, candidates=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(trained score, selection score), each [B, Hkv, Q, nb]. With `union="minmax"` a block's selection
        score is the better of its two ranks, under the trained score and under the minmax bound
        (negated, so higher is better): the top-k then takes the best blocks of both orders in turn. A
        block holding one key that matches the query far better than the rest (the source of a copy, a
        pass key) stays selected even where the trained score, fitted to average attention mass, ranks it
        low; ranks rather than values, so neither score's scale decides how the budget is shared."""
        query = query.float()
        bound, mean = PooledKeyScorer.raw_scores(query, summaries)
        empty = summaries.count.view(1, 1, 1, -1) == 0
        valid = standardization_rows(empty, candidates, mean.shape)
        bound = _standardize(bound.masked_fill(~valid, 0.0), valid)
        mix = self.mix.float()
        trained = mix[None, :, None, None, 0] * bound + mix[None, :, None, None, 1] * _standardize(mean.masked_fill(~valid, 0.0), valid)
        pooled = torch.cat([summaries.key_max, summaries.key_min, summaries.key_mean], dim=-1).float()
        pooled = pooled.masked_fill(~torch.isfinite(pooled), 0.0)  # empty blocks hold +-inf extrema
        keys = torch.einsum("bhnc,hcr->bhnr", pooled, self.key_proj.float())
        queries = torch.einsum("bhgqd,hdr->bhgqr", query, self.query_proj.float())
        trained = trained + torch.einsum("bhgqr,bhnr->bhgqn", queries, keys).amax(dim=2) / math.sqrt(self.dim)
        trained = trained.masked_fill(empty, float("-inf"))
        if self.union != "minmax":
            return trained, trained
        low = torch.finfo(trained.dtype).min
        better = torch.minimum(_ranks(trained.masked_fill(~valid, low)), _ranks(bound.masked_fill(~valid, low)))
        # ties in the better rank go to the trained score's order
        fused = -better.float() + torch.sigmoid(_standardize(trained.masked_fill(~valid, 0.0), valid)) * 0.5
        return trained, fused.masked_fill(~valid, float("-inf"))

    def scores_and_mass(self, query: torch.Tensor, summaries: BlockSummaries, candidates) -> tuple[torch.Tensor, torch.Tensor]:
        """(selection scores, estimated share of the cold attention mass of each candidate block), each
        [B, Hkv, Q, nb]. The estimate is the distribution phase 1 fits to the dense model's block mass,
        so a threshold on it (`block_mass`) sets each query's density from what it attends to."""
        trained, selection = self.scores(query, summaries, candidates)
        candidates = candidates.expand_as(trained) & torch.isfinite(trained)
        return selection, torch.exp(self.log_distribution(trained, candidates)).nan_to_num(0.0)

    def log_distribution(self, scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Log-softmax of the scores over each query's candidate blocks (the distribution trained by KL)."""
        logits = scores * self.inverse_temperature.float()[None, :, None, None]
        logits = logits.masked_fill(~candidates, float("-inf"))
        return torch.log_softmax(logits, dim=-1)


def build_scorer(config) -> nn.Module:
    """The block scorer the config's `scorer` option names: this module's learned scorer, or a training-free
    `PooledKeyScorer`."""
    if config.scorer == "learned":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = config.num_key_value_heads or config.num_attention_heads
        return LearnedBlockScorer(kv_heads, head_dim, config.scorer_dim, config.scorer_init, config.scorer_union)
    return PooledKeyScorer(config.scorer, getattr(config, "scorer_sub_block", None))
