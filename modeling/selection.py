"""Block selection: a fixed budget (top-k, or a fraction of the candidates), or as many blocks as it takes
to cover a share of the attention mass estimated by the learned scorer (`block_mass`)."""

import torch


def select_blocks(
    scores: torch.Tensor, candidates: torch.Tensor, top_k: int | None, fraction: float | None = None,
    mass: torch.Tensor | None = None, coverage: float | None = None,
) -> torch.Tensor:
    """Boolean [B, Hkv, Q, num_blocks] of the blocks each query attends at full resolution.

    `scores` [B, Hkv, Q, nb]; `candidates` (broadcastable to it) marks blocks that hold at least one key
    the query may see and that is not already an anchor. Each query takes its `top_k` best candidates,
    or, with `fraction`, ceil(fraction x its number of candidates) and at least `top_k`.
    `top_k=None` selects every candidate (dense-equivalent), whatever the fraction.
    With `coverage`, each query takes its candidates best first until their estimated share `mass` of the
    cold attention (same shape, summing to 1 over the candidates) reaches `coverage`: at least `top_k`
    blocks, at most the `fraction` budget when one is set.
    """
    candidates = candidates.expand_as(scores)
    if top_k is None:
        return candidates.clone()
    if coverage is not None:
        return _select_by_coverage(scores, candidates, top_k, fraction, mass, coverage)
    if fraction is None:
        if top_k >= scores.shape[-1]:
            return candidates.clone()
        masked = scores.masked_fill(~candidates, float("-inf"))
        top = masked.topk(top_k, dim=-1).indices
        selected = torch.zeros_like(candidates).scatter_(-1, top, True)
        # topk pads with non-candidates when fewer than top_k exist
        return selected & candidates
    # a per-query budget: the `budget` best candidates of each row. Every budget is at most the one
    # of a row whose blocks are all candidates, so one top-k of that width serves every row.
    budget = torch.ceil(candidates.sum(-1, keepdim=True) * fraction).clamp(min=top_k)
    num_blocks = scores.shape[-1]
    widest = torch.ceil(torch.tensor(num_blocks, dtype=budget.dtype) * fraction).clamp(min=top_k)
    width = min(int(widest), num_blocks)
    masked = scores.masked_fill(~candidates, float("-inf"))
    top = masked.topk(width, dim=-1).indices  # best first
    keep = torch.arange(width, device=scores.device) < budget
    return torch.zeros_like(candidates).scatter_(-1, top, keep) & candidates


def coverage_counts(
    scores: torch.Tensor, candidates: torch.Tensor, top_k: int, fraction: float | None, mass: torch.Tensor, coverage: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks each query keeps [..., 1], candidate order best first [..., nb]) for `coverage` selection."""
    masked = scores.masked_fill(~candidates, float("-inf"))
    order = masked.argsort(dim=-1, descending=True, stable=True)
    covered = mass.float().masked_fill(~candidates, 0.0).gather(-1, order).cumsum(-1)
    # blocks needed: those before the running share reaches `coverage`, plus the one that reaches it
    count = (covered < coverage).sum(-1, keepdim=True) + 1
    available = candidates.sum(-1, keepdim=True)
    cap = available if fraction is None else torch.ceil(available * fraction).clamp(min=top_k)
    return torch.minimum(count.clamp(min=top_k), torch.minimum(cap, available)), order


def scores_and_mass(scorer, query, summaries, candidates):
    """The scorer's (selection scores, estimated share of the cold attention mass per block): what
    `block_mass` selection needs, which only the learned scorer has."""
    if not hasattr(scorer, "scores_and_mass"):
        raise ValueError("`block_mass` needs scorer='learned': a training-free score is no estimate of attention mass")
    return scorer.scores_and_mass(query, summaries, candidates)


def _select_by_coverage(scores, candidates, top_k, fraction, mass, coverage):
    if mass is None:
        raise ValueError("`block_mass` selection needs the scorer's mass estimate (scorer='learned')")
    count, order = coverage_counts(scores, candidates, top_k, fraction, mass, coverage)
    keep = torch.arange(scores.shape[-1], device=scores.device) < count
    return torch.zeros_like(candidates).scatter_(-1, order, keep) & candidates


def score_and_select(scorer, query, summaries, candidates, top_k, fraction, coverage=None):
    """(selection scores, selected blocks) for `query` against the block `summaries`: the scorer's ranking,
    cut by the budget, or by the mass threshold `coverage` (which needs `scorer.scores_and_mass`)."""
    if coverage is None or top_k is None:
        scores = scorer(query, summaries, candidates)
        return scores, select_blocks(scores, candidates, top_k, fraction)
    scores, mass = scores_and_mass(scorer, query, summaries, candidates)
    return scores, select_blocks(scores, candidates, top_k, fraction, mass, coverage)
