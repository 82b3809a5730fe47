"""Decode attention over a `StaticSparseMemLayer` with every shape fixed and every choice made on the device.

The same function as the reference path for one new query at position L-1 (L = the layer's device length):
sinks, the recent window and the selected blocks of the block store, exact softmax over their union. What
differs is how it is computed: the sinks, a window of `local_tokens` positions and `width` blocks are always
gathered (`width` = the most blocks the selection can take at the buffers' full length), and those that are not
held or not chosen at this length are masked. A step therefore issues the same kernels on the same shapes at
every length, with no value read back to the host, which is what a CUDA graph replay needs.
"""

import functools
import math

import torch

from .block_decode import _minmax_scores_triton, _select_blocks_triton, _triton_extents, selected_tiles_attention, selection_budget, triton
from .scorer import PooledKeyScorer


PAIRWISE_RANKS = 256


def selection_width(max_cache_len: int, options: dict) -> int:
    """Blocks a static step gathers: the selection budget of a query that sees every block of the buffers
    (0 for the dense-equivalent setting, which attends the whole held range instead)."""
    if options["top_k_blocks"] is None:
        return 0
    return _budget(math.ceil(max_cache_len / options["block_size"]), options["top_k_blocks"], options["block_fraction"])


@functools.lru_cache(maxsize=64)
def _budget(num_blocks: int, top_k: int, fraction: float | None) -> int:
    return selection_budget(num_blocks, top_k, fraction)  # computed once per shape, not at every step


def _gather_tokens(tensor: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """tensor [B, Hkv, N, D] at `tokens` ([n] shared by every row, or [B, Hkv, n]); indices past N are clamped
    (their entries are masked by the caller)."""
    tokens = tokens.clamp(min=0, max=tensor.shape[2] - 1)
    if tokens.dim() == 1:
        return tensor.index_select(2, tokens)
    return tensor.gather(2, tokens[..., None].expand(-1, -1, -1, tensor.shape[-1]))


def _block_scores(query_rows, layer, scorer, options, position, use_triton):
    """Scores [B, Hkv, nb] of every block of the buffers for the query at `position`, -inf outside the candidates
    (blocks holding a key in [sink, position - local])."""
    size, sink, local = options["block_size"], options["sink_tokens"], options["local_tokens"]
    first, last = sink // size, torch.div(position - local, size, rounding_mode="floor")
    num_blocks = layer.num_blocks
    if use_triton and isinstance(scorer, PooledKeyScorer) and scorer.kind == "minmax":
        # one launch: the bound straight from the summary buffers, -inf outside the candidates
        return _minmax_scores_triton(query_rows, layer.key_min, layer.key_max, num_blocks, first, -1,
                                     length=layer.length, local=local, block_size=size)
    blocks = torch.arange(num_blocks, device=position.device)
    candidates = (blocks >= first) & (blocks <= last)
    scores = scorer(query_rows[:, :, :, None].float(), layer.summaries(), candidates.view(1, 1, 1, -1))[:, :, 0]
    return scores.masked_fill(~candidates, float("-inf"))


def _chosen_blocks(scores, options, width):
    """The `width` best blocks [B, Hkv, width] by `scores`, and which of them the selection takes (its budget
    for the number of candidates, the finite scores)."""
    fraction = options["block_fraction"]
    # a fraction budget cuts the `width` best by rank: up to PAIRWISE_RANKS wide, ranks from pairwise comparisons
    # (cheaper than sorting the top-k); wider, a sorted top-k (the comparisons grow with the square)
    by_sort = fraction is not None and width > PAIRWISE_RANKS
    top = scores.topk(width, dim=-1, sorted=by_sort)
    chosen = top.values > float("-inf")  # fewer candidates than `width`: the rest are padding
    if fraction is not None:
        # a budget of ceil(fraction x candidates), at least top_k
        candidates = (scores > float("-inf")).sum(-1, keepdim=True)
        budget = torch.ceil(candidates * fraction).clamp(min=options["top_k_blocks"])
        if by_sort:
            rank = torch.arange(width, device=scores.device)
        else:
            rank = (top.values[..., None, :] > top.values[..., :, None]).sum(-1)
        chosen = chosen & (rank < budget)
    return top.indices, chosen


def static_decode_attention(query: torch.Tensor, layer, scaling: float, scorer, options: dict, width: int,
                            use_triton: bool | None = None):
    """query [B, H, 1, D] of the token the layer just wrote at position L-1 (L = `layer.length`).

    Returns (output [B, 1, H, D] in the query dtype, attended (query head, key) pairs as a 0-d tensor). On CUDA
    (power-of-two block size >= 8 and head dim >= 16) the block-sparse decode kernel reads the chosen blocks and the anchors
    in place, with L read from the device; elsewhere they are gathered."""
    batch, heads, _, dim = query.shape
    keys, values = layer.keys, layer.values
    kv_heads = keys.shape[1]
    groups = heads // kv_heads
    size, sink, local = options["block_size"], options["sink_tokens"], options["local_tokens"]
    position = layer.length - 1  # [1]
    query_rows = query.view(batch, kv_heads, groups, dim)
    if use_triton is None:
        use_triton = triton is not None and query.is_cuda and _triton_extents(size, dim)
    if options["top_k_blocks"] is not None and use_triton:
        if width:
            # one launch: the budget's best blocks, best first, padded with a block past the buffers
            scores = _block_scores(query_rows, layer, scorer, options, position, True)
            index = _select_blocks_triton(scores, width, options["top_k_blocks"], options["block_fraction"])
        else:
            index = torch.zeros(batch, kv_heads, 0, dtype=torch.long, device=query.device)
        output, _, keys_attended = selected_tiles_attention(
            query_rows, keys, values, index, sink, local, scaling, size, query.dtype, length=layer.length
        )
        return output.view(batch, 1, heads, dim), keys_attended * groups
    if options["top_k_blocks"] is None:
        # dense-equivalent: every held key
        held = torch.arange(keys.shape[2], device=keys.device) <= position
        parts = [(keys, values, held.expand(batch, kv_heads, -1))]
    else:
        parts = []
        if sink:
            tokens = torch.arange(sink, device=keys.device)
            parts.append((keys[:, :, :sink], values[:, :, :sink], (tokens <= position).expand(batch, kv_heads, -1)))
        if local:
            # the recent window: the `local` newest positions up to the query, past the sinks
            tokens = position - local + 1 + torch.arange(local, device=keys.device)
            held = (tokens >= sink).expand(batch, kv_heads, -1)
            parts.append((_gather_tokens(keys, tokens), _gather_tokens(values, tokens), held))
        if width:
            index, chosen = _chosen_blocks(_block_scores(query_rows, layer, scorer, options, position, False), options, width)
            tokens = (index[..., None] * size + torch.arange(size, device=keys.device)).flatten(-2)
            attended = chosen.repeat_interleave(size, dim=-1) & (tokens >= sink) & (tokens <= position - local)
            parts.append((_gather_tokens(keys, tokens), _gather_tokens(values, tokens), attended))
    part_keys = torch.cat([part[0] for part in parts], dim=2).float()
    part_values = torch.cat([part[1] for part in parts], dim=2).float()
    valid = torch.cat([part[2] for part in parts], dim=2)  # [B, Hkv, n]
    logits = torch.einsum("bhgd,bhnd->bhgn", query_rows.float(), part_keys).mul_(scaling)
    logits = logits.masked_fill(~valid[:, :, None], float("-inf"))
    output = torch.softmax(logits, dim=-1) @ part_values  # the query's own key is always valid
    attended = valid.sum() * groups
    return output.view(batch, heads, 1, dim).transpose(1, 2).to(query.dtype), attended
