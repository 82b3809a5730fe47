"""Block-sparse prefill through FlexAttention: the CUDA fast path of the "sparsemem" attention function.

It computes the reference path's function with `query_block_size` set (see query_blocks.py): every
query block shares one selection of key blocks, scored from its mean query. Anchors (sinks and the
recent window) and the selected blocks go through one FlexAttention call whose `BlockMask` is built
straight from the selection (`BlockMask.from_kv_blocks`), so no [Q, N] mask is ever materialised and
unselected blocks cost nothing. Blocks attended by every query of a tile run without a mask ("full"
blocks); the rest (diagonal, window edges, sinks) apply the exact per-token rule in `mask_mod`. The
slot tier is computed apart (slot_attention.py) and merged by log-sum-exp.

Shapes are padded to whole blocks (queries at the front, so query blocks stay aligned to logical
positions), which makes each padded (queries, keys) shape one compiled kernel.
"""

import functools
import logging
import math
from dataclasses import dataclass

import torch

from .merge import merge_attention_states
from .query_blocks import pool_query_blocks
from .scorer import summarize_contiguous_blocks
from .selection import score_and_select
from .slot_attention import slot_attention

try:  # FlexAttention ships with torch >= 2.5; the reference path works without it
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - old torch
    BlockMask = flex_attention = None
try:
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover - torch < 2.9 returns the LSE through `return_lse`
    AuxRequest = None

logger = logging.getLogger(__name__)

_compiled = None
# FlexAttention tile options (e.g. {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8}); None = torch's defaults
KERNEL_OPTIONS: dict | None = None
# one compiled kernel per padded (queries, keys) shape: chunked prefill of a long context meets many
_SHAPE_BUCKETS = 64


def _flex_kernel(compiled: bool):
    """One compiled FlexAttention for the process; torch.compile keeps a kernel per padded shape."""
    global _compiled
    if not compiled:
        return flex_attention
    if _compiled is None:
        import torch._dynamo

        # past the limit dynamo would run FlexAttention eagerly, which materialises [Q, N] scores
        name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), _SHAPE_BUCKETS))
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def contiguous_positions(query_positions, key_positions, num_keys: int) -> bool:
    """Keys at positions 0..N-1 (nothing evicted) with the queries the newest of them (waits for the device)."""
    if num_keys == 0 or key_positions.shape[0] != num_keys or int(key_positions[-1]) != num_keys - 1:
        return False
    return int(query_positions[0]) == num_keys - query_positions.shape[0]


def unsupported_reason(query, attention_mask, sliding_window, contiguous: bool, options) -> str | None:
    """Why the fast path cannot compute this call exactly, or None when it can."""
    query_block, block_size = options["query_block_size"], options["block_size"]
    if flex_attention is None:
        return "this torch build has no FlexAttention"
    if not query.is_cuda:
        return "the inputs are not on a CUDA device"
    if query_block is None:
        return "query_block_size is None (per-query selection has no block-sparse kernel)"
    if query_block % 128 or block_size % 128:
        return f"query_block_size ({query_block}) and block_size ({block_size}) must be multiples of 128"
    if query.shape[-2] == 1:
        return "a single query (decode)"
    if attention_mask is not None:
        return "a padding or 4D attention mask"
    if sliding_window is not None:
        return "a sliding window"
    if not contiguous:
        return "evicted tokens (the block store is not contiguous) or queries that are not the newest keys"
    return None


def _closed_sum_clamped(x_first: torch.Tensor, x_last: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """sum_{x=x_first}^{x_last} clamp(x, 0, width), elementwise over int64 tensors (width >= 0)."""

    def prefix(x):  # sum_{t=1}^{x} clamp(t, 0, width); 0 for x <= 0
        x = x.clamp(min=0)
        inside = torch.minimum(x, width)
        return inside * (inside + 1) // 2 + (x - inside) * width

    return prefix(x_last) - prefix(x_first - 1)


@dataclass(frozen=True)
class TileGeometry:
    """What depends on the shapes alone, [nQb, nb] per (query block, key block) tile: candidates (blocks
    holding a non-anchor key visible to a query of the block), anchor tiles needed and anchor tiles
    fully visible, tiles wholly in every query's past, and the keys a selected block gives the queries
    of the tile (`per_tile`); `anchor_pairs` is the anchor (query, key) pairs of one KV head."""

    candidates: torch.Tensor
    anchor_needed: torch.Tensor
    anchor_full: torch.Tensor
    past: torch.Tensor
    per_tile: torch.Tensor
    anchor_pairs: torch.Tensor


@functools.lru_cache(maxsize=8)
def tile_geometry(
    first_query: int, total: int, num_q_blocks: int, num_blocks: int, query_block: int, block_size: int, sink: int, local: int,
    device: torch.device,
) -> TileGeometry:
    """Memoised: every layer of a forward call (and every chunk of the same shape) meets the same one,
    and building it is some fifty small kernels."""
    tile_first = ((first_query - first_query % query_block) + torch.arange(num_q_blocks, device=device) * query_block)[:, None]
    tile_last = tile_first + query_block - 1
    block_first = (torch.arange(num_blocks, device=device) * block_size)[None]
    block_last = block_first + block_size - 1  # not clamped: a block holding padding is never "full"
    causal_any = block_first <= tile_last
    anchor_any = (block_first < sink) | (block_last > tile_first - local)
    anchor_all = (block_last < sink) | (block_first > tile_last - local)
    past = block_last <= tile_first
    last_query = tile_last.clamp(max=total - 1)
    candidates = (block_first <= last_query - local) & (block_last.clamp(max=total - 1) >= sink)

    # keys of a selected block attended by the tile's queries, in closed form: query q sees the
    # non-anchor keys sink <= k <= q - local of the block, clamp(q - local - low + 1, 0, width) of them
    real_first = tile_first.clamp(min=first_query)
    low = block_first.clamp(min=sink)
    width = ((block_first + block_size - 1).clamp(max=total - 1) - low + 1).clamp(min=0)
    per_tile = _closed_sum_clamped(real_first - local - low + 1, last_query - local - low + 1, width)
    q = torch.arange(first_query, total, device=device)
    anchors = torch.clamp(q + 1, max=sink) + (q - torch.clamp(q - local + 1, min=sink) + 1).clamp(min=0)
    return TileGeometry(candidates, anchor_any & causal_any, anchor_all & past, past, per_tile, anchors.sum())


def attended_pairs(
    selected: torch.Tensor, first_query: int, total: int, query_block: int, block_size: int, sink: int, local: int
) -> torch.Tensor:
    """(query, key) pairs attended per KV head, summed over batch and KV heads, in closed form.

    Each query q (positions first_query..total-1) attends its causal anchors plus the non-anchor keys
    sink <= k <= q - local of its block's selected blocks; `selected` [B, Hkv, nQb, nb].
    """
    num_q_blocks, num_blocks = selected.shape[-2:]
    geometry = tile_geometry(first_query, total, num_q_blocks, num_blocks, query_block, block_size, sink, local, selected.device)
    batch_heads = selected.shape[0] * selected.shape[1]
    return geometry.anchor_pairs * batch_heads + torch.where(selected, geometry.per_tile, 0).sum()


def block_lists(flags: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_num_blocks [B, H, nQb], kv_indices [B, H, nQb, W]) of the True entries of [B, Hkv, nQb, nb]
    flags, in increasing block order, repeated for the `groups` query heads of each KV head."""
    counts = flags.sum(-1, dtype=torch.int32)
    # full width, so the shapes a compiled kernel sees depend on the sequence lengths alone: the True
    # entries first, then the False ones, each in increasing order (a stable partition by prefix sums,
    # much cheaper than sorting)
    num_blocks = flags.shape[-1]
    before = flags.cumsum(-1, dtype=torch.int32)  # True entries up to and including each one
    column = torch.arange(num_blocks, dtype=torch.int32, device=flags.device)
    target = torch.where(flags, before - 1, counts[..., None] + column - before)
    order = torch.empty_like(target).scatter_(-1, target.long(), column.expand_as(target).contiguous())
    batch, kv_heads = flags.shape[:2]

    def per_query_head(t):
        return t.unsqueeze(2).expand(batch, kv_heads, groups, *t.shape[2:]).reshape(batch, kv_heads * groups, *t.shape[2:])

    return per_query_head(counts), per_query_head(order)


def tile_flags(
    selected: torch.Tensor, first_query: int, total: int, query_block: int, block_size: int, sink: int, local: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) [B, Hkv, nQb, nb]: tiles computed with the per-token mask, and tiles whose every
    key is attended by every query of the tile (no mask needed)."""
    num_q_blocks, num_blocks = selected.shape[-2:]
    geometry = tile_geometry(first_query, total, num_q_blocks, num_blocks, query_block, block_size, sink, local, selected.device)
    needed = selected | geometry.anchor_needed
    full = (selected & geometry.past) | geometry.anchor_full
    return needed & ~full, full


def block_candidates(first_query: int, total: int, num_q_blocks: int, num_blocks: int, query_block: int, block_size: int, sink: int, local: int, device) -> torch.Tensor:
    """[nQb, nb]: blocks holding a non-anchor key visible to at least one query of the query block."""
    return tile_geometry(first_query, total, num_q_blocks, num_blocks, query_block, block_size, sink, local, torch.device(device)).candidates


@dataclass
class BlockSparsePlan:
    """What one call computes: the shared selection [B, Hkv, nQb, nb] and the BlockMask over padded shapes."""

    selected: torch.Tensor
    block_mask: "BlockMask"
    first_query: int
    front: int
    padded_queries: int
    padded_keys: int


def _select_tiles(query, key, scorer, first_query: int, num_blocks: int, options: dict, groups: int):
    """Selection [B, Hkv, nQb, nb] and the (partial, full) tile lists of the BlockMask."""
    batch, heads, num_queries, dim = query.shape
    kv_heads, total = key.shape[1], key.shape[2]
    query_block, block_size = options["query_block_size"], options["block_size"]
    sink, local = options["sink_tokens"], options["local_tokens"]
    num_q_blocks = math.ceil((first_query % query_block + num_queries) / query_block)
    summaries = summarize_contiguous_blocks(key, block_size, num_blocks, getattr(scorer, "sub_block", None))
    pooled = pool_query_blocks(query.view(batch, kv_heads, groups, num_queries, dim), first_query, query_block)
    candidates = block_candidates(first_query, total, num_q_blocks, num_blocks, query_block, block_size, sink, local, query.device)
    _, selected = score_and_select(scorer, pooled, summaries, candidates[None, None], options["top_k_blocks"],
                                   options["block_fraction"], options.get("block_mass"))
    partial, full = tile_flags(selected, first_query, total, query_block, block_size, sink, local)
    # both lists in one pass: [2B, Hkv, ...] then split (each half stays contiguous)
    counts, order = block_lists(torch.cat([partial, full]), groups)
    return selected, (counts[:batch], order[:batch]), (counts[batch:], order[batch:])


def plan_block_sparse(query: torch.Tensor, key: torch.Tensor, scorer, options: dict, slots=None) -> BlockSparsePlan:
    """Score the key blocks for every query block, select, and build the BlockMask (no attention yet).

    query [B, H, Q, D] at logical positions N-Q..N-1, key [B, Hkv, N, D] at 0..N-1.
    """
    batch, heads, num_queries, dim = query.shape
    kv_heads, total = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    query_block, block_size = options["query_block_size"], options["block_size"]
    sink, local = options["sink_tokens"], options["local_tokens"]
    first_query = total - num_queries
    front = first_query % query_block
    num_q_blocks = math.ceil((front + num_queries) / query_block)
    num_blocks = math.ceil(total / block_size)
    if slots is not None and len(slots) and slots.block.numel():
        num_blocks = max(num_blocks, int(slots.block.max()) + 1)

    # selection: one per (batch, KV head, query block), as in the reference path
    selected, (kv_num_blocks, kv_indices), (full_num_blocks, full_indices) = _select_tiles(
        query, key, scorer, first_query, num_blocks, options, groups
    )
    query_origin = torch.tensor(first_query - front, device=query.device)

    def mask_mod(b, h, q_idx, kv_idx):
        position = q_idx + query_origin
        anchor = (kv_idx < sink) | (kv_idx > position - local)
        chosen = selected[b, h // groups, q_idx // query_block, kv_idx // block_size]
        return (kv_idx <= position) & (anchor | chosen)

    padded_queries, padded_keys = num_q_blocks * query_block, num_blocks * block_size
    block_mask = BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices,
        full_num_blocks,
        full_indices,
        BLOCK_SIZE=(query_block, block_size),
        mask_mod=mask_mod,
        seq_lengths=(padded_queries, padded_keys),
        compute_q_blocks=False,
    )
    return BlockSparsePlan(selected, block_mask, first_query, front, padded_queries, padded_keys)


def run_flex(query, key, value, plan: BlockSparsePlan, scaling: float, need_lse: bool, compiled: bool = True):
    """FlexAttention over the plan's tiles: (output [B, H, Q, D], lse [B, H, Q] natural log or None)."""
    num_queries, total = query.shape[-2], key.shape[-2]
    pad = torch.nn.functional.pad
    q_in = pad(query, (0, 0, plan.front, plan.padded_queries - plan.front - num_queries))
    k_in, v_in = (pad(t, (0, 0, 0, plan.padded_keys - total)) for t in (key, value))
    kernel = _flex_kernel(compiled)
    kwargs = dict(block_mask=plan.block_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    if KERNEL_OPTIONS:
        kwargs["kernel_options"] = dict(KERNEL_OPTIONS)
    if not need_lse:
        out, lse = kernel(q_in, k_in, v_in, **kwargs), None
    elif AuxRequest is not None:
        out, aux = kernel(q_in, k_in, v_in, return_aux=AuxRequest(lse=True), **kwargs)
        lse = aux.lse[:, :, plan.front : plan.front + num_queries]
    else:  # pragma: no cover
        out, lse = kernel(q_in, k_in, v_in, return_lse=True, **kwargs)
        lse = lse[:, :, plan.front : plan.front + num_queries]
    return out[:, :, plan.front : plan.front + num_queries], lse


def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    scorer,
    options: dict,
    slots=None,
    compiled: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """query [B, H, Q, D] at logical positions N-Q..N-1, key/value [B, Hkv, N, D] at 0..N-1.

    Returns (output [B, Q, H, D] in the query dtype, attended (query head, key) pairs as a 0-d tensor).
    """
    batch, heads, num_queries, dim = query.shape
    kv_heads, total = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    query_block, block_size = options["query_block_size"], options["block_size"]
    sink, local = options["sink_tokens"], options["local_tokens"]
    plan = plan_block_sparse(query, key, scorer, options, slots)
    selected, first_query = plan.selected, plan.first_query
    has_slots = slots is not None and len(slots) > 0
    out, lse = run_flex(query, key, value, plan, scaling, has_slots, compiled)
    attended = attended_pairs(selected, first_query, total, query_block, block_size, sink, local) * groups

    if has_slots:
        lse = lse.float().view(batch, kv_heads, groups, num_queries)
        out = out.float().view(batch, kv_heads, groups, num_queries, dim)
        query_groups = query.view(batch, kv_heads, groups, num_queries, dim)
        positions = torch.arange(first_query, total, device=query.device)
        index = torch.div(positions, query_block, rounding_mode="floor") - (first_query // query_block)
        merged = torch.empty_like(out)
        chunk = max(1, options["query_chunk_size"])
        for start in range(0, num_queries, chunk):
            stop = min(start + chunk, num_queries)
            q = query_groups[:, :, :, start:stop].float()
            slot_out, slot_lse, slot_pairs = slot_attention(
                q, positions[start:stop], slots, selected[:, :, index[start:stop]], scaling, block_size, sink, local, None
            )
            merged[:, :, :, start:stop] = merge_attention_states(
                [(out[:, :, :, start:stop], lse[:, :, :, start:stop]), (slot_out, slot_lse)]
            )[0]
            attended = attended + slot_pairs * groups
        out = merged.view(batch, heads, num_queries, dim)
    return out.transpose(1, 2).to(query.dtype), attended
