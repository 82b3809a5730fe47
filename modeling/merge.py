"""Exact merging of attention computed separately over disjoint sets of keys.

Each tier returns its normalised output and the log-sum-exp of its logits; the softmax over the union
is the LSE-weighted mix of the tiers (the identity FlashAttention uses across key blocks). A tier that
sees no key for a query has LSE = -inf and weight 0.
"""

import torch


def masked_attention(
    logits: torch.Tensor, mask: torch.Tensor, values: torch.Tensor, need_lse: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax attention over the keys where `mask` is True, in the grouped-query layout.

    `logits` [B, Hkv, G, Q, N] (fp32; overwritten when no gradient is needed), `mask` broadcastable to
    it, `values` [B, Hkv, N, D] shared by the G query heads of a KV head. Returns output
    [B, Hkv, G, Q, D] and lse [B, Hkv, G, Q] (None unless `need_lse`); rows with no visible key give
    zeros and lse -inf.
    """
    any_visible = mask.any(dim=-1)
    if torch.is_grad_enabled():
        logits = logits.masked_fill(~mask, float("-inf"))
    else:
        logits.masked_fill_(~mask, float("-inf"))
    row_max = logits.amax(dim=-1).masked_fill(~any_visible, 0.0)
    probs = torch.softmax(logits, dim=-1)
    probs = probs.masked_fill(~any_visible.unsqueeze(-1), 0.0)
    output = torch.einsum("bhgqn,bhnd->bhgqd", probs, values)
    if not need_lse:
        return output, None
    # softmax's largest probability is exp(max - lse): recover lse without a second pass of exp
    lse = row_max - torch.log(probs.amax(dim=-1).clamp(min=torch.finfo(probs.dtype).tiny))
    return output, lse.masked_fill(~any_visible, float("-inf"))


def merge_attention_states(states: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge [(output [..., Q, D], lse [..., Q]), ...] into the attention over the union of their keys."""
    lses = torch.stack([lse for _, lse in states])
    any_finite = torch.isfinite(lses).any(dim=0)
    total = torch.logsumexp(lses.masked_fill(~any_finite, 0.0), dim=0)
    weights = torch.exp(lses - total)
    output = sum(w.unsqueeze(-1) * out for w, (out, _) in zip(weights, states))
    return output, total.masked_fill(~any_finite, float("-inf"))
