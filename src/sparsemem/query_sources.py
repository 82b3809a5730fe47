"""Reference queries: where the queries that `compact` fits or ranks with come from, and how they are captured.

A source is a small object; `QUERY_SOURCES` maps the names presses declare (`Press.query_sources`) and
callers give (`compact(queries=("repeat",))`) to their classes:
- `ContextQueries` ("context"): the context's own prefill queries;
- `RepeatQueries` ("repeat"): a teacher-forced pass over "<context> Repeat the previous text: <context>",
  keeping the queries of the repetition (they look for every part of the context, which favours recall);
- `SelfStudyQueries` ("self-study"): the model writes about the document with `generate`, and the queries
  of its own words are captured in a teacher-forced pass;
- `RandomQueries` ("random"): Gaussian queries with the per-dimension scale of the layer's keys.

`query_sources_for` is the one resolver: `compact` and the evaluations ask it which sources a method uses,
so a method ranks with the same queries in the library and in the benchmarks.
"""

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from .modeling.call_context import call_settings
from .modeling.presses import make_press

# a repeat query's own neighbourhood: of the repetition so far, its last this many tokens count as what the
# query reads besides the context; the older ones are copies of the context (at question time they are not
# there, and a head that finds a fact in them would find it in the context)
REPEAT_REACH = 32
REPEAT_PROMPT = "\n\nRepeat the previous text exactly.\n\n"
SELF_STUDY_PROMPT = "\n\nWrite down the key facts of the text above and questions a reader might ask about it.\n"


def query_hook(model, hook):
    """Call `hook(layer_idx, query_states)` with every attention layer's post-RoPE queries, before the
    layer updates or reads its cache, for the forward passes of this thread inside the block (other
    threads running the model are not affected)."""
    return call_settings(model, query_recorder=hook)


@contextlib.contextmanager
def recording_queries(model, keep_from: int = 0):
    """Collect post-RoPE queries of every attention layer: {layer_idx: [B, H, n, d]} (positions >= keep_from)."""
    captured: dict[int, list[torch.Tensor]] = {}
    seen: dict[int, int] = {}  # queries already passed per layer, across forward calls

    def record(layer_idx, query_states):
        start = seen.get(layer_idx, 0)
        length = query_states.shape[-2]
        seen[layer_idx] = start + length
        lo = max(keep_from - start, 0)
        if lo < length:
            captured.setdefault(layer_idx, []).append(query_states[..., lo:, :].detach().float().cpu())

    with query_hook(model, record):
        yield captured


def dense_attention(model):
    """SDPA attention for this thread's passes inside the block (other threads keep the model's own)."""
    return call_settings(model, attn_implementation="sdpa")


@torch.no_grad()
def _capture(model, input_ids, keep_from, outside_from=None, reach=None):
    """{layer: (queries [B, H, n, d] of the positions >= `keep_from`, outside [B, H, n] or None)}: `outside`
    (given `outside_from`) is each query's log-sum-exp of attention logits over the pass's keys from
    `outside_from` on (what it reads besides the context: the prompt, its own tokens; of these, only the
    last `reach`), so the share of its attention the context really gets is known."""
    from transformers import DynamicCache

    # no config: every layer keeps all its keys (a sliding layer's would be cut)
    cache = DynamicCache() if outside_from is not None else None
    with dense_attention(model), recording_queries(model, keep_from) as captured:
        model(input_ids, past_key_values=cache, use_cache=cache is not None, logits_to_keep=1)
    if cache is None:
        return {layer: (torch.cat(parts, dim=-2), None) for layer, parts in captured.items()}
    scaling = model.model.layers[0].self_attn.scaling
    result = {}
    for layer, parts in captured.items():
        queries = torch.cat(parts, dim=-2)
        keys = cache.layers[layer].keys[..., outside_from:, :]
        window = getattr(model.model.layers[layer].self_attn, "attention_window", None)
        result[layer] = (queries, causal_lse(queries, keys, keep_from - outside_from, scaling, window, reach).cpu())
    return result


def causal_lse(queries, keys, offset, scaling, window=None, reach=None, chunk: int = 512, positions=None) -> torch.Tensor:
    """[..., H, n] (fp32, on the keys' device): log-sum-exp of each query's logits over the keys
    [..., Hkv, T, d] it sees. Query j sits at index `positions[j]` of the keys' sequence (default
    `offset + j`; an index at or past the end puts every key before it) and sees the keys up to it (causal);
    with a sliding `window`, only the last `window` of them; with `reach`, of the queries' own part (indices
    >= `offset`), only the last `reach`. Query head h reads KV head h // (H / Hkv): each KV head's keys meet
    its whole group's queries in one product, never copied per query head. In fp32, `chunk` queries at a
    time, each chunk against only the keys some query of it sees (memory [..., H, chunk, keys seen])."""
    *batch, heads, count, dim = queries.shape
    kv_heads, length = keys.shape[-3], keys.shape[-2]
    if heads % kv_heads:
        raise ValueError(f"causal_lse: {heads} query heads cannot share {kv_heads} KV heads evenly")
    device, group = keys.device, heads // kv_heads
    if positions is None:
        positions = offset + torch.arange(count, device=device)
    elif tuple(positions.shape) != (count,):
        raise ValueError(f"causal_lse: `positions` must give one index per query ({count}), got shape {tuple(positions.shape)}")
    positions = positions.to(device)
    out = torch.empty(*batch, heads, count, device=device)
    for lo in range(0, count, chunk):
        at = positions[lo : lo + chunk]
        first, last = int(at.min()), int(at.max())
        top = min(length, last + 1)
        # the keys some query of the chunk sees: from the window's start on, and of the queries' own part only
        # those within reach of one of them (the context before `offset` stays whole)
        bottom = max(0, first - window + 1) if window else 0
        spans = [(bottom, top)]
        if reach is not None:
            own = max(bottom, offset, first - reach + 1)
            spans = [(bottom, min(offset, top)), (own, top)]
        spans = [(a, b) for a, b in spans if a < b]
        if not spans:  # no key before any query of the chunk
            out[..., lo : lo + at.numel()] = float("-inf")
            continue
        index = torch.cat([torch.arange(a, b, device=device) for a, b in spans])
        parts = [keys[..., a:b, :] for a, b in spans]
        k = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)  # one span stays a view
        q = queries[..., lo : lo + chunk, :].to(device, torch.float32)
        size = q.shape[-2]
        q = q.reshape(*batch, kv_heads, group * size, dim)  # query head h reads KV head h // group
        logits = (q @ k.float().transpose(-1, -2) * scaling).view(*batch, kv_heads, group, size, -1)
        at = at[:, None]
        seen = index[None] <= at
        if window:
            seen &= index[None] > at - window
        if reach is not None:
            seen &= (index[None] > at - reach) | (index[None] < offset)
        out[..., lo : lo + size] = torch.logsumexp(logits.masked_fill_(~seen, float("-inf")), dim=-1).view(*batch, heads, size)
    return out


def _prompt_ids(tokenizer, text: str, input_ids: torch.Tensor) -> torch.Tensor:
    prompt = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(input_ids.device)
    return prompt.expand(input_ids.shape[0], -1)


class QuerySource:
    """What every source declares: its registry `name`, whether capturing it runs the model over the
    context (`reads_model`) and needs the `tokenizer` (for a prompt), and `capture`."""

    name: ClassVar[str]
    reads_model: ClassVar[bool] = True
    needs_tokenizer: ClassVar[bool] = False

    @property
    def label(self) -> str:
        """The name, with the settings that differ from the defaults (what a `CompactionRecord` keeps)."""
        changed = [f"{field.name}={getattr(self, field.name)!r}" for field in dataclasses.fields(self)
                   if getattr(self, field.name) != field.default]
        return f"{self.name}({', '.join(changed)})" if changed else self.name

    def capture(self, model, input_ids, tokenizer=None):
        """({layer: (queries [B, H, n, d], outside [B, H, n] or None)}, positions [n]); positions are -1
        for queries that stand for the future."""
        raise NotImplementedError


@dataclass(frozen=True)
class ContextQueries(QuerySource):
    """The context's own queries, at their positions (a dense pass over `input_ids`; `prefill` records
    the same ones while it reads the context). They read nothing beyond the context."""

    name: ClassVar[str] = "context"

    def capture(self, model, input_ids, tokenizer=None):
        return _capture(model, input_ids, 0), torch.arange(input_ids.shape[1])


@dataclass(frozen=True)
class RepeatQueries(QuerySource):
    """The queries of a teacher-forced repetition of the context after `prompt` (KVzip's reconstruction
    pass); they stand for the future (-1) and look for every part of the context.

    prompt: the text between the context and its repetition.
    reach: of the repetition so far, the last this many tokens count as what a query reads besides the
        context (its `outside` log-sum-exp, with the prompt); the older ones copy the context.
    """

    name: ClassVar[str] = "repeat"
    needs_tokenizer: ClassVar[bool] = True
    prompt: str = REPEAT_PROMPT
    reach: int = REPEAT_REACH

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt:
            raise ValueError(f"RepeatQueries `prompt` must be a non-empty string, got {self.prompt!r}")
        if isinstance(self.reach, bool) or not isinstance(self.reach, int) or self.reach < 1:
            raise ValueError(f"RepeatQueries `reach` must be an integer >= 1, got {self.reach!r}")

    def capture(self, model, input_ids, tokenizer=None):
        length = input_ids.shape[1]
        ids = torch.cat([input_ids, _prompt_ids(tokenizer, self.prompt, input_ids), input_ids], dim=1)
        return _capture(model, ids, ids.shape[1] - length, length, self.reach), torch.full((length,), -1)


@dataclass(frozen=True)
class SelfStudyQueries(QuerySource):
    """The queries of the model's own greedy notes about the context, written after `prompt` and read
    back in a teacher-forced pass; they stand for the future (-1).

    prompt: the text that asks for the notes, after the context.
    max_new_tokens: the longest the notes may be.
    """

    name: ClassVar[str] = "self-study"
    needs_tokenizer: ClassVar[bool] = True
    prompt: str = SELF_STUDY_PROMPT
    max_new_tokens: int = 128

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt:
            raise ValueError(f"SelfStudyQueries `prompt` must be a non-empty string, got {self.prompt!r}")
        tokens = self.max_new_tokens
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"SelfStudyQueries `max_new_tokens` must be an integer >= 1, got {tokens!r}")

    def capture(self, model, input_ids, tokenizer=None):
        length = input_ids.shape[1]
        ids = torch.cat([input_ids, _prompt_ids(tokenizer, self.prompt, input_ids)], dim=1)
        with dense_attention(model):
            written = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.max_new_tokens,
                                     do_sample=False, pad_token_id=tokenizer.eos_token_id)
        return _capture(model, written, ids.shape[1], length), torch.full((written.shape[1] - ids.shape[1],), -1)


@dataclass(frozen=True)
class RandomQueries(QuerySource):
    """Gaussian queries with the per-dimension scale of each layer's keys, drawn by `compact` from its
    `seed` (as many per KV head as the fit's `max_queries`); no pass over the model. They stand for the
    future (-1)."""

    name: ClassVar[str] = "random"
    reads_model: ClassVar[bool] = False

    def capture(self, model, input_ids, tokenizer=None):
        return {}, torch.zeros(0, dtype=torch.long)

    @staticmethod
    def sample(layer, heads: int, count: int, generator):
        """(queries [B, heads, count, d], positions [count]) for a cache layer."""
        batch, _, _, dim = layer.keys.shape
        scale = layer.keys.float().std(dim=(0, 2)).mean(0)  # per-dimension scale of the keys
        queries = torch.randn(batch, heads, count, dim, generator=generator) * scale.cpu()
        return queries, torch.full((count,), -1)


# the registry of source names; captured in this order whatever order they are given in
QUERY_SOURCES = {source.name: source for source in (ContextQueries, RepeatQueries, SelfStudyQueries, RandomQueries)}


def resolve_query_sources(queries) -> tuple[QuerySource, ...]:
    """`queries` (names from `QUERY_SOURCES` or source objects, a non-empty sequence) as source objects."""
    if isinstance(queries, (str, QuerySource)) or not isinstance(queries, (list, tuple)) or not queries:
        raise ValueError(f"`queries` must be a non-empty sequence of query sources (names from {list(QUERY_SOURCES)} "
                         f"or source objects such as RepeatQueries()), got {queries!r}")
    resolved = []
    for source in queries:
        if isinstance(source, QuerySource):
            resolved.append(source)
        elif isinstance(source, str) and source in QUERY_SOURCES:
            resolved.append(QUERY_SOURCES[source]())
        else:
            raise ValueError(f"unknown query source {source!r}; choose from {list(QUERY_SOURCES)} or give a source object")
    return tuple(resolved)


def query_sources_for(method, queries=None, default=("context",)) -> tuple[QuerySource, ...]:
    """The reference-query sources `method` (a name or a `Press`) is compacted with: `queries` when given,
    else the press's own (`Press.query_sources`), else `default`. `compact` and the evaluations resolve
    them here, so a method ranks with the same queries in the library and in the benchmarks."""
    if queries is None:
        own = make_press(method).query_sources
        queries = own if own is not None else default
    return resolve_query_sources(queries)


@torch.no_grad()
def capture_reference_queries(model, input_ids, sources=("context",), tokenizer=None):
    """{layer: (queries [B, H, n, d], positions [n], outside [B, H, n])} of `sources` (names or source
    objects); positions are -1 for queries standing for the future; `outside`: each query's log-sum-exp of
    attention logits over what it reads beyond the context (-inf for the context's own queries). `compact`
    accepts the first two alone. Random queries need no pass and are left to `compact`."""
    sources = [source for source in dict.fromkeys(resolve_query_sources(sources)) if source.reads_model]
    needing = [source.label for source in sources if source.needs_tokenizer]
    if needing and tokenizer is None:
        raise ValueError(f"query sources {needing} need the `tokenizer`")
    order = list(QUERY_SOURCES)
    per_layer: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = {}
    for source in sorted(sources, key=lambda source: order.index(source.name)):
        captured, positions = source.capture(model, input_ids, tokenizer)
        for layer, (queries, outside) in captured.items():
            per_layer.setdefault(layer, []).append((queries, positions, outside))
    result = {}
    for layer, parts in per_layer.items():
        result[layer] = (torch.cat([q for q, _, _ in parts], dim=-2), torch.cat([p for _, p, _ in parts]),
                         torch.cat([outside_of(q, o) for q, _, o in parts], dim=-1))
    return result


def outside_of(queries, outside=None) -> torch.Tensor:
    """`outside` log-sum-exps [B, H, n], or -inf for queries that read nothing beyond the context."""
    if outside is None:
        return torch.full(queries.shape[:-1], float("-inf"))
    if tuple(outside.shape) != tuple(queries.shape[:-1]):
        raise ValueError(f"reference queries {tuple(queries.shape)} need `outside` log-sum-exps of shape "
                         f"{tuple(queries.shape[:-1])}, got {tuple(outside.shape)}")
    return outside.cpu()
