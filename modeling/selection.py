"""Top-k block selection."""

import torch


def select_blocks(scores: torch.Tensor, candidates: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Boolean [B, Hkv, Q, num_blocks] of the blocks each query attends at full resolution.

    `scores` [B, Hkv, Q, nb]; `candidates` (broadcastable to it) marks blocks that hold at least one key
    the query may see and that is not already an anchor. `top_k=None` selects every candidate.
    """
    candidates = candidates.expand_as(scores)
    if top_k is None or top_k >= scores.shape[-1]:
        return candidates.clone()
    masked = scores.masked_fill(~candidates, float("-inf"))
    top = masked.topk(top_k, dim=-1).indices
    selected = torch.zeros_like(candidates).scatter_(-1, top, True)
    # topk pads with non-candidates when fewer than top_k exist
    return selected & candidates
