"""Top-k block selection."""

import torch


def select_blocks(
    scores: torch.Tensor, candidates: torch.Tensor, top_k: int | None, fraction: float | None = None
) -> torch.Tensor:
    """Boolean [B, Hkv, Q, num_blocks] of the blocks each query attends at full resolution.

    `scores` [B, Hkv, Q, nb]; `candidates` (broadcastable to it) marks blocks that hold at least one key
    the query may see and that is not already an anchor. Each query takes its `top_k` best candidates,
    or, with `fraction`, ceil(fraction x its number of candidates) and at least `top_k`.
    `top_k=None` selects every candidate (dense-equivalent), whatever the fraction.
    """
    candidates = candidates.expand_as(scores)
    if top_k is None:
        return candidates.clone()
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
