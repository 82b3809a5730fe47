"""Compaction of a memory bank's chunks: Attention Matching per chunk and KV head, with the slot budgets of a
whole piece ranked together over its layers, KV heads and chunks, as `sparsemem.compact` ranks a whole cache.

Reference queries. A compacted bank reads each piece as `<piece><REPEAT_PROMPT><piece>` in one forward pass:
the piece's K/V are those of the first copy (causal attention: exactly the piece read alone), and the queries
of the second copy stand for the questions that will read the piece, since each looks back for the token it
is about to repeat. A chunk is fitted to the repetition's queries around its own copy (the queries that copy
it, `WINDOW_MARGIN` more on either side) and `SPREAD` queries spread evenly over the whole repetition. Each
query's attention is measured against the whole piece (its log-sum-exp over every key of the piece), so a
query that barely reads the chunk barely counts; its share of attention left for the piece (against the
prompt and the last `REPEAT_REACH` tokens of the repetition, which it reads too) weighs the ranking. The
repetition reads a chunk from a piece's length away; a question reads the chunk laid out right before it
from up close, where heads that read their nearest tokens broadly give it much of their attention. So a
chunk is also fitted to the `FOLLOWING` queries of the first reading right after it (into the prompt after
the piece), each measured against what it reads: the keys up to its own position.

Budgets. A piece holds `chunk_tokens / ratio` slots per whole chunk, layer and KV head on average. Every
(layer, KV head) competes for them by the largest share of attention a reference query gives each of its
entries (`allocate_by_scores`, as `compact()` with `GlobalBudgets`), and a head that wins `whole_span_share`
of its entries keeps every chunk of the piece exact (a retrieval head, which copies facts such as a number
from single entries; Attention Matching's slots blur them). Within a head, the same ranking splits its slots
over the piece's chunks, so a chunk the head reads sharply keeps more; but every head keeps at least one
slot in every chunk (its best-ranked entry there). A head that reads broadly wins no entry in the ranking,
and the chunk then had no slot at all in it: on SmolLM2-135M, the chunk laid out right before a question kept
none in layers 0, 1 and 11, which give it 26%, 38% and 25% of the question's attention to the memory at
full resolution, and got 0.4% of it over all layers where the exact chunk gets 6.8%.

Measured on SmolLM2-135M at 8x (Python sources with 6 secret-number needles, the needle's chunks forced
into the 8 read): fitting each chunk to its own tokens' queries with the same slots for every head read 1
of 6 needles back at 12K tokens and 2 of 6 at 32K; the repetition's queries and ranked budgets read 6 of 6
at 12K and 4 of 6 at 32K (the full-resolution bank: 6 of 6 at both), and so does this (see
reports/memory-bank-cpu/compacted/): one miss is routing (with the chunks the compacted bank selects, exact
K/V miss it too), the other comes from the other chunks read with the needle, not from the needle's chunks.
"""

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from .head_budgets import WHOLE_SPAN_SHARE, allocate_by_scores
from .query_sources import REPEAT_PROMPT, REPEAT_REACH, causal_lse
from .modeling.attention_matching import SpanProblem
from .modeling.attention_matching_press import AttentionMatchingPress
from .modeling.compaction import HeadSpan

# repetition queries on either side of a chunk's own copy that take part in its fit
WINDOW_MARGIN = 32
# repetition queries spread evenly over the whole piece that take part in every chunk's fit
SPREAD = 64
# queries of the first reading right after a chunk that take part in its fit
FOLLOWING = 32
# (chunk, layer, KV head) problems per batched measurement or solve (bounds the [P, queries, chunk] weights)
PROBLEMS_PER_SOLVE = 8192
# queries per block of a log-sum-exp measurement (`causal_lse`): on a CPU, 128-query blocks of logits took half
# the time of 1024-query ones (SmolLM2-135M's heads, 4K keys, one thread); a GPU takes bigger ones, in fewer launches
CPU_BLOCK, GPU_BLOCK = 128, 1024


def measure_block(device: torch.device) -> int:
    """Queries per block of a log-sum-exp measurement on `device`."""
    return CPU_BLOCK if device.type == "cpu" else GPU_BLOCK

__all__ = ["REPEAT_PROMPT", "WHOLE_SPAN_SHARE", "ChunkSlots", "RepeatedPieces", "compact_pieces"]


def chunk_press() -> AttentionMatchingPress:
    """The press a bank fits its chunks with: Attention Matching as `compact` runs it with global budgets and
    whole spans (every slot fitted over the whole chunk, query weights by attention share)."""
    return AttentionMatchingPress().for_head_budgets("global").with_whole_spans()


def repeat_rows(pieces: list[torch.Tensor], prompt: torch.Tensor) -> torch.Tensor:
    """[B, T] token ids `piece + prompt + piece` per row, right-padded with 0 (padding comes after every
    real token: causal attention never lets a real token see it)."""
    return pad_sequence([torch.cat([piece, prompt, piece]) for piece in pieces], batch_first=True)


@dataclass
class RepeatedPieces:
    """The repetition queries of a forward batch and their attention, per layer.

    queries: [L, B, H, N, D] the queries of each row's second copy (N: the longest piece; a shorter row's
    last query is repeated); lse: [L, B, H, N] their log-sum-exp over the piece's keys (fp32); share:
    [L, B, H, N] the share of their attention that goes to the piece rather than to the prompt and the
    repetition's last `REPEAT_REACH` tokens; lengths: [B] piece lengths; following: [L, B, H, M, D] the
    queries of the first reading (the piece, then the prompt; M: the longest piece + the prompt), which read
    each chunk from right after it, as a question laid out after the chunk does (their log-sum-exps are
    measured by `following_lse` at the offsets a fit reads, once the chunks are known)."""

    queries: torch.Tensor
    lse: torch.Tensor
    share: torch.Tensor
    lengths: torch.Tensor
    following: torch.Tensor

    @classmethod
    @torch.no_grad()
    def measure(cls, captured: dict[int, torch.Tensor], keys: torch.Tensor, lengths: torch.Tensor, prompt_tokens: int,
                scaling: float, block: int | None = None) -> "RepeatedPieces":
        """From the forward pass's post-RoPE queries `captured` {layer: [B, H, T, D]} and its keys
        [L, B, Hkv, T, D]; row by row and layer by layer, in blocks of `block` queries (`causal_lse`;
        default `measure_block`)."""
        block = block or measure_block(keys.device)
        layers, batch, _, _, dim = keys.shape
        heads = captured[0].shape[1]
        sizes = lengths.tolist()
        longest, device = max(sizes), keys.device
        queries = captured[0].new_empty(layers, batch, heads, longest, dim)
        lse = torch.empty(layers, batch, heads, longest, device=device)
        outside = torch.empty_like(lse)
        following = captured[0].new_empty(layers, batch, heads, longest + prompt_tokens, dim)
        for row, n in enumerate(sizes):
            read = n + prompt_tokens  # the repetition's token j sits at read + j
            for layer in range(layers):
                q = captured[layer][row, :, read : read + n]  # [H, n, D]
                k = keys[layer, row]  # [Hkv, T, D]
                queries[layer, row, :, :n] = q
                # placed past the piece's last key, each query reads all of it
                lse[layer, row, :, :n] = causal_lse(q, k[:, :n], n, scaling, chunk=block)
                # what it reads besides the piece: the prompt, and its own last REPEAT_REACH tokens
                outside[layer, row, :, :n] = causal_lse(q, k[:, n : read + n], prompt_tokens, scaling,
                                                        reach=REPEAT_REACH, chunk=block)
                following[layer, row, :, :read] = captured[layer][row, :, :read]
            # a shorter row repeats its last query (never read: windows stay inside the piece)
            for tensor in (queries, lse, outside):
                tensor[:, row, :, n:] = tensor[:, row, :, n - 1 : n]
            following[:, row, :, read:] = following[:, row, :, read - 1 : read]
        return cls(queries, lse, torch.sigmoid(lse - outside), lengths.to(device), following)

    @torch.no_grad()
    def following_lse(self, keys: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor, scaling: float,
                      block: int | None = None) -> torch.Tensor:
        """[c, L, H, F] (fp32): the log-sum-exp of the first reading's queries at `offsets` [c, F] of row
        `rows` [c] (keys [L, B, Hkv, T, D] of the same pass) over the keys up to their own positions. Only
        these offsets are measured, each row's distinct ones once, in blocks of `block` (default `measure_block`)."""
        block = block or measure_block(keys.device)
        layers, _, heads = self.following.shape[:3]
        out = torch.empty(rows.numel(), layers, heads, offsets.shape[1], device=keys.device)
        for row in rows.unique().tolist():
            mine = (rows == row).nonzero()[:, 0]
            at, inverse = offsets[mine].unique(sorted=True, return_inverse=True)  # [m], [c', F]
            for layer in range(layers):
                q = self.following[layer, row][:, at]  # [H, m, D]
                lse = causal_lse(q, keys[layer, row, :, : int(at[-1]) + 1], 0, scaling, chunk=block, positions=at)
                out[mine, layer] = lse[:, inverse].transpose(0, 1)  # [H, c', F] -> [c', H, F]
        return out


def reference_window(starts: torch.Tensor, lengths: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """[c, Q] repetition offsets whose queries a chunk is fitted to: the window around the chunk's own copy
    (its queries predict the chunk's tokens: offsets start - 1 ... start + chunk - 2, widened by
    `WINDOW_MARGIN` on either side and moved inside the piece) and `SPREAD` offsets evenly over the piece."""
    width = chunk_tokens + 2 * WINDOW_MARGIN
    first = (starts - 1 - WINDOW_MARGIN).clamp(min=0)
    first = torch.minimum(first, (lengths - width).clamp(min=0))
    window = (first[:, None] + torch.arange(width, device=starts.device)).minimum(lengths[:, None] - 1)
    spread = (torch.linspace(0, 1, SPREAD, device=starts.device)[None] * (lengths[:, None] - 1).float()).round().long()
    return torch.cat([window, spread], dim=1)


def following_window(starts: torch.Tensor, lengths: torch.Tensor, prompt_tokens: int, chunk_tokens: int) -> torch.Tensor:
    """[c, FOLLOWING] first-reading offsets whose queries a chunk is fitted to besides the repetition's: the
    `FOLLOWING` tokens right after the chunk (into the prompt after the piece, never past it)."""
    offsets = starts[:, None] + chunk_tokens + torch.arange(FOLLOWING, device=starts.device)
    return offsets.minimum(lengths[:, None] + prompt_tokens - 1)


@dataclass
class ChunkSlots:
    """Slots of one compacted chunk, sorted by (layer, KV head): kv [t, 2, D] (model dtype), beta [t] (fp32),
    rope [t] (the piece position each key is rotated at), head [t] (layer * KV heads + KV head)."""

    kv: torch.Tensor
    beta: torch.Tensor
    rope: torch.Tensor
    head: torch.Tensor


class _Problems:
    """Gathers the (chunk, layer, KV head) Attention Matching problems of a forward batch by unit id
    `(chunk * L + layer) * Hkv + head`, chunk indexing `rows` / `starts`."""

    def __init__(self, keys, values, repeated: RepeatedPieces, rows, starts, chunk_tokens, scaling):
        self.keys, self.values, self.repeated = keys, values, repeated
        self.rows, self.starts, self.chunk_tokens, self.scaling = rows, starts, chunk_tokens, scaling
        self.layers, _, self.kv_heads = keys.shape[:3]
        self.group = repeated.queries.shape[2] // self.kv_heads
        self.window = reference_window(starts, repeated.lengths[rows], chunk_tokens)  # [c, Q]
        prompt_tokens = repeated.following.shape[3] - repeated.queries.shape[3]
        self.following = following_window(starts, repeated.lengths[rows], prompt_tokens, chunk_tokens)  # [c, F]
        self.following_lse = repeated.following_lse(keys, rows, self.following, scaling)  # [c, L, H, F]

    def __call__(self, units: torch.Tensor) -> tuple[SpanProblem, torch.Tensor, torch.Tensor]:
        """(problem, share [P, G*Q], rope [P, C]) of `units` [P]."""
        chunk, rest = units // (self.layers * self.kv_heads), units % (self.layers * self.kv_heads)
        layer, head = rest // self.kv_heads, rest % self.kv_heads
        row = self.rows[chunk]
        span = self.starts[chunk][:, None] + torch.arange(self.chunk_tokens, device=units.device)  # [P, C]
        keys = self.keys[layer[:, None], row[:, None], head[:, None], span]  # [P, C, D]
        values = self.values[layer[:, None], row[:, None], head[:, None], span]
        heads = head[:, None] * self.group + torch.arange(self.group, device=units.device)  # [P, G]
        pick = lambda window: (layer[:, None, None], row[:, None, None], heads[:, :, None], window[chunk][:, None, :])  # noqa: E731
        flat = lambda t: t.reshape(units.numel(), -1, *t.shape[3:])  # noqa: E731 - [P, G, Q, ...] -> [P, G*Q, ...]
        repeated, following = pick(self.window), pick(self.following)
        both = lambda first, second: flat(torch.cat([first, second], dim=2))  # noqa: E731 - per query head: window, then following
        queries = both(self.repeated.queries[repeated], self.repeated.following[following])
        following_lse = self.following_lse[chunk[:, None], layer[:, None], heads]  # [P, G, F]
        lse = both(self.repeated.lse[repeated], following_lse)
        # the first reading attends to nothing but the piece and the prompt: all of its attention counts
        share = both(self.repeated.share[repeated], torch.ones_like(following_lse))
        problem = SpanProblem(queries, keys, values, torch.zeros(keys.shape[:2], device=keys.device), lse, self.scaling)
        return problem, share, span

    def scores(self, units: torch.Tensor) -> torch.Tensor:
        """[P, C]: the largest share of attention any reference query gives each entry (the global ranking)."""
        problem, share, _ = self(units)
        return (problem.weights() * share[..., None]).amax(dim=1)


def allocate_piece(scores: torch.Tensor, slots_per_chunk: int, whole_span_share: float | None) -> torch.Tensor:
    """[c, L, Hkv] slots per chunk, layer and KV head of one piece from its entries' scores [c, L, Hkv, C]:
    the (layer, KV head)s share c * L * Hkv * `slots_per_chunk` slots by `allocate_by_scores` (whole spans
    included), then each head splits its own over the chunks by the same ranking."""
    chunks, layers, kv_heads, width = scores.shape
    per_head = scores.permute(1, 2, 0, 3).reshape(layers * kv_heads, chunks * width)  # chunk-major within a head
    total = chunks * layers * kv_heads * slots_per_chunk
    # every head keeps at least one slot per chunk: a chunk read right before a question gets a large share of
    # the diffuse heads' attention, which no single entry of it wins in the ranking
    counts = torch.tensor(allocate_by_scores(list(per_head.cpu()), total, minimum=chunks, whole_span_share=whole_span_share),
                          device=scores.device)
    first = per_head.view(-1, chunks, width).clone()
    first.scatter_(2, first.argmax(dim=2, keepdim=True), float("inf"))  # each chunk's best entry ranks first
    order = first.view(-1, chunks * width).argsort(dim=1, descending=True, stable=True)
    chosen = (torch.arange(chunks * width, device=scores.device)[None] < counts[:, None]).long()
    budgets = torch.zeros(layers * kv_heads, chunks, dtype=torch.long, device=scores.device)
    budgets.scatter_add_(1, order // width, chosen)
    return budgets.view(layers, kv_heads, chunks).permute(2, 0, 1)


@torch.no_grad()
def compact_pieces(keys, values, repeated: RepeatedPieces, chunks: list[tuple[int, int, int]], chunk_tokens: int,
                   slots_per_chunk: int, scaling: float, whole_span_share: float | None,
                   press: AttentionMatchingPress | None = None) -> list[ChunkSlots]:
    """Slots of the whole chunks `chunks` [(row, chunk, start)] of a forward batch (keys/values [L, B, Hkv, T, D]
    as the model rotated them; `repeated` from the same pass). Budgets are ranked within each row's piece."""
    press = press or chunk_press()
    device = keys.device
    layers, _, kv_heads, _, dim = keys.shape
    per_chunk = layers * kv_heads
    rows = torch.tensor([row for row, _, _ in chunks], device=device)
    starts = torch.tensor([start for _, _, start in chunks], device=device)
    problems = _Problems(keys, values, repeated, rows, starts, chunk_tokens, scaling)
    units = torch.arange(len(chunks) * per_chunk, device=device)
    scores = torch.cat([problems.scores(part) for part in units.split(PROBLEMS_PER_SOLVE)])
    scores = scores.view(len(chunks), layers, kv_heads, chunk_tokens)
    budgets = torch.zeros(len(chunks), layers, kv_heads, dtype=torch.long, device=device)
    for row in rows.unique().tolist():
        mine = (rows == row).nonzero()[:, 0]
        budgets[mine] = allocate_piece(scores[mine], slots_per_chunk, whole_span_share)
    budgets = budgets.reshape(-1)
    total = int(budgets.sum())
    offsets = budgets.cumsum(0) - budgets
    kv = keys.new_empty(total, 2, dim)
    beta = torch.zeros(total, device=device)
    rope = torch.empty(total, dtype=torch.long, device=device)
    for budget in budgets.unique().tolist():
        if budget == 0:
            continue
        for part in (budgets == budget).nonzero()[:, 0].split(PROBLEMS_PER_SOLVE):
            problem, _, span = problems(part)
            if budget >= chunk_tokens:  # the whole chunk, exact
                index = torch.arange(chunk_tokens, device=device).expand(part.numel(), -1)
                new_keys, new_values, new_beta = problem.keys, problem.values, problem.key_bias
            else:
                span_of = HeadSpan(problem, torch.arange(chunk_tokens, device=device),
                                   torch.full((problem.queries.shape[1],), -1, device=device), span)
                index, new_keys, new_values, new_beta = press.compact(span_of, budget)
            at = offsets[part][:, None] + torch.arange(budget, device=device)
            kv[at, 0] = new_keys.to(kv.dtype)
            kv[at, 1] = new_values.to(kv.dtype)
            beta[at] = new_beta.float()
            rope[at] = span.gather(1, index)
    if not bool(torch.isfinite(beta).all()):
        raise FloatingPointError("bank compaction produced non-finite slot beta")
    head = (torch.arange(budgets.numel(), device=device) % per_chunk).repeat_interleave(budgets)
    counts = budgets.view(len(chunks), per_chunk).sum(1).tolist()
    out, start = [], 0
    for count in counts:
        part = slice(start, start + count)
        out.append(ChunkSlots(kv[part], beta[part], rope[part], head[part]))
        start += count
    return out
