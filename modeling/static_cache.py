"""`StaticSparseMemCache`: a sparsemem cache of fixed shapes, whose decode step can be captured in a CUDA graph.

Every layer allocates once, at its first update:
- keys/values [B, Hkv, max_cache_len, D] in the model's dtype,
- block summaries (min, max and sum of each block's keys, fp32) [B, Hkv, ceil(max_cache_len / block_size), D],
  or, for the "subminmax" scorer, of each sub-block of `scorer_sub_block` keys (blocks pool them when scored),
- its length as a device tensor.
A one-token step writes at that length, refreshes the summary of the block the token lands in and attends a fixed
number of keys chosen on the device (`static_decode.py`): every decode step launches the same kernels on the
same shapes and reads nothing back to the host, so the step can be captured once and replayed
(`decode_graph.py`). A prefill (several tokens) runs the usual sparsemem attention over the filled part.

What it does not hold: a slot tier (no eviction, online compaction or `block_slots`) and cache positions (every
token keeps its logical RoPE position, so `max_cache_len` must fit the model's trained context unless
`positions="logical"` is asked for). `SparseMemCache` does all of these.
"""

import math

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .block_decode import refresh_newest_block_triton
from .rope import trained_context
from .scorer import BlockSummaries, _with_sub_blocks, summarize_contiguous_blocks


class StaticSparseMemLayer(CacheLayerMixin):
    """One layer of `StaticSparseMemCache`: preallocated K/V, block summaries and a device-side length.

    `seen` is the length on the host. A captured decode step advances only the device tensor (no Python runs
    during a replay); the graph runner advances `seen` after each replay (`advance`).
    """

    is_sliding = False
    # transformers compiles the forward of a compileable cache on its own; this cache's step is captured by
    # `decode_graph.py` instead
    is_compileable = False
    is_croppable = False

    def __init__(self, max_cache_len: int, block_size: int, sub_block: int | None = None, **kwargs):
        super().__init__()
        if sub_block is not None and block_size % sub_block:
            raise ValueError(f"`scorer_sub_block` ({sub_block}) must divide `block_size` ({block_size})")
        self.max_cache_len = max_cache_len
        self.block_size = block_size
        self.sub_block = sub_block
        # the summaries' granularity: blocks, or their sub-blocks for "subminmax" (blocks pool them when scored)
        self.summary_size = sub_block or block_size
        self.num_blocks = math.ceil(max_cache_len / block_size)
        self.seen = 0
        self.length: torch.Tensor | None = None  # [1] long, on the device
        self.key_min = self.key_max = self.key_sum = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, kv_heads, _, dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        shape = (batch, kv_heads, self.max_cache_len, dim)
        self.keys = torch.zeros(shape, dtype=key_states.dtype, device=self.device)
        self.values = torch.zeros(shape[:-1] + value_states.shape[-1:], dtype=value_states.dtype, device=self.device)
        blocks = (batch, kv_heads, self.num_blocks * (self.block_size // self.summary_size), dim)
        self.key_min = torch.full(blocks, float("inf"), dtype=torch.float32, device=self.device)
        self.key_max = torch.full(blocks, float("-inf"), dtype=torch.float32, device=self.device)
        self.key_sum = torch.zeros(blocks, dtype=torch.float32, device=self.device)
        self.length = torch.zeros(1, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new tokens after the held ones; returns the held part of the buffers (a view). The one-token
        step reads the whole buffers and `length` instead (`static_decode.py`)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[:2] != self.keys.shape[:2]:
            raise ValueError(
                f"StaticSparseMemCache was filled with batch x KV heads {tuple(self.keys.shape[:2])}; got "
                f"{tuple(key_states.shape[:2])}: create a cache per batch shape"
            )
        new = key_states.shape[-2]
        if self.seen + new > self.max_cache_len:
            raise ValueError(
                f"StaticSparseMemCache(max_cache_len={self.max_cache_len}) is full: it holds {self.seen} tokens and "
                f"{new} more arrived; create it with a larger max_cache_len"
            )
        if new == 1:
            # every index on the device: a decode step issues the same kernels whatever the length
            self.keys.index_copy_(2, self.length, key_states)
            self.values.index_copy_(2, self.length, value_states)
            self.length.add_(1)
            self._refresh_newest_block()
        else:
            start, stop = self.seen, self.seen + new
            self.keys[:, :, start:stop] = key_states
            self.values[:, :, start:stop] = value_states
            self.length.fill_(stop)
            self._summarize(start, stop)
        self.seen += new
        return self.keys[:, :, : self.seen], self.values[:, :, : self.seen]

    def _summarize(self, start: int, stop: int) -> None:
        """Summaries of the blocks (or sub-blocks) holding positions start..stop-1, from the held keys (host-known
        range)."""
        size = self.summary_size
        first, last = start // size, (stop - 1) // size
        fresh = summarize_contiguous_blocks(self.keys[:, :, first * size : stop], size, last - first + 1)
        self.key_min[:, :, first : last + 1] = fresh.key_min
        self.key_max[:, :, first : last + 1] = fresh.key_max
        self.key_sum[:, :, first : last + 1] = fresh.key_mean * fresh.count.view(1, 1, -1, 1)

    def _refresh_newest_block(self) -> None:
        """Summary of the block (or sub-block) holding the newest token, with its index on the device."""
        if refresh_newest_block_triton(self.keys, self.key_min, self.key_max, self.key_sum, self.length, self.summary_size):
            return
        size = self.summary_size
        newest = self.length - 1
        block = torch.div(newest, size, rounding_mode="floor")
        tokens = block * size + torch.arange(size, device=self.device)
        held = (tokens <= newest).view(1, 1, -1, 1)
        keys = self.keys.index_select(2, tokens.clamp(max=self.max_cache_len - 1)).float()
        self.key_min.index_copy_(2, block, keys.masked_fill(~held, float("inf")).amin(2, keepdim=True))
        self.key_max.index_copy_(2, block, keys.masked_fill(~held, float("-inf")).amax(2, keepdim=True))
        self.key_sum.index_copy_(2, block, keys.masked_fill(~held, 0.0).sum(2, keepdim=True))

    def summaries(self) -> BlockSummaries:
        """Summaries of every block of the buffers; blocks past the length are empty (count 0). With sub-blocks,
        pooled from them, which the "subminmax" scorer reads too."""
        starts = torch.arange(self.key_min.shape[2], device=self.device) * self.summary_size
        count = (self.length - starts).clamp(min=0, max=self.summary_size)
        key_mean = self.key_sum / count.clamp(min=1).view(1, 1, -1, 1).to(torch.float32)
        summaries = BlockSummaries(self.key_min, self.key_max, key_mean, count)
        if self.sub_block is None:
            return summaries
        return _with_sub_blocks(summaries, self.sub_block, self.block_size // self.sub_block)

    def advance(self, steps: int) -> None:
        """Note `steps` one-token steps that ran on the device only (replays of a captured step)."""
        self.seen += steps

    def rewind(self, length: int) -> None:
        """Back to `length` held tokens (after warm-up or capture steps of a graph runner); the entries past it
        are rewritten by the next steps."""
        self.seen = length
        self.length.fill_(length)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        if self.is_initialized:
            self.rewind(0)
            self.key_min.fill_(float("inf"))
            self.key_max.fill_(float("-inf"))
            self.key_sum.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("StaticSparseMemCache cannot be cropped (assisted decoding): use SparseMemCache")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("StaticSparseMemCache does not reorder beams: use SparseMemCache for beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise ValueError("StaticSparseMemCache has a fixed batch: create it for the expanded batch")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise ValueError("StaticSparseMemCache has a fixed batch: create it for the selected rows")


class StaticSparseMemCache(Cache):
    """A sparsemem cache of fixed shapes for decoding with a captured step (see the module docstring).

    Args:
        config: the sparsemem config of the model (block size, selection, anchors, positions).
        max_cache_len: most tokens (prompt + generated) a sequence may hold; every buffer is this long.
        cuda_graph: on a CUDA device, run one-token steps of the model's forward as replays of a captured
            CUDA graph (captured at the first decode step). False: eager steps over the same fixed shapes.
        compile: where the step is captured (a CUDA device), compile it with `torch.compile` first, which fuses the
            small ops between the attention calls (norms, rotary embedding, activations, residual adds) into fewer
            kernels; the first decode step then takes as long as compiling (seconds to a minute). Needs
            `cuda_graph=True`; elsewhere steps run eagerly, as with `cuda_graph`.
    """

    is_static_sparsemem = True

    def __init__(self, config, max_cache_len: int, cuda_graph: bool = True, compile: bool = False, **kwargs):
        if not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"StaticSparseMemCache: max_cache_len must be a positive int, got {max_cache_len!r}")
        if compile and not cuda_graph:
            raise ValueError("StaticSparseMemCache: compile=True compiles the captured decode step; it needs cuda_graph=True")
        block_size = getattr(config, "block_size", None)
        if block_size is None:
            raise ValueError("StaticSparseMemCache needs the config of a sparsemem model (it has no `block_size`)")
        for name in ("block_slots", "block_mass"):
            if getattr(config, name, None) is not None:
                raise ValueError(f"StaticSparseMemCache does not implement `{name}` (set in the config): use SparseMemCache")
        positions = getattr(config, "positions", "auto")
        window = trained_context(config)
        if positions != "logical" and window is not None and max_cache_len > window:
            raise ValueError(
                f"StaticSparseMemCache keeps logical positions, and max_cache_len={max_cache_len} exceeds the model's "
                f"trained context ({window}) under positions={positions!r}: use SparseMemCache for cache positions, "
                "or set positions='logical' in the config"
            )
        sub_block = getattr(config, "scorer_sub_block", None)
        layers = [StaticSparseMemLayer(max_cache_len, block_size, sub_block) for _ in range(config.num_hidden_layers)]
        super().__init__(layers=layers)
        self.cuda_graph = cuda_graph
        self.compile = compile
        self.graph = None  # the captured decode step (`decode_graph.DecodeGraph`), made at the first decode step

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # transformers < 5.2x passes the cache positions
            query_length = query_length.shape[0]
        return self.layers[layer_idx].get_mask_sizes(query_length)

    def get_max_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].max_cache_len

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.get_max_length(layer_idx)

    def device_length(self) -> torch.Tensor:
        """Tokens held, as a [1] tensor on the device (what a captured step reads its position from)."""
        return self.layers[0].length

    def advance(self, steps: int) -> None:
        for layer in self.layers:
            layer.advance(steps)

    def rewind(self, length: int) -> None:
        for layer in self.layers:
            layer.rewind(length)

    def reset(self) -> None:
        super().reset()  # the buffers stay where they are, so a captured step stays valid
