"""The three-tier attention function, registered with transformers as `attn_implementation="sparsemem"`.

For each query: exact softmax over
  anchors (sinks + recent window) ∪ top-k scored blocks of the block store ∪ slots of cold blocks/spans,
computed per tier and merged by log-sum-exp. A slot is counted only when the block it stands for is
neither selected nor touched by the query's anchors, so no token is counted twice. With
`top_k_blocks=None` and no slots this is dense causal attention.

This file holds the vectorised PyTorch reference path (CPU and GPU); it materialises the logits of one
query chunk against the physical keys and masks them, which makes it the oracle for fast kernels. With
`query_block_size` set, queries share one selection per query block; on CUDA the function then runs
the block-sparse FlexAttention path of block_sparse.py (option `attention_backend`), which computes
the same function.
"""

import logging
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, prepare_padding_mask

from .anchors import anchor_mask, causal_mask, local_mask, sliding_window_mask
from .block_decode import block_decode_attention, unsupported_decode_reason
from .block_sparse import block_sparse_attention, contiguous_positions, unsupported_reason
from .held_dense import held_dense_attention, unsupported_held_reason
from .slots import SlotTier
from .configuration_sparsemem import OPTION_NAMES, SparseMemOptions
from .merge import masked_attention, merge_attention_states
from .placement import Placement, occupied_blocks_after
from .query_blocks import aligned_chunks, pool_query_blocks, query_block_index
from .scorer import PooledKeyScorer, summarize_blocks, summarize_contiguous_blocks
from .selection import score_and_select
from .selection_gate import gated_attention, straight_through_gate
from .slot_attention import slot_attention

ATTENTION_NAME = "sparsemem"
_DEFAULTS = SparseMemOptions()
FAST_PATH_OPTIONS = (
    "block_size", "query_block_size", "sink_tokens", "local_tokens", "top_k_blocks", "block_fraction", "block_mass", "query_chunk_size"
)
_LOGGED: set[str] = set()
logger = logging.getLogger(__name__)


@dataclass
class MemoryView:
    """Everything the attention function needs beyond q/k/v, passed by the sparsemem attention module.

    query_positions [Q] and key_positions [N] are logical positions; slots is the layer's slot tier.
    """

    query_positions: torch.Tensor
    key_positions: torch.Tensor
    slots: SlotTier | None = None
    sliding_window: int | None = None
    summary_cache: object | None = None  # block_decode.BlockSummaryCache of the cache layer, if any
    # keys are exactly positions 0..N-1 and the queries the newest of them; None: check the positions
    # (which waits for the device), so callers that know it say so
    contiguous: bool | None = None
    # the queries are the newest held entries, the keys in time order (a cache the queries were just
    # appended to): dense-equivalent attention is then one lower-right causal SDPA call (held_dense.py)
    queries_newest: bool = False
    logical_length: int | None = None  # logical tokens up to the last query, when the caller knows it
    # why the fast paths may not compute this call whatever its inputs (None: decided from the inputs)
    fallback: str | None = None
    # where entries outside the local window are scored and attended (placement.py); None: where they are
    placement: Placement | None = None


class AttentionStats:
    """Counts (query head, key) pairs attended versus the pairs dense causal attention would compute."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.attended = {"prefill": 0.0, "decode": 0.0}
        self.dense = {"prefill": 0.0, "decode": 0.0}

    def add(self, phase: str, attended: torch.Tensor, dense: torch.Tensor | int) -> None:
        # kept as (device) tensors: reading a count would wait for the GPU at every layer of every step;
        # counts known on the host (ints) stay on the host
        self.attended[phase] = self.attended[phase] + torch.as_tensor(attended, dtype=torch.float64)
        self.dense[phase] = self.dense[phase] + (dense if isinstance(dense, int) else torch.as_tensor(dense, dtype=torch.float64))


def _option(config, name):
    return getattr(config, name, getattr(_DEFAULTS, name))


_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_VALID_OPTIONS: set = set()  # option values (with the head layout) already validated


def check_config(config) -> None:
    """The architecture and the options as they are now: a config's options may be changed after the model
    was built (`model.config.block_size = ...`), so they are checked when used, once per set of values."""
    family = getattr(config, "base_model_type", None) or getattr(config, "model_type", None)
    if family is not None and family not in _FAMILIES:  # None: a bare holder of options, as direct callers pass
        raise ValueError(f"attn_implementation={ATTENTION_NAME!r} supports the {list(_FAMILIES)} families; "
                         f"this model's model_type is {family!r}")
    validate = getattr(config, "validate_sparsemem_options", None)
    if validate is None:  # a plain transformers config: sparsemem's defaults, valid
        return
    names = (*OPTION_NAMES, "num_attention_heads", "num_key_value_heads")
    values = (type(config), *(getattr(config, name, None) for name in names))
    try:
        if values in _VALID_OPTIONS:
            return
    except TypeError:  # an unhashable value: not one the options allow
        values = None
    validate()
    if values is not None:
        _VALID_OPTIONS.add(values)


def _dense_pair_counts(query_positions, padding, sliding_window) -> torch.Tensor:
    """Logical keys a dense causal query would see: [B or 1, Q]."""
    if padding is None:
        counts = query_positions + 1
        if sliding_window is not None:
            counts = counts.clamp(max=sliding_window)
        return counts[None].float()
    cumulative = torch.nn.functional.pad(padding.float().cumsum(-1), (1, 0))
    upper = cumulative[:, query_positions + 1]
    if sliding_window is None:
        return upper
    return upper - cumulative[:, (query_positions + 1 - sliding_window).clamp(min=0)]


def compact_block_ids(
    block_ids: torch.Tensor, slots: SlotTier | None, block_size: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Renumber blocks 0..n-1 over the blocks that hold a key (`block_ids` [N], sorted) or a slot.

    Returns (key block ids [N], slot block ids [S] (-1 kept) or None, first logical position of each
    block [n]). The numbering keeps the blocks' order, so selection is unchanged.
    """
    present = block_ids
    slot_block = None
    if slots is not None and slots.block.numel():
        present = torch.cat([present, slots.block[slots.block >= 0]])
    present = torch.unique(present)  # sorted
    if slots is not None and slots.block.numel():
        found = torch.searchsorted(present, slots.block.clamp(min=0))
        slot_block = torch.where(slots.block >= 0, found, torch.full_like(found, -1))
    return torch.searchsorted(present, block_ids), slot_block, present * block_size


def sparsemem_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    sparsemem: MemoryView | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [B, H, Q, D], key/value [B, Hkv, N, D] -> (output [B, Q, H, D], None).

    `attention_mask` is the [B, T] padding mask over logical positions made by `sparsemem_mask` (or None),
    or a 4D mask over logical positions passed by the caller.
    """
    if dropout > 0.0:
        raise ValueError("attn_implementation='sparsemem' does not implement attention dropout; set attention_dropout=0")
    config = module.config
    check_config(config)
    block_size, top_k = _option(config, "block_size"), _option(config, "top_k_blocks")
    fraction, coverage = _option(config, "block_fraction"), _option(config, "block_mass")
    sink, local = _option(config, "sink_tokens"), _option(config, "local_tokens")
    chunk, query_block = _option(config, "query_chunk_size"), _option(config, "query_block_size")
    batch, heads, num_queries, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads

    if sparsemem is None:
        # called by a plain transformers attention module over a cache that holds every token in order
        total = key.shape[-2]
        positions = torch.arange(total, device=key.device)
        sparsemem = MemoryView(
            positions[total - num_queries :], positions, None, sliding_window, contiguous=True, queries_newest=True,
            logical_length=total,
        )
    query_positions, key_positions, slots = sparsemem.query_positions, sparsemem.key_positions, sparsemem.slots
    window = sparsemem.sliding_window

    padding, full_mask4d = None, None
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            padding = attention_mask.bool()
        elif attention_mask.dim() == 4:
            full_mask4d = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        else:
            raise ValueError(f"attention_mask must be 2D [B, T] or 4D [B, 1, Q, T], got shape {tuple(attention_mask.shape)}")

    if padding is not None:
        offsets = first_real_tokens(padding)
        if any(offsets):
            return _each_row_from_its_first_token(
                module, query, key, value, padding, offsets, scaling, sparsemem, block_size, kwargs
            )

    scorer = getattr(module, "scorer", None) or PooledKeyScorer(_option(config, "scorer"), _option(config, "scorer_sub_block"))
    stats = getattr(module, "sparsemem_stats", None)
    backend = _option(config, "attention_backend")
    # calibration: the same sparse output with a straight-through gradient to the scorer, which only the
    # reference path computes
    gate_temperature = _option(config, "selection_gate_temperature") if torch.is_grad_enabled() else None
    if gate_temperature is not None:
        if backend == "flex":
            raise ValueError("attention_backend='flex' has no selection gate (`selection_gate_temperature`, set while "
                             "calibrating with gradients); use attention_backend='auto' or 'reference'")
        backend = "reference"
    contiguous = sparsemem.contiguous
    if contiguous is None and key.shape[-2]:
        contiguous = contiguous_positions(query_positions, key_positions, key.shape[-2])
    if backend != "reference" and sparsemem.fallback is None:
        # dense-equivalent attention is one SDPA call on any device (the reference path materialises masks)
        reason = unsupported_held_reason(query, attention_mask, window, {"top_k_blocks": top_k}, sparsemem.queries_newest)
        if reason is None:
            output, attended = held_dense_attention(query, key.to(query.device), value.to(query.device), slots, scaling)
            if stats is not None:
                if sparsemem.logical_length is not None:
                    length = sparsemem.logical_length
                    dense = num_queries * (2 * length - num_queries + 1) // 2 * heads * batch
                else:
                    dense = _dense_pair_counts(query_positions, None, None).sum() * heads * batch
                stats.add("decode" if num_queries == 1 else "prefill", attended, dense)
            return output, None
    if backend != "reference":
        options = {name: _option(config, name) for name in FAST_PATH_OPTIONS}
        if sparsemem.fallback is not None:
            reason = sparsemem.fallback
        elif num_queries == 1:
            reason = unsupported_decode_reason(query, attention_mask, window, contiguous)
        else:
            reason = unsupported_reason(query, attention_mask, window, contiguous, options)
        if reason is None:
            if num_queries == 1:
                output, attended = block_decode_attention(
                    query, key, value, scaling, scorer, options, sparsemem.summary_cache, slots
                )
            else:
                output, attended = block_sparse_attention(query, key, value, scaling, scorer, options, slots)
            if stats is not None:
                # the fast paths hold keys 0..N-1 with the queries the newest of them: causal pairs in closed form
                total = key.shape[-2]
                dense = num_queries * (2 * total - num_queries + 1) // 2 * heads * batch
                stats.add("decode" if num_queries == 1 else "prefill", attended, dense)
            return output, None
        if backend == "flex":
            raise ValueError(
                f"attention_backend='flex' cannot compute this call: {reason}; use attention_backend='auto' or 'reference'"
            )
        if query.is_cuda and reason not in _LOGGED:
            _LOGGED.add(reason)
            logger.info("sparsemem attention uses the reference path on CUDA: %s", reason)

    if key.device != query.device:  # a block store in host memory (offload_blocks): the reference path reads it whole
        key, value = key.to(query.device), value.to(query.device)
    block_ids = torch.div(key_positions, block_size, rounding_mode="floor")
    slot_block = block_first = None
    if not contiguous and block_ids.numel():
        # after eviction, number only the blocks that hold a key or a slot: block tensors then scale with
        # the physical cache, not with the logical length (a stream under online compaction runs far
        # past the keys it holds)
        block_ids, slot_block, block_first = compact_block_ids(block_ids, slots, block_size)
        num_blocks = block_first.numel()
    else:
        num_blocks = int(block_ids.max()) + 1 if block_ids.numel() else 0
        if slots is not None and slots.block.numel():
            num_blocks = max(num_blocks, int(slots.block.max()) + 1)
        num_blocks = max(num_blocks, 1)
    placement = sparsemem.placement
    keys_f, values_f = key.float(), value.float()
    free_keys = None
    if placement is not None:
        # blocks are scored and attended without their positions (placement.py)
        free_keys = placement.free_keys(keys_f, key_positions)
        if block_first is None:
            block_first = torch.arange(num_blocks, device=key.device) * block_size
    summary_keys = key if free_keys is None else free_keys
    has_slots = slots is not None and len(slots) > 0
    free_slots = placement.free_slots(slots) if placement is not None and has_slots else slots
    sub_block = getattr(scorer, "sub_block", None)  # the "subminmax" scorer reads sub-block extrema
    if contiguous:
        summaries = summarize_contiguous_blocks(summary_keys, block_size, num_blocks, sub_block)  # nothing evicted
    else:
        summaries = summarize_blocks(summary_keys, block_ids, num_blocks, key_positions, block_size, sub_block)

    query_groups = query.view(batch, kv_heads, groups, num_queries, dim).float()
    first_position = int(query_positions[0]) if query_block else 0
    outputs = []
    for start, stop in aligned_chunks(first_position, num_queries, chunk, query_block):
        q = query_groups[:, :, :, start:stop]
        q_pos = query_positions[start:stop]
        n_q = q_pos.shape[0]
        # keys are stored in increasing logical order: later keys are in this chunk's future
        end = int(torch.searchsorted(key_positions, q_pos[-1], right=True))
        key_pos, key_blocks = key_positions[:end], block_ids[:end]
        k_chunk, v_chunk = keys_f[:, :, :end], values_f[:, :, :end]

        visible = causal_mask(q_pos, key_pos)[None]  # [1|B, q, N]
        window_mask = sliding_window_mask(q_pos, key_pos, window)
        if window_mask is not None:
            visible = visible & window_mask
        if padding is not None:
            visible = visible & padding[:, key_pos][:, None, :]
        if full_mask4d is not None:
            visible = visible & full_mask4d[:, 0, start:stop][..., key_pos]
        anchors = anchor_mask(q_pos, key_pos, sink, local)  # [q, N]

        # candidate blocks hold at least one visible key that is not an anchor
        cold = (visible & ~anchors).float()
        candidate_keys = cold.new_zeros(cold.shape[0], n_q, num_blocks).index_add_(2, key_blocks, cold)
        candidates = candidate_keys > 0
        q_score = q if placement is None else placement.far_queries(q, start, stop)
        if query_block is None:
            scores, selected = score_and_select(scorer, q_score, summaries, candidates[:, None], top_k, fraction, coverage)  # [B, Hkv, q, nb]
        else:
            # one selection per query block, from its mean query, over the union of its queries' candidates
            index = query_block_index(q_pos, query_block)
            pooled = pool_query_blocks(q_score, int(q_pos[0]), query_block)  # [B, Hkv, G, nQb, D]
            block_candidates = candidate_keys.new_zeros(candidates.shape[0], pooled.shape[-2], num_blocks)
            block_candidates = block_candidates.index_add_(1, index, candidate_keys) > 0
            _, shared = score_and_select(scorer, pooled, summaries, block_candidates[:, None], top_k, fraction, coverage)
            selected = shared[:, :, index]
        key_selected = selected.gather(-1, key_blocks.view(1, 1, 1, -1).expand(batch, kv_heads, n_q, -1))
        full = visible[:, None] & (anchors[None, None] | key_selected)  # [B, Hkv, q, N]

        # fold the GQA group into the query axis: [B, Hkv, G*q, D] against [B, Hkv, N, D]
        q_flat = q.reshape(batch, kv_heads, groups * n_q, dim)
        logits = (q_flat @ k_chunk.transpose(-1, -2)).mul_(scaling).view(batch, kv_heads, groups, n_q, -1)
        occupied_after = attended_blocks = None
        if placement is not None:
            # keys in the local window keep their own distances, every other key takes its placed one
            if placement.scheme == "ordered":
                occupied_after, attended_blocks = occupied_blocks_after(selected, block_first, sink)
            placed = placement.placed_logits(q, q_score, start, stop, free_keys[:, :, :end], key_blocks, occupied_after, scaling)
            logits = torch.where(local_mask(q_pos, key_pos, local)[None, None, None], logits, placed)
        if gate_temperature is not None:
            gate = straight_through_gate(scores, selected, candidates[:, None], gate_temperature)
            key_gate = gate.gather(-1, key_blocks.view(1, 1, 1, -1).expand(batch, kv_heads, n_q, -1))
            weights = torch.where(anchors[None, None], torch.ones_like(key_gate), key_gate)
            out, lse = gated_attention(logits, visible[:, None, None], weights[:, :, None], v_chunk)
        else:
            out, lse = masked_attention(logits, full[:, :, None], v_chunk, need_lse=has_slots)
        attended = full.sum() * groups

        if has_slots:
            q_slots = q
            if placement is not None:
                # slots sit before every placed block ("fixed": with them, at the placement distance)
                q_slots = q_score if attended_blocks is None else placement.far_queries(
                    q, start, stop, (attended_blocks * block_size)[:, :, None]  # [B, Hkv, 1, q]
                )
            slot_out, slot_lse, slot_pairs = slot_attention(
                q_slots, q_pos, free_slots, selected, scaling, block_size, sink, local, window, slot_block, block_first
            )
            out = merge_attention_states([(out, lse), (slot_out, slot_lse)])[0]
            attended = attended + slot_pairs * groups

        outputs.append(out)
        if stats is not None:
            dense = _dense_pair_counts(q_pos, padding, window).sum() * heads
            if padding is None:
                dense = dense * batch
            stats.add("decode" if num_queries == 1 else "prefill", attended, dense)

    output = torch.cat(outputs, dim=3).reshape(batch, heads, num_queries, dim)
    return output.transpose(1, 2).to(query.dtype), None


def first_real_tokens(padding: torch.Tensor) -> list[int]:
    """Logical position of each row's first real token in a [B, T] padding mask (0 for a row of pads)."""
    found = padding.any(-1)
    return torch.where(found, padding.int().argmax(-1), torch.zeros_like(found, dtype=torch.long)).tolist()


def _row_slots(slots: SlotTier | None, row: int, offset: int, block_size: int) -> SlotTier | None:
    """The slots of one batch row, renumbered from its first real token (`offset`)."""
    if slots is None or offset == 0:
        return None if slots is None else slots.map(lambda t: t[row : row + 1])
    blocks = slots.block >= 0
    if bool(blocks.any()) and offset % block_size:
        raise ValueError(
            f"slots standing for blocks (block_slots) need every row's left padding to be a multiple of "
            f"block_size={block_size}; a row is padded by {offset} tokens: pad the batch to a multiple of it"
        )
    keep = slots.position >= offset  # slots of whole blocks of padding stand for nothing the row sees
    index = keep.nonzero()[:, 0]
    block = torch.where(blocks, slots.block - offset // block_size, slots.block)
    return SlotTier(
        slots.keys[row : row + 1, index], slots.values[row : row + 1, index], slots.beta[row : row + 1, index],
        slots.head[index], block[index], slots.position[index] - offset,
    )


def _each_row_from_its_first_token(module, query, key, value, padding, offsets, scaling, view, block_size, kwargs):
    """Attention of a left-padded batch, one row at a time with positions counted from the row's first real
    token: its sinks are its own first tokens and its blocks start where its text starts, exactly as when
    the row runs alone. Queries of padding positions see nothing and give zeros."""
    batch, heads, num_queries, dim = query.shape
    output = query.new_zeros(batch, num_queries, heads, dim)
    for row, offset in enumerate(offsets):
        start_query = min(max(offset - int(view.query_positions[0]), 0), num_queries)
        if start_query == num_queries:
            continue
        start_key = int(torch.searchsorted(view.key_positions, offset))
        mask = padding[row : row + 1, offset:]
        row_view = MemoryView(
            view.query_positions[start_query:] - offset,
            view.key_positions[start_key:] - offset,
            _row_slots(view.slots, row, offset, block_size),
            view.sliding_window,
            None,  # the layer's block summaries describe the whole batch
            None,
            # the fast paths are tested on whole batches without padding; a padded batch stays on the reference
            fallback="a padding mask is present (left-padded rows run one at a time)",
        )
        output[row : row + 1, start_query:] = sparsemem_attention_forward(
            module,
            query[row : row + 1, :, start_query:],
            key[row : row + 1, :, start_key:],
            value[row : row + 1, :, start_key:],
            None if bool(mask.all()) else mask,
            scaling,
            sparsemem=row_view,
            **kwargs,
        )[0]
    return output, None


def sparsemem_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Mask interface for "sparsemem": only the [B, T] padding mask over logical positions 0..T-1.

    Causality, sliding windows and anchors are applied by the attention function from logical
    positions, so no [Q, T] mask is materialised at long context lengths.
    """
    if attention_mask is None:
        return None
    padding = prepare_padding_mask(attention_mask.bool(), kv_length + kv_offset, 0)
    return None if bool(padding.all()) else padding


def register_attention() -> None:
    AttentionInterface.register(ATTENTION_NAME, sparsemem_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sparsemem_mask)


register_attention()
