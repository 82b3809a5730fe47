"""Asking a `MemoryBank`: score every chunk position-free, attend the best ones exactly at in-range positions.

1. Routing. The question is read alone; at each routing layer (`BankOptions.routing_layers`) its
   queries, rotated back to position 0 and centred on the question's mean query (what all its tokens
   share says nothing about where the answer is), meet every routing key (the bank's keys at that layer,
   also at position 0) in one matmul on the model's device. A chunk's logit for one query is its best
   key's (`routing_pool="max"`) or its mean key's ("mean"); its score is the attention mass it would get
   over all chunks (softmax over chunks), summed over the question's queries (`query_tokens`: all of
   them by default), the query heads and the routing layers. Measured on SmolLM2-135M (needles in 12K and
   32K tokens of Python sources): the old routing (mean-pooled keys of the upper half of the layers,
   scored by the question's last query) put the needle's chunk among the top 8 for 2 of 6 needles at
   12K (2 of 10 at 32K); the best key of each chunk at layer 5, scored by every question token, ranks it
   first for all 16 (the lower layers match the question's words to the chunk's).
2. Selection. "shared": one choice for every layer, from the scores summed over the routing layers: the
   `top_k` best chunks that reach `min_relative_score` (0.5) of the best one's score.
   "per-layer": each routing layer chooses its own `top_k`; every model layer reads the choice of the
   routing layer nearest to it (with every layer routing, each layer its own).
3. Layout. The chosen chunks are laid out in bank (document) order, each piece's sink entries ahead of its
   first chunk, from position 0 on; keys move there by one re-rotation. The question follows right after,
   so every position stays inside the trained context. A compacted chunk keeps its width in positions,
   its slots sit where their keys were chosen, and its logits carry their beta.
With every chunk selected and full resolution, this is exactly reading each document (piece) with its own
positions and the question after them all.
"""

import logging
import time
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from .machine import synchronize
from .modeling.cache import SparseMemCache, SparseMemLayer
from .modeling.slots import SlotTier
from .modeling.rope import shift_keys, trained_context

logger = logging.getLogger(__name__)

SELECTIONS = ("shared", "per-layer")


@dataclass
class RecallOptions:
    """top_k: chunks read per question (per layer with per-layer selection); with `chunk_tokens` this sets
        the prompt budget. None: every chunk (only for banks that fit the window).
    selection: "shared" (one choice from the scores summed over the routing layers, default) or
        "per-layer" (each layer the choice of its nearest routing layer).
    exclude: chunk ids never read (e.g. an evaluation hiding other cases' needles); None: none.
    include: chunk ids always read, whatever their score (a diagnostic: does the model answer once the
        right chunk is read?); they count towards `top_k`. None: none.
    query_tokens: the question's last tokens whose queries score the chunks; None: every token of it
        (measured best: the words that name what is asked need not be the last ones).
    min_relative_score: chunks scoring below this fraction of the best chunk's score are not read, so
        `top_k` is an upper bound; 0 always reads `top_k`. Chunks that merely share a word with the
        question distract a small model: on SmolLM2 (6 needles in 32K tokens, top 8), 0 answered 4 of 6
        needles with every needle's chunk ranked first, 0.5 answered 6 of 6 (and 2 of 3 code questions,
        as 0 did).
    """

    top_k: int | None = 32
    selection: str = "shared"
    exclude: torch.Tensor | None = None
    include: torch.Tensor | None = None
    query_tokens: int | None = None
    min_relative_score: float = 0.5

    def validate(self, num_layers: int) -> "RecallOptions":
        if self.selection not in SELECTIONS:
            raise ValueError(f"`selection` must be one of {SELECTIONS}, got {self.selection!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"`top_k` must be a positive integer or None (every chunk), got {self.top_k!r}")
        if self.query_tokens is not None and (not isinstance(self.query_tokens, int) or self.query_tokens < 1):
            raise ValueError(f"`query_tokens` must be a positive integer or None (every question token), got {self.query_tokens!r}")
        if not isinstance(self.min_relative_score, (int, float)) or not 0 <= self.min_relative_score <= 1:
            raise ValueError(f"`min_relative_score` must be a number in [0, 1], got {self.min_relative_score!r}")
        if self.include is not None and self.top_k is not None and self.include.numel() > self.top_k:
            raise ValueError(f"`include` names {self.include.numel()} chunks, more than top_k={self.top_k}")
        return self


@dataclass
class Recall:
    cache: SparseMemCache
    chunks: list[torch.Tensor]  # per layer: the global chunk ids read, in layout order
    width: int  # positions the memory takes before the question
    seconds: float  # routing and reading together
    routing_seconds: float  # scoring every chunk and choosing (grows with the bank; the rest does not)

    def documents(self, bank) -> list[str]:
        """Names of the documents read (any layer), in bank order."""
        chunks = torch.unique(torch.cat(self.chunks))
        docs = torch.unique(bank.piece_global_document[bank.chunk_global_piece[chunks]])
        return [bank.documents[int(d)]["name"] for d in docs]


@torch.no_grad()
def question_queries(model, question_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """{layer: queries [H, n, D]} of the question read alone, rotated back to position 0 (fp32)."""
    from .query_sources import query_hook
    from .modeling.call_context import call_settings

    captured: dict[int, torch.Tensor] = {}
    with call_settings(model, attn_implementation="sdpa"), query_hook(model, lambda i, q: captured.__setitem__(i, q[0])):
        model(question_ids, use_cache=False, logits_to_keep=1)
    positions = torch.arange(question_ids.shape[1], device=question_ids.device)
    rotary = model.model.rotary_emb
    return {i: shift_keys(rotary, q.float(), -positions) for i, q in captured.items()}


# routing keys scored per matmul: bounds the per-key logits (heads x query tokens x block, fp32) to a few
# hundred MB whatever the bank's size; what still grows with the bank is each chunk's best logit (heads x query
# tokens x chunks, fp32: 64 times fewer entries than keys, about 0.3 GB for a 50-token question at 10M tokens)
_ROUTING_BLOCK = 1 << 18


def chunk_scores(bank, queries: dict[int, torch.Tensor], exclude: torch.Tensor | None,
                 query_tokens: int | None = None) -> torch.Tensor:
    """[Lr, N] score of every chunk at every routing layer (see the module docstring)."""
    scaling = bank.model.model.layers[0].self_attn.scaling
    hkv, count = bank.num_kv_heads, bank.num_chunks
    owner = bank.routing_chunk
    scores = []
    for row, layer in enumerate(bank.routing_layers):
        q = queries[layer]
        q = q - q.mean(dim=1, keepdim=True)  # [H, n, D]
        if query_tokens is not None:
            q = q[:, -query_tokens:]
        heads, n, dim = q.shape
        q = q.reshape(hkv, heads // hkv * n, dim)  # query head h reads KV head h // group
        best = torch.full((hkv, q.shape[1], count), float("-inf"), device=q.device)
        for start in range(0, owner.numel(), _ROUTING_BLOCK):
            block = slice(start, start + _ROUTING_BLOCK)
            codes = bank.routing[row, :, block].float()  # [Hkv, r, D] int8 codes
            # (q . codes) * scale: the key's scale applied to its logit, never to a dequantised copy of the keys;
            # the keys are stored minus the bank's center, which moves every logit of a (head, query) alike
            # and so leaves the softmax over chunks as it is
            logits = (q @ codes.transpose(-1, -2)).mul_(bank.routing_scale[row, :, block].float()[:, None] * scaling)
            index = owner[block].long().expand_as(logits)
            best.scatter_reduce_(-1, index, logits, reduce="amax")
        if exclude is not None and exclude.numel():
            best[..., exclude.to(best.device)] = float("-inf")
        scores.append(torch.softmax(best, dim=-1).sum(dim=(0, 1)))
    return torch.stack(scores)


def select_chunks(bank, question_ids: torch.Tensor, options: RecallOptions) -> tuple[list[torch.Tensor], float]:
    """Per layer, the global ids of the chunks to read, sorted (bank order); and the seconds spent scoring
    the chunks and choosing (after the question's own forward pass: the part that grows with the bank)."""
    count = bank.num_chunks
    if count == 0:
        raise ValueError(f"the memory bank {bank.folder} holds no documents yet: add some first")
    num_layers = bank.num_layers
    if options.top_k is None or options.top_k >= count:
        chosen = torch.arange(count)
        if options.exclude is not None and options.exclude.numel():
            keep = torch.ones(count, dtype=torch.bool)
            keep[options.exclude.cpu()] = False
            chosen = chosen[keep]
        return [chosen] * num_layers, 0.0
    queries = question_queries(bank.model, question_ids)
    synchronize(bank.model.device)
    start = time.perf_counter()
    scores = chunk_scores(bank, queries, options.exclude, options.query_tokens)
    if options.selection == "shared":
        chosen = [_pick(scores.sum(0), options)] * num_layers  # `_pick` returns host tensors: the device has finished
    else:
        picks = [_pick(row, options) for row in scores]
        routing = torch.tensor(bank.routing_layers)
        nearest = [int((routing - layer).abs().argmin()) for layer in range(num_layers)]
        chosen = [picks[row] for row in nearest]
    return chosen, time.perf_counter() - start


def _pick(scores: torch.Tensor, options: RecallOptions) -> torch.Tensor:
    """The ids (sorted) of the top `top_k` chunks by `scores` [N] that reach `min_relative_score` of the
    best score, with the `include`d chunks always among them."""
    floor = options.min_relative_score * scores.max()
    if options.include is not None and options.include.numel():
        scores = scores.clone()
        scores[options.include.to(scores.device)] = float("inf")
    top = scores.topk(options.top_k)
    return torch.sort(top.indices[top.values >= floor].cpu()).values


class _Fetched:
    """Chunk and sink data read from the shards (or, for a bank of token ids, read again by the model) once
    per question, on the model's device."""

    def __init__(self, bank, chunks: torch.Tensor, hidden: torch.Tensor | None = None):
        device = bank.model.device
        self.exact: dict[int, torch.Tensor] = {}  # chunk -> K/V [t, L, 2, Hkv, D]
        # chunk -> the position its first key is rotated at (stored K/V: its start in the piece)
        self.first_position: dict[int, int] = {}
        # chunk -> (kv [t, 2, D], beta [t], rope [t], KV head [t], layer ends): a chunk's slots are stored sorted by
        # (layer, KV head), so layer l's are rows ends[l - 1]:ends[l], found once on the host, not per layer on the device
        self.slots: dict[int, tuple] = {}
        self.sinks: dict[int, torch.Tensor] = {}
        if bank.options.store == "tokens":
            self._read_again(bank, chunks, hidden)
            return
        layers = bank.model.config.num_hidden_layers
        for chunk in chunks.tolist():
            shard = int(bank.chunk_shard[chunk])
            _, start, _, row, rows, compacted = bank.chunk_table[chunk].tolist()
            if compacted:
                kv, beta, rope = (bank.read_rows(shard, name, row, rows).to(device, non_blocking=True)
                                  for name in ("slot_kv", "slot_beta", "slot_rope"))
                head = bank.read_rows(shard, "slot_head", row, rows).long()
                ends = [0] + torch.bincount(head // bank.num_kv_heads, minlength=layers).cumsum(0).tolist()
                head = (head % bank.num_kv_heads).to(device, non_blocking=True)
                self.slots[chunk] = (kv, beta, rope.long(), head, ends)
            else:
                self.exact[chunk] = bank.read_rows(shard, "kv", row, rows).to(device, non_blocking=True)
                self.first_position[chunk] = start
        for piece in torch.unique(bank.chunk_global_piece[chunks]).tolist():
            _, sink_row, sinks, _ = bank.piece_table[piece].tolist()
            if sinks:
                self.sinks[piece] = bank.read_rows(int(bank.piece_shard[piece]), "kv", sink_row, sinks).to(device, non_blocking=True)

    def _read_again(self, bank, chunks: torch.Tensor, hidden: torch.Tensor | None) -> None:
        """A bank of token ids: the chunks are read again by the model (`BankOptions.reread`), in rows (token
        ids) each placed as (piece, sinks, [(chunk, offset in the row, length)])."""
        if bank.options.reread == "joint":
            rows, placed = self._joint_row(bank, chunks)
        else:
            rows, placed = self._separate_rows(bank, chunks, hidden)
        for batch in bank.batches([row.numel() for row in rows]):
            # right-padded: causal attention never lets a real token read the padding
            ids = pad_sequence([rows[i] for i in batch], batch_first=True)
            keys, values = bank.forward_kv(ids)  # [L, B, Hkv, T, D]
            kv = torch.stack([keys, values], dim=2)  # [L, B, 2, Hkv, T, D]
            for slot, i in enumerate(batch):
                piece, sinks, offsets = placed[i]
                if sinks and piece not in self.sinks:
                    self.sinks[piece] = kv[:, slot, :, :, :sinks].permute(3, 0, 1, 2, 4)  # [s, L, 2, Hkv, D]
                for chunk, offset, length in offsets:
                    self.exact[chunk] = kv[:, slot, :, :, offset : offset + length].permute(3, 0, 1, 2, 4)
                    self.first_position[chunk] = offset

    @staticmethod
    def _joint_row(bank, chunks: torch.Tensor):
        """reread="joint": one row, the chunks' tokens one after the other in bank order, no sinks (the row's
        first tokens take their part), so the layout's positions are the row's own."""
        parts, offsets, cursor = [], [], 0
        for chunk in chunks.tolist():
            _, _, length, row, _, _ = bank.chunk_table[chunk].tolist()
            parts.append(bank.read_rows(int(bank.chunk_shard[chunk]), "ids", row, length).long())
            offsets.append((chunk, cursor, length))
            cursor += length
        return [torch.cat(parts)], [(None, 0, offsets)]

    @staticmethod
    def _separate_rows(bank, chunks: torch.Tensor, hidden: torch.Tensor | None):
        """reread="separate": rows of [a piece's sinks, then its tokens from `reread_context` before a chunk to
        the chunk's end]; chunks of a piece whose spans touch share a row. A hidden chunk is never read, not
        even as another chunk's context: a span starts after it."""
        context = bank.options.reread_context
        hidden_set = set() if hidden is None else set(hidden.tolist())
        rows: list[torch.Tensor] = []
        placed: list[tuple[int, int, list[tuple[int, int, int]]]] = []
        chunk_list = chunks.tolist()
        pieces = bank.chunk_global_piece[chunks].tolist()
        for piece in dict.fromkeys(pieces):
            _, sink_row, sinks, _ = bank.piece_table[piece].tolist()
            shard = int(bank.piece_shard[piece])
            hidden_ends = []  # where the piece's hidden chunks end
            for other in hidden_set:
                if int(bank.chunk_global_piece[other]) == piece:
                    _, start, length, _, _, _ = bank.chunk_table[other].tolist()
                    hidden_ends.append(start + length)
            spans: list[list] = []  # [first token, end token, [(chunk, start, length)]]
            for chunk in (c for c, p in zip(chunk_list, pieces) if p == piece):
                _, start, length, _, _, _ = bank.chunk_table[chunk].tolist()
                first = sinks if context is None else max(sinks, start - context)
                first = max([first] + [end for end in hidden_ends if end <= start])
                if spans and first <= spans[-1][1]:
                    spans[-1][1] = start + length
                    spans[-1][2].append((chunk, start, length))
                else:
                    spans.append([first, start + length, [(chunk, start, length)]])
            sink_ids = bank.read_rows(shard, "ids", sink_row, sinks)
            for first, end, members in spans:
                rows.append(torch.cat([sink_ids, bank.read_rows(shard, "ids", sink_row + first, end - first)]).long())
                offsets = [(c, sinks + start - first, length) for c, start, length in members]
                placed.append((piece, sinks, offsets))
        return rows, placed


def _layer(bank, fetched: _Fetched, chunks: torch.Tensor, layer: int, rotary):
    """(keys, values, positions, slots, width) of one layer reading `chunks`, positions from 0."""
    keys, values, deltas, positions = [], [], [], []
    slot = {"keys": [], "values": [], "beta": [], "rope": [], "position": [], "head": []}
    cursor = 0
    device = bank.model.device
    pieces = bank.chunk_global_piece[chunks].tolist()
    previous_piece = None
    for chunk, piece in zip(chunks.tolist(), pieces):
        if piece != previous_piece and piece in fetched.sinks:
            data = fetched.sinks[piece][:, layer]  # [s, 2, Hkv, D]
            keys.append(data[:, 0])
            values.append(data[:, 1])
            deltas.append(torch.full((data.shape[0],), cursor, device=device))
            positions.append(torch.arange(cursor, cursor + data.shape[0], device=device))
            cursor += data.shape[0]
        previous_piece = piece
        _, start, length, _, _, _ = bank.chunk_table[chunk].tolist()
        if chunk in fetched.exact:
            delta = cursor - fetched.first_position[chunk]
            data = fetched.exact[chunk][:, layer]
            keys.append(data[:, 0])
            values.append(data[:, 1])
            deltas.append(torch.full((length,), delta, device=device))
            positions.append(torch.arange(cursor, cursor + length, device=device))
        else:
            delta = cursor - start
            kv, beta, rope, head, ends = fetched.slots[chunk]
            own = slice(ends[layer], ends[layer + 1])
            count = own.stop - own.start
            slot["keys"].append(shift_keys(rotary, kv[own, 0], torch.full((count,), delta, device=device)))  # [t, D]
            slot["values"].append(kv[own, 1])
            slot["beta"].append(beta[own])
            slot["rope"].append(rope[own] + delta)
            slot["head"].append(head[own])
            slot["position"].append(torch.full((count,), cursor + length - 1, device=device))
        cursor += length
    key = torch.cat(keys).transpose(0, 1)  # [Hkv, n, D]
    key = shift_keys(rotary, key, torch.cat(deltas))
    value = torch.cat(values).transpose(0, 1)
    return key, value, torch.cat(positions), slot, cursor


def build_cache(bank, chunks_per_layer: list[torch.Tensor], hidden: torch.Tensor | None = None) -> tuple[SparseMemCache, int]:
    """A `SparseMemCache` (logical positions) with each layer's chunks laid out, right-aligned so every
    layer ends at the same position, where the question starts. `hidden`: chunk ids a bank of token ids
    must not read again as context."""
    model = bank.model
    rotary = model.model.rotary_emb
    union = torch.unique(torch.cat(chunks_per_layer))
    fetched = _Fetched(bank, union, hidden)
    built = [_layer(bank, fetched, chunks, layer, rotary) for layer, chunks in enumerate(chunks_per_layer)]
    width = max(b[4] for b in built)
    cache = SparseMemCache(model.config, positions="logical")
    for key, value, positions, slot, layer_width in built:
        offset = width - layer_width
        if offset:
            key = shift_keys(rotary, key, torch.full((key.shape[1],), offset, device=key.device))
            positions = positions + offset
        layer = SparseMemLayer()
        key, value = key[None], value[None]
        layer.lazy_initialization(key, value)
        layer.keys, layer.values, layer.positions = key, value, positions
        layer.logical_length = width
        if sum(part.shape[0] for part in slot["keys"]):
            slot_keys = torch.cat(slot["keys"])  # [S, D], each slot with its own KV head
            if offset:
                slot_keys = shift_keys(rotary, slot_keys, torch.full((slot_keys.shape[0],), offset, device=key.device))
            count = slot_keys.shape[0]
            layer.slots = SlotTier(
                slot_keys[None],
                torch.cat(slot["values"])[None],
                torch.cat(slot["beta"]).float()[None],
                torch.cat(slot["head"]),
                torch.full((count,), -1, dtype=torch.long, device=key.device),
                torch.cat(slot["position"]) + offset,
                (torch.cat(slot["rope"]) + offset)[None],
            )
        cache.layers.append(layer)
    # the ids of the memory are not tokens the question could repeat: generate reads the question as new
    cache.token_ids = torch.full((1, width), -1, dtype=torch.long, device=model.device)
    return cache, width


@torch.no_grad()
def recall(bank, question_ids: torch.Tensor, top_k: int | None | str = "default", selection: str | None = None,
           exclude=None, include=None, answer_tokens: int = 64, query_tokens: int | None = None,
           min_relative_score: float = 0.5) -> Recall:
    """Select and lay out the chunks `question_ids` [1, n] reads. `answer_tokens`: room kept for the
    answer inside the trained context (the layout + question + answer must fit it)."""
    options = RecallOptions(
        top_k=bank.recall.top_k if top_k == "default" else top_k,
        selection=selection or bank.recall.selection,
        exclude=None if exclude is None else torch.as_tensor(exclude, dtype=torch.long),
        include=None if include is None else torch.as_tensor(include, dtype=torch.long),
        query_tokens=query_tokens,
        min_relative_score=min_relative_score,
    ).validate(bank.num_layers)
    if question_ids.dim() != 2 or question_ids.shape[0] != 1:
        raise ValueError(f"a memory bank answers one question at a time: ids of shape [1, n], got {tuple(question_ids.shape)}")
    start = time.perf_counter()
    question_ids = question_ids.to(bank.model.device)
    chunks, routing_seconds = select_chunks(bank, question_ids, options)
    cache, width = build_cache(bank, chunks, options.exclude)
    context = trained_context(bank.model.config)
    if context is not None and width + question_ids.shape[1] + answer_tokens > context:
        raise ValueError(
            f"the memory read ({width} positions) + question ({question_ids.shape[1]}) + answer ({answer_tokens}) exceed "
            f"the trained context ({context}): lower top_k"
        )
    return Recall(cache, chunks, width, time.perf_counter() - start, routing_seconds)


class _FirstToken:
    """A generate streamer that notes when the first new token arrives (the first `put` is the prompt)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:
            if isinstance(value, torch.Tensor) and value.is_cuda:
                torch.cuda.synchronize(value.device)  # the token exists, not just its kernel launch
            self.first = time.perf_counter()

    def end(self):
        pass


@torch.no_grad()
def generate_from_memory(bank, ids: torch.Tensor, max_new_tokens: int, refresh_every: int | None = None,
                         eos_token_id: int | None = None, **recall_options) -> tuple[torch.Tensor, list[Recall], float]:
    """Greedy answer to `ids` [1, n] from `bank`: (new token ids [m], the recall of every round, seconds
    to the first token). `refresh_every`: re-select the chunks every this many generated tokens, routed
    by the question and the answer so far; each round lays out its chunks and reads the question and the
    answer so far after them again (None: one round)."""
    if refresh_every is not None and (not isinstance(refresh_every, int) or refresh_every < 1):
        raise ValueError(f"`refresh_every` must be a positive integer or None (choose the chunks once), got {refresh_every!r}")
    model, start = bank.model, time.perf_counter()
    step = max_new_tokens if refresh_every is None else refresh_every
    answer = ids.new_zeros(0)
    rounds, first = [], None
    while answer.numel() < max_new_tokens:
        prompt = torch.cat([ids[0], answer])[None]
        left = max_new_tokens - answer.numel()
        found = recall(bank, prompt, answer_tokens=left, **recall_options)
        rounds.append(found)
        streamer = _FirstToken() if first is None else None
        out = model.generate(prompt, past_key_values=found.cache, max_new_tokens=min(step, left), do_sample=False,
                             eos_token_id=eos_token_id, pad_token_id=eos_token_id, streamer=streamer)
        if streamer is not None:
            first = streamer.first if streamer.first is not None else time.perf_counter()
        new = out[0, prompt.shape[1]:]
        answer = torch.cat([answer, new])
        if new.numel() < min(step, left) or (eos_token_id is not None and eos_token_id in new.tolist()):
            break  # the answer ended
    return answer, rounds, first - start


@torch.no_grad()
def answer(bank, question: str, max_new_tokens: int = 64, refresh_every: int | None = None, **recall_options) -> dict:
    """Answer `question` from `bank` (greedy). Returns {"answer", "documents" (read in any round), "chunks"
    (the chunk ids the first round read: one list with shared selection, one per layer with per-layer),
    "rounds" (the chunks of every round, as "chunks"), "seconds_to_first_token", "routing_seconds" (of the first
    round: the part of the time to the first token that grows with the bank), "memory_positions"}.
    `refresh_every`: see `generate_from_memory`."""
    if bank.tokenizer is None:
        raise ValueError("asking in text needs the bank's tokenizer: pass tokenizer= to MemoryBank.open")
    tokenizer, model = bank.tokenizer, bank.model
    ids = tokenizer(question, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
    if ids.shape[1] == 0:
        raise ValueError("the question is empty")
    tokens, rounds, seconds = generate_from_memory(bank, ids, max_new_tokens, refresh_every, tokenizer.eos_token_id,
                                                   **recall_options)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    shared = (recall_options.get("selection") or bank.recall.selection) == "shared"
    chunks = [[c.tolist() for c in (found.chunks[:1] if shared else found.chunks)] for found in rounds]
    documents = list(dict.fromkeys(name for found in rounds for name in found.documents(bank)))
    return {"answer": text, "documents": documents, "chunks": chunks[0], "rounds": chunks,
            "seconds_to_first_token": seconds, "routing_seconds": rounds[0].routing_seconds,
            "memory_positions": rounds[0].width}
