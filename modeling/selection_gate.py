"""A differentiable route from an end-to-end loss to the block scorer.

Top-k selection is a step function of the scores, so the next-token loss of the sparse model gives the
scorer no gradient. While calibrating, attention multiplies each cold block's keys by a gate that is the
hard selection in the forward pass (so the forward pass is exactly the sparse model's) and carries the
gradient of a sigmoid of the score's distance to the selection boundary backwards (straight-through).
The softmax is written with those gates as weights, so an unselected block still receives the gradient
"how would the output change if this block were attended", which is what should move it across the
boundary. Only used when a gradient is being computed and the config sets `selection_gate_temperature`;
inference never takes this path.
"""

import torch


def straight_through_gate(
    scores: torch.Tensor, selected: torch.Tensor, candidates: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Block gates [B, Hkv, Q, nb] that equal the hard selection (1 selected, 0 not) in the forward pass
    and carry the gradient of sigmoid((score - threshold) / temperature) backwards.

    The threshold sits halfway between the lowest selected and the highest unselected candidate score,
    so blocks near the budget boundary get the largest gradient: the end-to-end loss then tells the
    scorer which boundary blocks should swap in or out.
    """
    scores = scores.float()
    finite = torch.isfinite(scores) & candidates
    low = scores.masked_fill(~(selected & finite), float("inf")).amin(-1, keepdim=True)
    high = scores.masked_fill(~(~selected & finite), float("-inf")).amax(-1, keepdim=True)
    low = torch.where(torch.isfinite(low), low, high)
    high = torch.where(torch.isfinite(high), high, low)
    threshold = torch.where(torch.isfinite(low), (low + high) / 2, torch.zeros_like(low)).detach()
    soft = torch.sigmoid((scores.masked_fill(~finite, -1e4) - threshold) / temperature)
    hard = selected.float()
    return hard + (soft - soft.detach())


def gated_attention(
    logits: torch.Tensor, visible: torch.Tensor, weights: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention where key j enters with weight w_j: out = sum_j w_j e^(l_j) v_j / sum_j w_j e^(l_j).

    `logits` [B, Hkv, G, Q, N], `visible` and `weights` broadcastable to it, `values` [B, Hkv, N, D].
    With 0/1 weights this is `masked_attention` over the keys with weight 1. Returns (output, lse).
    """
    logits = logits.masked_fill(~visible, float("-inf"))
    row_max = logits.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    scores = torch.exp(logits - row_max) * weights
    total = scores.sum(-1, keepdim=True)
    probs = scores / total.clamp(min=torch.finfo(scores.dtype).tiny)
    output = torch.einsum("bhgqn,bhnd->bhgqd", probs, values)
    lse = (row_max + torch.log(total)).squeeze(-1)
    return output, lse
