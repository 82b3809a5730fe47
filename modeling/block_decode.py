"""Block-sparse decode: one new query per sequence attends anchors + its selected blocks + slots.

Per step the scorer reads the cached block summaries (`BlockSummaryCache`, O(blocks) work, updated as
tokens arrive), picks the blocks as the reference path does, and only those blocks' keys are read.
On CUDA (Triton) a step is a handful of kernels: the "minmax" scores straight from the summary
buffers, a top-k, one split-K kernel over the selected blocks and the anchors (sinks + recent window)
that reads the keys in place, and one log-sum-exp merge of the splits. Elsewhere the selected keys are
gathered. The slot tier is computed apart and merged by log-sum-exp. Same function as the reference
path, whatever `query_block_size` (a decode query forms its own query block)."""

import functools
import math
from dataclasses import dataclass

import torch

from .merge import masked_attention, merge_attention_states
from .scorer import BlockSummaries, PooledKeyScorer, summarize_contiguous_blocks
from .selection import coverage_counts, scores_and_mass
from .slot_attention import slot_attention

try:  # Triton ships with CUDA builds of torch; the gather path needs nothing
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


def _triton_extents(block_size: int, dim: int) -> bool:
    """Shapes the Triton kernels take: power-of-two extents (tl.arange), head dims of at least 16 (tl.dot tiles)
    and blocks of at least 8 keys (the decode kernel reads narrow blocks several at a time: `DecodeLaunch`)."""
    return block_size >= 8 and dim >= 16 and not (block_size & (block_size - 1)) and not (dim & (dim - 1))


class BlockSummaryCache:
    """Block summaries of a cache layer whose keys sit at positions 0..N-1, kept across decode steps.

    Complete blocks are summarised once, into buffers that grow by doubling; the newest, incomplete
    block is re-summarised on every call (at most `block_size` keys). The owner drops the cache when its
    keys change other than by appending (eviction, crop, beam reordering). With `sub_block` set, the
    extrema of every block's sub-blocks (for the "subminmax" scorer) are kept the same way.
    """

    def __init__(self, block_size: int, sub_block: int | None = None):
        if sub_block is not None and (sub_block < 1 or block_size % sub_block):
            raise ValueError(f"`scorer_sub_block` ({sub_block}) must divide `block_size` ({block_size})")
        self.block_size = block_size
        self.sub_block = sub_block
        self.complete = 0  # complete blocks summarised
        self.buffers = None  # (min, max, sum) [B, Hkv, capacity, D] fp32
        self.sub_buffers = None  # (min, max) [B, Hkv, capacity, block_size // sub_block, D] fp32, with sub_block

    def _grow(self, keys: torch.Tensor, needed: int, device: torch.device) -> None:
        batch, kv_heads, _, dim = keys.shape
        capacity = max(needed, 64, 2 * (0 if self.buffers is None else self.buffers[0].shape[2]))
        fresh = tuple(torch.empty(batch, kv_heads, capacity, dim, dtype=torch.float32, device=device) for _ in range(3))
        fresh_sub = None
        if self.sub_block is not None:
            per_block = self.block_size // self.sub_block
            fresh_sub = tuple(torch.empty(batch, kv_heads, capacity, per_block, dim, dtype=torch.float32, device=device) for _ in range(2))
        if self.buffers is not None and self.complete:
            for new, old in zip(fresh + (fresh_sub or ()), self.buffers + (self.sub_buffers or ())):
                new[:, :, : self.complete] = old[:, :, : self.complete]
        self.buffers, self.sub_buffers = fresh, fresh_sub

    def _refresh_sub_blocks(self, keys: torch.Tensor, whole: int) -> None:
        """Sub-block extrema of the newly complete blocks and of the incomplete newest one (in PyTorch:
        the "subminmax" scorer reads them through `update`, not through the Triton kernels)."""
        batch, kv_heads, total, dim = keys.shape
        size, sub = self.block_size, self.sub_block
        sub_min, sub_max = self.sub_buffers
        start = self.complete * size
        if whole > self.complete:
            new = keys[:, :, start : whole * size].view(batch, kv_heads, whole - self.complete, size // sub, sub, dim)
            sub_min[:, :, self.complete : whole] = new.amin(-2)
            sub_max[:, :, self.complete : whole] = new.amax(-2)
        if total > whole * size:
            tail = summarize_contiguous_blocks(keys[:, :, whole * size :].to(sub_min.device), sub, size // sub)
            sub_min[:, :, whole], sub_max[:, :, whole] = tail.key_min, tail.key_max

    def refresh(self, keys: torch.Tensor, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bring the summaries up to `keys` [B, Hkv, N, D]; returns the (min, max, sum) buffers
        [B, Hkv, capacity, D] on `device` (default: the keys'; the compute device when the keys are
        in host memory), of which the first ceil(N / block_size) blocks are valid."""
        batch, kv_heads, total, dim = keys.shape
        device = keys.device if device is None else device
        size = self.block_size
        if self.buffers is not None and (
            self.buffers[0].device != device or self.buffers[0].shape[:2] != (batch, kv_heads) or total < self.complete * size
        ):
            self.complete, self.buffers = 0, None
        num_blocks = math.ceil(total / size)
        if self.buffers is None or self.buffers[0].shape[2] < num_blocks:
            self._grow(keys, num_blocks, device)
        key_min, key_max, key_sum = self.buffers
        whole = total // size
        if self.sub_block is not None:
            self._refresh_sub_blocks(keys, whole)
        if whole > self.complete:
            new = keys[:, :, self.complete * size : whole * size].view(batch, kv_heads, whole - self.complete, size, dim)
            key_min[:, :, self.complete : whole] = new.amin(-2)
            key_max[:, :, self.complete : whole] = new.amax(-2)
            key_sum[:, :, self.complete : whole] = new.sum(-2, dtype=torch.float32)
            self.complete = whole
        if total > whole * size:  # the incomplete newest block, written where it will complete
            readable = keys.is_cuda or (key_min.is_cuda and keys.is_pinned())  # pinned host memory: read in place
            if triton is not None and readable and _triton_extents(size, dim):
                # one launch instead of six: this runs at every decode step of every layer
                _tail_summary(keys, key_min, key_max, key_sum, size, start=whole * size, total=total, block=whole)
            else:
                tail = keys[:, :, whole * size :]
                key_min[:, :, whole] = tail.amin(-2)
                key_max[:, :, whole] = tail.amax(-2)
                key_sum[:, :, whole] = tail.sum(-2, dtype=torch.float32)
        return self.buffers

    def update(self, keys: torch.Tensor, device: torch.device | None = None) -> BlockSummaries:
        key_min, key_max, key_sum = self.refresh(keys, device)
        total, size = keys.shape[2], self.block_size
        num_blocks = math.ceil(total / size)
        count = torch.full((num_blocks,), size, dtype=torch.long, device=key_min.device)
        count[-1] = total - (num_blocks - 1) * size
        key_mean = key_sum[:, :, :num_blocks] / count.view(1, 1, -1, 1).to(torch.float32)
        summaries = BlockSummaries(key_min[:, :, :num_blocks], key_max[:, :, :num_blocks], key_mean, count)
        if self.sub_block is None:
            return summaries
        sub = self.sub_block
        sub_first = torch.arange(num_blocks * (size // sub), device=key_min.device).view(num_blocks, -1) * sub
        sub_count = (total - sub_first).clamp(min=0, max=sub)
        sub_min, sub_max = (t[:, :, :num_blocks] for t in self.sub_buffers)
        return BlockSummaries(summaries.key_min, summaries.key_max, key_mean, count, sub, sub_min, sub_max, sub_count)


def refresh_newest_block_triton(keys, key_min, key_max, key_sum, length, block_size: int) -> bool:
    """Summary (min, max, sum) of the block holding key `length` - 1 into the summary buffers, `length` ([1])
    read on the device, in one launch; False where the kernel does not apply (not CUDA, other extents)."""
    if triton is None or not keys.is_cuda or not _triton_extents(block_size, keys.shape[-1]):
        return False
    _tail_summary(keys, key_min, key_max, key_sum, block_size, length=length)
    return True


def _tail_summary(keys, key_min, key_max, key_sum, block_size: int, start=0, total=0, block=0, length=None) -> None:
    """One launch of `_tail_summary_kernel`: the summary of keys start..total-1 into block `block` of the
    buffers, or, with `length` ([1] on the device), of the block holding key length - 1."""
    batch, kv_heads, _, dim = keys.shape
    _tail_summary_kernel[(batch * kv_heads,)](
        keys, key_min, key_max, key_sum, keys if length is None else length,
        keys.stride(0), keys.stride(1), keys.stride(2),
        key_min.stride(0), key_min.stride(1), key_min.stride(2),
        start, total, block,
        KV_HEADS=kv_heads, D=dim, BS=block_size, LENGTH_ON_DEVICE=length is not None,
    )


def unsupported_decode_reason(query, attention_mask, sliding_window, contiguous: bool) -> str | None:
    if not query.is_cuda:
        return "the inputs are not on a CUDA device"
    if query.shape[-2] != 1:
        return "more than one query"
    if attention_mask is not None:
        return "a padding or 4D attention mask"
    if sliding_window is not None:
        return "a sliding window"
    if not contiguous:
        return "evicted tokens (the block store is not contiguous)"
    return None


def selection_budget(num_candidates: int, top_k: int | None, fraction: float | None) -> int:
    """Blocks `select_blocks` keeps for a query with `num_candidates` candidates (same arithmetic)."""
    if top_k is None:
        return num_candidates
    if fraction is None:
        return min(top_k, num_candidates)
    budget = torch.ceil(torch.tensor([num_candidates]) * fraction).clamp(min=top_k)
    return min(int(budget), num_candidates)


if triton is not None:

    @triton.jit
    def _tail_summary_kernel(
        K, KMIN, KMAX, KSUM, LENGTH,
        stride_kb, stride_kh, stride_kn,
        stride_sb, stride_sh, stride_sn,
        start, total, block,
        KV_HEADS: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, LENGTH_ON_DEVICE: tl.constexpr,
    ):
        # min, max and sum of keys start..total-1 (fewer than BS) of one (sequence, KV head); with
        # LENGTH_ON_DEVICE, those of the block holding the newest of LENGTH keys
        if LENGTH_ON_DEVICE:
            total = tl.load(LENGTH)
            block = (total - 1) // BS
            start = block * BS
        pid = tl.program_id(0)
        b = (pid // KV_HEADS).to(tl.int64)
        h = (pid % KV_HEADS).to(tl.int64)
        tokens = start + tl.arange(0, BS)
        dims = tl.arange(0, D)
        valid = tokens < total
        k = tl.load(K + b * stride_kb + h * stride_kh + tokens[:, None] * stride_kn + dims[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        at = b * stride_sb + h * stride_sh + block * stride_sn + dims
        tl.store(KMIN + at, tl.min(tl.where(valid[:, None], k, float("inf")), 0))
        tl.store(KMAX + at, tl.max(tl.where(valid[:, None], k, float("-inf")), 0))
        tl.store(KSUM + at, tl.sum(k, 0))

    @triton.jit
    def _select_blocks_kernel(
        SCORES, INDEX, num_blocks, width, top_k, fraction,
        BI: tl.constexpr, BJ: tl.constexpr, W: tl.constexpr, HAS_FRACTION: tl.constexpr,
    ):
        # program (row, chunk): the ranks of BI blocks of one (sequence, KV head) row among all its scores
        # (higher first, ties to the lower block), counted against every score; a block ranked below k goes to
        # slot `rank`. k = the selection budget for the row's candidates (its finite scores), at most `width`.
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        base = SCORES + row * num_blocks
        mine = chunk * BI + tl.arange(0, BI)
        own = tl.load(base + mine, mask=mine < num_blocks, other=float("-inf"))
        rank = tl.zeros([BI], tl.int32)
        finite = tl.zeros([BJ], tl.int32)
        for start in range(0, num_blocks, BJ):
            other = start + tl.arange(0, BJ)
            theirs = tl.load(base + other, mask=other < num_blocks, other=float("-inf"))
            ahead = (theirs[None, :] > own[:, None]) | ((theirs[None, :] == own[:, None]) & (other[None, :] < mine[:, None]))
            rank += tl.sum(ahead.to(tl.int32), 1)
            finite += (theirs > float("-inf")).to(tl.int32)
        count = tl.sum(finite, 0)
        if HAS_FRACTION:
            budget = tl.maximum(tl.ceil(count.to(tl.float32) * fraction), top_k * 1.0).to(tl.int32)
        else:
            budget = top_k + count * 0
        k = tl.minimum(tl.minimum(budget, width), count)
        tl.store(INDEX + row * width + rank, mine.to(tl.int64), mask=(rank < k) & (mine < num_blocks))
        if chunk == 0:  # the slots past k: a block past the buffers, which attends nothing
            slots = tl.arange(0, W)
            tl.store(INDEX + row * width + slots, (slots * 0 + num_blocks).to(tl.int64), mask=(slots >= k) & (slots < width))

    @triton.jit
    def _minmax_scores_kernel(
        Q, KMIN, KMAX, S,
        stride_qb, stride_qh, stride_qg,
        stride_sb, stride_sh, stride_sn,
        stride_ob, stride_oh,
        num_blocks, first, last, LENGTH, local, block_size,
        KV_HEADS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, NB: tl.constexpr, LENGTH_ON_DEVICE: tl.constexpr,
    ):
        # scores of NB blocks for one (sequence, KV head): max over the group's query heads of the
        # bound sum_d max(q_d max_d, q_d min_d); non-candidates get -inf. Elementwise, not tl.dot:
        # a group has a few query heads, and the pass is bound by reading the summaries once. With
        # LENGTH_ON_DEVICE the last candidate is the block of key LENGTH - 1 - local (none if negative).
        if LENGTH_ON_DEVICE:
            high = tl.load(LENGTH) - 1 - local
            last = tl.where(high >= 0, high // block_size, -1)
        pid = tl.program_id(0)
        tile = tl.program_id(1)
        b = (pid // KV_HEADS).to(tl.int64)
        h = (pid % KV_HEADS).to(tl.int64)
        dims = tl.arange(0, D)
        blocks = tile * NB + tl.arange(0, NB)
        inside = blocks < num_blocks
        base = b * stride_sb + h * stride_sh + blocks[:, None] * stride_sn + dims[None, :]
        kmax = tl.load(KMAX + base, mask=inside[:, None], other=0.0)
        kmin = tl.load(KMIN + base, mask=inside[:, None], other=0.0)
        score = tl.full([NB], float("-inf"), tl.float32)
        for g in tl.static_range(G):
            q = tl.load(Q + b * stride_qb + h * stride_qh + g * stride_qg + dims).to(tl.float32)
            bound = tl.sum(tl.maximum(q[None, :] * kmax, q[None, :] * kmin), 1)
            score = tl.maximum(score, bound)
        candidate = (blocks >= first) & (blocks <= last)
        score = tl.where(candidate, score, float("-inf"))
        tl.store(S + b * stride_ob + h * stride_oh + blocks, score, mask=inside)

    @triton.jit
    def _decode_tiles_kernel(
        Q, K, V, IDX, ACC, M, L, CNT, LENGTH,
        stride_qb, stride_qh, stride_qg,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_ib, stride_ih,
        num_selected, num_tiles, per_split, total, sink, local, sink_tiles, scale,
        KV_HEADS: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
        TB: tl.constexpr, LENGTH_ON_DEVICE: tl.constexpr,
    ):
        # one program: one (sequence, KV head) and a range of its tiles of BS keys, G query heads as
        # rows, TB tiles per step. Tiles [0, num_selected) are the selected blocks (keys in [sink, total - 1 - local]); then
        # the sink tiles (keys < sink), then the recent-window tiles (keys after the sinks and the
        # selectable range, up to the query). With LENGTH_ON_DEVICE the number of keys is read from
        # LENGTH, not passed: the launch is then the same at every length (CUDA graph replay), and
        # tiles past what the length needs are masked.
        if LENGTH_ON_DEVICE:
            total = tl.load(LENGTH)
        high = total - 1 - local
        sink_end = tl.minimum(sink, total)
        window_start = tl.maximum(high + 1, sink_end)
        low = sink
        pid = tl.program_id(0)
        split = tl.program_id(1)
        num_splits = tl.num_programs(1)
        b = (pid // KV_HEADS).to(tl.int64)
        h = (pid % KV_HEADS).to(tl.int64)
        rows = tl.arange(0, GP)
        dims = tl.arange(0, D)
        lanes = tl.arange(0, TB * BS)  # TB tiles read at once: their loads are in flight together
        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qg + dims[None, :], mask=rows[:, None] < G, other=0.0)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        count = tl.zeros([TB * BS], tl.int32)
        start = split * per_split
        stop = tl.minimum(start + per_split, num_tiles)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        for first_tile in range(start, stop, TB):
            t = first_tile + lanes // BS  # each lane's tile
            is_selected = t < num_selected
            is_sink = (t >= num_selected) & (t < num_selected + sink_tiles)
            block = tl.load(IDX + b * stride_ib + h * stride_ih + t, mask=is_selected & (t < stop), other=0).to(tl.int64)
            anchor_first = tl.where(is_sink, (t - num_selected) * BS, window_start + (t - num_selected - sink_tiles) * BS)
            tile_first = tl.where(is_selected, block * BS, anchor_first)
            lo = tl.where(is_selected, low, tl.where(is_sink, 0, window_start))
            hi = tl.where(is_selected, high, tl.where(is_sink, sink_end - 1, total - 1))
            tokens = tile_first + lanes % BS
            valid = (t < stop) & (tokens >= lo) & (tokens <= hi) & (tokens < total)
            k = tl.load(k_base + tokens[:, None] * stride_kn + dims[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(v_base + tokens[:, None] * stride_vn + dims[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
            count += valid.to(tl.int32)
        out = (pid * num_splits + split) * G
        row_ok = rows < G
        tl.store(ACC + (out + rows[:, None]) * D + dims[None, :], acc, mask=row_ok[:, None])
        tl.store(M + out + rows, m_i, mask=row_ok)
        tl.store(L + out + rows, l_i, mask=row_ok)
        tl.store(CNT + pid * num_splits + split, tl.sum(count, 0))

    @triton.jit
    def _merge_splits_kernel(
        ACC, M, L, OUT, LSE, num_splits,
        G: tl.constexpr, D: tl.constexpr, SP: tl.constexpr,
    ):
        # log-sum-exp merge of one query row's splits (one (sequence, KV head) program of the tiles
        # kernel, one of its G rows) into its normalised output and LSE, every split at once
        pid = tl.program_id(0)
        row = tl.program_id(1)
        splits = tl.arange(0, SP)
        dims = tl.arange(0, D)
        ok = splits < num_splits
        at = (pid * num_splits + splits) * G + row
        m = tl.load(M + at, mask=ok, other=float("-inf"))
        l = tl.load(L + at, mask=ok, other=0.0)
        acc = tl.load(ACC + at[:, None] * D + dims[None, :], mask=ok[:, None], other=0.0)
        m_max = tl.max(m, 0)
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
        weight = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_safe))
        total = tl.sum(l * weight, 0)
        has = total > 0
        out = tl.sum(acc * weight[:, None], 0) / tl.where(has, total, 1.0)
        lse = tl.where(has, m_safe + tl.log(tl.where(has, total, 1.0)), float("-inf"))
        tl.store(OUT + (pid * G + row) * D + dims, out)
        tl.store(LSE + pid * G + row, lse)


MAX_SPLITS = 64  # the merge reduces a row's splits in one tile


@dataclass(frozen=True)
class DecodeLaunch:
    """How the decode kernel spreads a step's tiles (blocks of keys) over programs.

    keys_per_step: keys one loop step of a program reads; a step takes max(1, keys_per_step // block_size)
        tiles at once, so narrow blocks (SmolLM2's 8 tokens) fill a tensor-core tile and keep their loads in
        flight together, where one 8-key tile per step waits on each load in turn. A power of two >= 16.
    steps_per_program: the most loop steps one program runs. Fewer where the work is small: a program per
        streaming multiprocessor is the aim, since idle SMs cost more than short loops (on an H200, SmolLM2's
        4K-token step: 4.4 us with 1 step per program, 11 us with 8), while large work gains from long loops,
        which overlap the next step's loads with the current one's math (8B shape, 128K: 22 us at 8, 29 at 3).
    """

    keys_per_step: int = 128
    steps_per_program: int = 8

    def __post_init__(self):
        if self.keys_per_step < 16 or self.keys_per_step & (self.keys_per_step - 1):
            raise ValueError(f"DecodeLaunch.keys_per_step must be a power of two >= 16, got {self.keys_per_step}")
        if self.steps_per_program < 1:
            raise ValueError(f"DecodeLaunch.steps_per_program must be >= 1, got {self.steps_per_program}")

    def tiles_per_step(self, block_size: int) -> int:
        return max(1, self.keys_per_step // block_size)

    def width(self, num_tiles: int, pairs: int, block_size: int, processors: int) -> int:
        """Tiles per program (a whole number of steps) for `num_tiles` tiles in each of `pairs` (sequence,
        KV head) pairs on a device of `processors` SMs: about one program per SM, at most `steps_per_program`
        steps each, and at most MAX_SPLITS programs per pair (the merge's limit)."""
        per_step = self.tiles_per_step(block_size)
        steps = math.ceil(num_tiles / per_step)
        fill = math.ceil(steps * pairs / processors)
        width = max(min(self.steps_per_program, fill), math.ceil(steps / MAX_SPLITS), 1)
        return width * per_step


@functools.lru_cache(maxsize=None)
def _processors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; elsewhere (Triton's interpreter) an H100's 132."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


DECODE_LAUNCH = DecodeLaunch()


def selected_tiles_attention(query, key, value, index, sink, local, scaling, block_size, out_dtype, length=None,
                             launch: DecodeLaunch = DECODE_LAUNCH):
    """The decode kernel (Triton: CUDA tensors, or any under Triton's interpreter). Attention of query
    [B, Hkv, G, D] at position N-1 over the selected blocks index [B, Hkv, S] (keys in [sink, N-1-local]) and
    the anchors (keys < sink, keys > N-1-local), in one kernel and one merge:
    (output [B, Hkv, G, D] in `out_dtype`, lse [B, Hkv, G] fp32, attended keys per query head).

    N = key.shape[-2], or the value of `length` ([1] on the device) when given: then the keys are buffers
    longer than N, every launch argument is independent of N, and the tiles are sized for any N. `launch`:
    how the tiles are spread over programs (`DecodeLaunch`)."""
    batch, kv_heads, groups, dim = query.shape
    total = key.shape[-2]
    num_selected = index.shape[-1]
    if length is None:
        sink_end = min(sink, total)
        window_start = max(total - local, sink_end)
        sink_tiles = math.ceil(sink_end / block_size)
        window_tiles = math.ceil((total - window_start) / block_size)
    else:
        sink_tiles, window_tiles = math.ceil(sink / block_size), math.ceil(local / block_size)
    num_tiles = num_selected + sink_tiles + window_tiles
    programs = batch * kv_heads
    per_split = launch.width(num_tiles, programs, block_size, _processors(query.device))
    splits = max(1, math.ceil(num_tiles / per_split))
    device = query.device
    acc = torch.empty(programs * splits * groups, dim, dtype=torch.float32, device=device)
    m = torch.empty(programs * splits * groups, dtype=torch.float32, device=device)
    l = torch.empty_like(m)
    count = torch.empty(programs * splits, dtype=torch.int32, device=device)
    if num_selected == 0:
        index = torch.zeros(batch, kv_heads, 1, dtype=torch.int64, device=device)
    gp = max(16, triton.next_power_of_2(groups))
    tiles_per_step = launch.tiles_per_step(block_size)
    _decode_tiles_kernel[(programs, splits)](
        query, key, value, index, acc, m, l, count, index if length is None else length,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        index.stride(0), index.stride(1),
        num_selected, num_tiles, per_split, total, sink, local, sink_tiles, scaling,
        KV_HEADS=kv_heads, G=groups, GP=gp, D=dim, BS=block_size, TB=tiles_per_step,
        LENGTH_ON_DEVICE=length is not None,
    )
    out = torch.empty(batch, kv_heads, groups, dim, dtype=out_dtype, device=device)
    lse = torch.empty(batch, kv_heads, groups, dtype=torch.float32, device=device)
    _merge_splits_kernel[(programs, groups)](acc, m, l, out, lse, splits, G=groups, D=dim, SP=triton.next_power_of_2(splits))
    return out, lse, count.sum()


def _minmax_scores_triton(query, key_min, key_max, num_blocks: int, first: int, last: int, length=None,
                          local: int = 0, block_size: int = 1) -> torch.Tensor:
    """The "minmax" scorer's scores [B, Hkv, nb] of query [B, Hkv, G, D] from the summary buffers,
    -inf outside the candidate blocks [first, last]. With `length` ([1] on the device), `last` is the block of
    key length - 1 - `local` instead (blocks of `block_size` keys): the launch is the same at every length."""
    batch, kv_heads, groups, dim = query.shape
    scores = torch.empty(batch, kv_heads, num_blocks, dtype=torch.float32, device=query.device)
    per_program = 32
    _minmax_scores_kernel[(batch * kv_heads, math.ceil(num_blocks / per_program))](
        query, key_min, key_max, scores,
        query.stride(0), query.stride(1), query.stride(2),
        key_min.stride(0), key_min.stride(1), key_min.stride(2),
        scores.stride(0), scores.stride(1),
        num_blocks, first, last, key_min if length is None else length, local, block_size,
        KV_HEADS=kv_heads, G=groups, D=dim, NB=per_program, LENGTH_ON_DEVICE=length is not None,
    )
    return scores


def _select_blocks_triton(scores: torch.Tensor, width: int, top_k: int, fraction: float | None) -> torch.Tensor:
    """Block indices [B, Hkv, width] (int64) chosen from `scores` [B, Hkv, nb] (-inf: not a candidate), in one
    launch with nothing read back: the best min(budget, width) candidates, budget = top_k, or with a fraction
    max(top_k, ceil(fraction x candidates)) as `selection_budget` computes it, best first (ties to the lower
    block); the unused slots hold nb (a block past the buffers, which attends nothing). Ranks come from pairwise
    comparisons spread over many programs: a sort or a top-k runs one row per program, a few rows in all."""
    batch, kv_heads, num_blocks = scores.shape
    scores = scores.contiguous()
    index = torch.empty(batch, kv_heads, width, dtype=torch.int64, device=scores.device)
    per_program = 64
    _select_blocks_kernel[(batch * kv_heads, triton.cdiv(num_blocks, per_program))](
        scores, index, num_blocks, width, top_k, 0.0 if fraction is None else fraction,
        BI=per_program, BJ=256, W=triton.next_power_of_2(width), HAS_FRACTION=fraction is not None,
    )
    return index


def _selected_blocks_gather(query, key, value, index, low, high, scaling, block_size):
    """Same as `_selected_blocks_triton`, by gathering the selected keys (any device)."""
    batch, kv_heads, groups, dim = query.shape
    if index.shape[-1] == 0:
        return query.new_zeros(query.shape, dtype=torch.float32), query.new_full(query.shape[:-1], float("-inf"), dtype=torch.float32)
    tokens = (index.long()[..., None] * block_size + torch.arange(block_size, device=key.device)).flatten(-2)
    valid = (tokens < key.shape[-2]) & (tokens >= low) & (tokens <= high)
    gather = tokens.clamp(max=key.shape[-2] - 1)[..., None].expand(-1, -1, -1, dim)
    k, v = key.gather(2, gather).float(), value.gather(2, gather).float()
    logits = torch.einsum("bhgd,bhnd->bhgn", query.float(), k).mul_(scaling)
    out, lse = masked_attention(logits[:, :, :, None], valid[:, :, None, None], v)
    return out[:, :, :, 0], lse[:, :, :, 0]


def block_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    scorer,
    options: dict,
    summary_cache: BlockSummaryCache | None = None,
    slots=None,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """query [B, H, 1, D] at position N-1, key/value [B, Hkv, N, D] at 0..N-1.

    Returns (output [B, 1, H, D] in the query dtype, attended (query head, key) pairs as a 0-d tensor).
    On CUDA a step is a handful of kernels (summary update, scores, top-k, one attention kernel over the
    selected blocks and the anchors, one merge), because at decode the launches, not the bytes, dominate.
    """
    batch, heads, _, dim = query.shape
    kv_heads, total = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    size, sink, local = options["block_size"], options["sink_tokens"], options["local_tokens"]
    position = total - 1
    has_slots = slots is not None and len(slots) > 0
    num_blocks = math.ceil(total / size)
    if has_slots and slots.block.numel():
        num_blocks = max(num_blocks, int(slots.block.max()) + 1)
    device = query.device
    q_rows = query.view(batch, kv_heads, groups, dim)
    if use_triton is None:
        # other block sizes or head dims take the gather route
        use_triton = triton is not None and query.is_cuda and _triton_extents(size, dim)
    if key.device != device:
        # a block store in host memory (SparseMemCache(offload_blocks=True)) is read in place by the kernel
        if not (use_triton and key.is_pinned() and value.is_pinned()):
            raise ValueError(
                f"decode over keys on {key.device} for queries on {device} needs pinned host memory and the Triton "
                f"kernel (CUDA, power-of-two block size >= 8 and head dim >= 16; got block {size}, head dim {dim})"
            )

    # candidates: blocks holding a key in [sink, position - local]
    high = position - local
    first, last = sink // size, min(high // size if high >= 0 else -1, num_blocks - 1)
    num_candidates = max(0, last - first + 1)
    budget = selection_budget(num_candidates, options["top_k_blocks"], options["block_fraction"])
    coverage = options.get("block_mass") if options["top_k_blocks"] is not None else None
    if budget == 0:
        index = torch.zeros(batch, kv_heads, 0, dtype=torch.long, device=device)
    else:
        incremental = summary_cache is not None and num_blocks == math.ceil(total / size)
        if coverage is None and use_triton and incremental and isinstance(scorer, PooledKeyScorer) and scorer.kind == "minmax":
            key_min, key_max, _ = summary_cache.refresh(key, device)
            scores = _minmax_scores_triton(q_rows, key_min, key_max, num_blocks, first, last)
        else:
            sub_block = getattr(scorer, "sub_block", None)  # the "subminmax" scorer reads sub-block extrema
            if incremental and summary_cache.sub_block != sub_block:
                raise ValueError(
                    f"the layer's block summary cache keeps sub-blocks of {summary_cache.sub_block} tokens, the scorer "
                    f"needs {sub_block}: build it as BlockSummaryCache(block_size, sub_block={sub_block})"
                )
            if incremental:
                summaries = summary_cache.update(key, device)
            else:
                summaries = summarize_contiguous_blocks(key, size, num_blocks, sub_block)
                if key.device != device:
                    summaries = summaries.to(device)
            block_ids = torch.arange(num_blocks, device=device)
            candidates = (block_ids >= first) & (block_ids <= last)
            rows = query.view(batch, kv_heads, groups, 1, dim)
            if coverage is None:
                scores = scorer(rows, summaries, candidates.view(1, 1, 1, -1))[:, :, 0]
            else:
                scores, mass = scores_and_mass(scorer, rows, summaries, candidates.view(1, 1, 1, -1))
                scores, mass = scores[:, :, 0], mass[:, :, 0]
            scores = scores.masked_fill(~candidates, float("-inf"))
        if coverage is None:
            # the same blocks as `select_blocks`: the `budget` best candidates (order does not matter)
            index = scores.topk(budget, dim=-1, sorted=False).indices  # [B, Hkv, S]
        else:
            # each head its own count, as `select_blocks` gives it; the index is as wide as the largest
            # count, and shorter rows are padded with a block past the cache, which attends to nothing
            count, order = coverage_counts(scores, candidates.expand_as(scores), options["top_k_blocks"],
                                           options["block_fraction"], mass, coverage)
            width = int(count.max())
            index = order[..., :width].masked_fill(torch.arange(width, device=device) >= count, num_blocks)

    if use_triton:
        out, lse, keys_attended = selected_tiles_attention(
            q_rows, key, value, index, sink, local, scaling, size, torch.float32 if has_slots else query.dtype
        )
        attended = keys_attended * groups
        if not has_slots:
            return out.view(batch, 1, heads, dim), attended
        states = [(out, lse)]
    else:
        block_out, block_lse = _selected_blocks_gather(q_rows, key, value, index, sink, high, scaling, size)
        # anchors: the sinks and the recent window (disjoint ranges of positions), a few hundred keys
        sink_end = min(sink, total)
        window_start = max(position - local + 1, sink_end)
        anchor_keys = torch.cat([key[:, :, :sink_end], key[:, :, window_start:]], dim=2).float()
        anchor_values = torch.cat([value[:, :, :sink_end], value[:, :, window_start:]], dim=2).float()
        logits = torch.einsum("bhgd,bhnd->bhgn", q_rows.float(), anchor_keys).mul_(scaling)
        anchor_out, anchor_lse = masked_attention(
            logits[:, :, :, None], torch.ones(1, 1, 1, 1, 1, dtype=torch.bool, device=device), anchor_values
        )
        states = [(block_out, block_lse), (anchor_out[:, :, :, 0], anchor_lse[:, :, :, 0])]
        block_first = index * size
        per_block = (torch.clamp(block_first + size - 1, max=min(high, total - 1)) - torch.clamp(block_first, min=sink) + 1).clamp(min=0)
        attended = (per_block.sum() + anchor_keys.shape[2] * batch * kv_heads) * groups
    if has_slots:
        # one column more for the padding block of `block_mass` rows, dropped after the scatter
        selected = torch.zeros(batch, kv_heads, 1, num_blocks + 1, dtype=torch.bool, device=device)
        selected = selected.scatter_(-1, index[:, :, None], True)[..., :num_blocks]
        slot_out, slot_lse, slot_pairs = slot_attention(
            q_rows.float()[:, :, :, None], torch.tensor([position], device=device), slots, selected,
            scaling, size, sink, local, None,
        )
        states.append((slot_out[:, :, :, 0], slot_lse[:, :, :, 0]))
        attended = attended + slot_pairs * groups
    out = merge_attention_states(states)[0]
    return out.view(batch, 1, heads, dim).to(query.dtype), attended
