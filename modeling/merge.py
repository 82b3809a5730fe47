"""Exact merging of attention computed separately over disjoint sets of keys.

Each tier returns its normalised output and the log-sum-exp of its logits; the softmax over the union
is the LSE-weighted mix of the tiers (the identity FlashAttention uses across key blocks). A tier that
sees no key for a query has LSE = -inf and weight 0.
"""

import torch


def masked_attention(logits: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the keys where `mask` is True.

    `logits` [..., Q, N] (fp32), `mask` broadcastable to it, `values` [..., N, D].
    Returns output [..., Q, D] and lse [..., Q]; rows with no visible key give zeros and -inf.
    """
    any_visible = mask.any(dim=-1)
    logits = logits.masked_fill(~mask, float("-inf"))
    # rows without any key are given a finite lse so gradients stay finite; their probs are all 0
    lse = torch.logsumexp(logits.masked_fill(~any_visible.unsqueeze(-1), 0.0), dim=-1)
    probs = torch.exp(logits - lse.unsqueeze(-1))
    return probs @ values, lse.masked_fill(~any_visible, float("-inf"))


def merge_attention_states(states: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge [(output [..., Q, D], lse [..., Q]), ...] into the attention over the union of their keys."""
    lses = torch.stack([lse for _, lse in states])
    any_finite = torch.isfinite(lses).any(dim=0)
    total = torch.logsumexp(lses.masked_fill(~any_finite, 0.0), dim=0)
    weights = torch.exp(lses - total)
    output = sum(w.unsqueeze(-1) * out for w, (out, _) in zip(weights, states))
    return output, total.masked_fill(~any_finite, float("-inf"))
