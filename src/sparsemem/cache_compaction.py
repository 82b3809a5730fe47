"""`compact`: Attention-Matching compaction (and baselines) of a `SparseMemCache`.

Reference queries are captured from the model itself:
- "context": the context's own prefill queries;
- "repeat": a teacher-forced pass over "<context> Repeat the previous text: <context>", keeping the
  queries of the repetition (they look for every part of the context, which favours recall);
- "self-study": the model writes about the document with `generate`, and the queries of its own words
  are captured in a teacher-forced pass;
- "random": Gaussian queries with the per-dimension scale of the layer's keys.
"""

import contextlib
import copy
import logging
import math
import time

import torch

from .modeling.call_context import call_settings
from .modeling.compaction import CompactionRecord, LayerAttention, compact_layer, group_queries, sees_whole_span
from .modeling.attention_matching_press import AttentionMatchingPress
from .modeling.presses import make_press

logger = logging.getLogger(__name__)

QUERY_SOURCES = ("context", "repeat", "self-study", "random")
HEAD_BUDGETS = ("uniform", "proportional", "global")
# `whole_span_share="auto"`: the share Attention Matching uses with global budgets (best measured for needles
# at 5-10x, and lower mean KL than none at 5-20x over eight documents; reports/compaction-smollm2-h200/whole-span/)
WHOLE_SPAN_SHARE = 0.45
# whole spans may take at most this share of the slots the ranking gave the other heads
WHOLE_SPAN_TAKE = 0.5
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


def _dense_attention(model):
    # for this thread's passes only: other threads keep the model's own attention
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
    with _dense_attention(model), recording_queries(model, keep_from) as captured:
        model(input_ids, past_key_values=cache, use_cache=cache is not None, logits_to_keep=1)
    if cache is None:
        return {layer: (torch.cat(parts, dim=-2), None) for layer, parts in captured.items()}
    scaling = model.model.layers[0].self_attn.scaling
    result = {}
    for layer, parts in captured.items():
        queries = torch.cat(parts, dim=-2)
        keys = cache.layers[layer].keys[..., outside_from:, :]
        window = getattr(model.model.layers[layer].self_attn, "attention_window", None)
        result[layer] = (queries, _causal_lse(queries, keys, keep_from - outside_from, scaling, window, reach))
    return result


def _causal_lse(queries, keys, offset, scaling, window=None, reach=None, chunk: int = 512) -> torch.Tensor:
    """[B, H, n]: log-sum-exp of query j's logits over `keys` [B, KV, T, d] up to index `offset + j` (causal;
    the queries sit at those indices of the keys' sequence) and, with a sliding `window`, the last `window`
    of them; with `reach`, of the queries' own part (indices >= `offset`) only the last `reach` count. In
    fp32 and in chunks of queries."""
    keys = keys.float().repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)
    device = keys.device
    parts = []
    for lo in range(0, queries.shape[-2], chunk):
        q = queries[..., lo : lo + chunk, :].to(device, torch.float32)
        hi = lo + q.shape[-2]
        # only the keys some query of the chunk may see: all before its own part, then up to its last
        start = 0 if reach is None else offset + max(0, lo - reach + 1)
        index = torch.cat([torch.arange(0, min(offset, start), device=device), torch.arange(start, offset + hi, device=device)])
        logits = q @ keys[..., index, :].transpose(-1, -2) * scaling
        at = offset + torch.arange(lo, hi, device=device)[:, None]
        seen = (index[None, :] <= at) & (index[None, :] > at - window if window else True)
        if reach is not None:
            seen &= (index[None, :] > at - reach) | (index[None, :] < offset)
        parts.append(torch.logsumexp(logits.masked_fill_(~seen, float("-inf")), dim=-1).cpu())
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, cache=None, attention_mask: torch.Tensor | None = None):
    """Read a context into a `SparseMemCache` and record, in the same pass, the context queries that
    `compact` fits on: `cache, queries = prefill(model, ids); compact(model, cache, 10, reference_queries=queries)`.

    Attention is dense (SDPA) for this pass: nothing is compacted yet, so it is exact, and compaction
    needs no second pass over the context. Positions continue when `cache` already holds tokens.
    Returns (cache, {layer: (queries [B, H, n, d], positions [n])})."""
    from .modeling.cache import SparseMemCache

    if getattr(model.config, "block_size", None) is None:
        raise ValueError("prefill() needs a sparsemem model: use sparsemem.convert(model) first")
    if input_ids.dim() != 2 or input_ids.shape[-1] == 0:
        raise ValueError(f"prefill() needs `input_ids` of shape [batch, tokens] with at least one token, got {tuple(input_ids.shape)}")
    cache = SparseMemCache(model.config) if cache is None else cache
    if not getattr(cache, "is_sparsemem", False):
        raise ValueError(f"prefill() fills a SparseMemCache, got {type(cache).__name__}")
    start = cache.get_seq_length()
    if attention_mask is not None and not bool(attention_mask.all()):
        cache.padded_batch = True  # see compact()
    with _dense_attention(model), recording_queries(model) as captured:
        model(input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
    positions = torch.arange(start, start + input_ids.shape[1])
    return cache, {layer: (torch.cat(parts, dim=-2), positions) for layer, parts in captured.items()}


@torch.no_grad()
def capture_reference_queries(model, input_ids, sources=("context",), tokenizer=None, self_study_tokens=128):
    """{layer: (queries [B, H, n, d], positions [n], outside [B, H, n])}; positions are -1 for queries
    standing for the future; `outside`: each query's log-sum-exp of attention logits over what it reads
    beyond the context (-inf for the context's own queries), `compact` accepts the first two alone."""
    sources = [s for s in sources if s != "random"]  # random queries need no model pass
    unknown = [s for s in sources if s not in QUERY_SOURCES]
    if unknown:
        raise ValueError(f"unknown query source(s) {unknown}; choose from {QUERY_SOURCES}")
    length = input_ids.shape[1]
    device = input_ids.device
    per_layer: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = {}

    def add(captured, positions):
        for layer, (queries, outside) in captured.items():
            per_layer.setdefault(layer, []).append((queries, positions, outside))

    if "context" in sources:
        add(_capture(model, input_ids, 0), torch.arange(length))
    if "repeat" in sources or "self-study" in sources:
        if tokenizer is None:
            raise ValueError("query sources 'repeat' and 'self-study' need the `tokenizer`")
    if "repeat" in sources:
        prompt = tokenizer(REPEAT_PROMPT, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
        ids = torch.cat([input_ids, prompt.expand(input_ids.shape[0], -1), input_ids], dim=1)
        captured = _capture(model, ids, ids.shape[1] - length, length, REPEAT_REACH)
        add(captured, torch.full((length,), -1))
    if "self-study" in sources:
        prompt = tokenizer(SELF_STUDY_PROMPT, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
        ids = torch.cat([input_ids, prompt.expand(input_ids.shape[0], -1)], dim=1)
        with _dense_attention(model):
            written = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=self_study_tokens, do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        captured = _capture(model, written, ids.shape[1], length)
        add(captured, torch.full((written.shape[1] - ids.shape[1],), -1))
    result = {}
    for layer, parts in per_layer.items():
        result[layer] = (torch.cat([q for q, _, _ in parts], dim=-2), torch.cat([p for _, p, _ in parts]),
                         torch.cat([_outside_of(q, o) for q, _, o in parts], dim=-1))
    return result


def _outside_of(queries, outside=None) -> torch.Tensor:
    """`outside` log-sum-exps [B, H, n], or -inf for queries that read nothing beyond the context."""
    if outside is None:
        return torch.full(queries.shape[:-1], float("-inf"))
    if tuple(outside.shape) != tuple(queries.shape[:-1]):
        raise ValueError(f"reference queries {tuple(queries.shape)} need `outside` log-sum-exps of shape "
                         f"{tuple(queries.shape[:-1])}, got {tuple(outside.shape)}")
    return outside.cpu()


def _random_queries(layer, heads, count, generator):
    batch, _, _, dim = layer.keys.shape
    scale = layer.keys.float().std(dim=(0, 2)).mean(0)  # per-dimension scale of the keys
    queries = torch.randn(batch, heads, count, dim, generator=generator) * scale.cpu()
    return queries, torch.full((count,), -1)


def _subsample(queries, positions, cap, generator):
    n = queries.shape[-2]
    if n <= cap:
        return queries, positions
    index = torch.randperm(n, generator=generator)[:cap].sort().values
    return queries[..., index, :], positions[index]


def _entries_per_head(cache) -> float:
    """Physical entries (exact tokens and slots) per KV head, summed over the layers."""
    total = 0.0
    for layer in cache.layers:
        if layer.is_initialized:
            total += layer.physical_length + (len(layer.slots) / layer.keys.shape[1] if layer.slots is not None else 0)
    return total


def query_sources_for(method, queries=None, default=("context",)) -> tuple[str, ...]:
    """The reference-query sources `method` (a name or a `Press`) is compacted with: `queries` when given,
    else the press's own (`Press.query_sources`), else `default`. `compact` and the evaluations resolve
    them here, so a method ranks with the same queries in the library and in the benchmarks."""
    if queries is None:
        own = make_press(method).query_sources
        queries = own if own is not None else default
    if isinstance(queries, str) or not all(isinstance(source, str) for source in queries):
        raise ValueError(f"`queries` must be a sequence of source names from {QUERY_SOURCES}, got {queries!r}")
    unknown = [source for source in queries if source not in QUERY_SOURCES]
    if unknown or not queries:
        raise ValueError(f"unknown or no query source(s) {unknown or list(queries)}; choose from {QUERY_SOURCES}")
    return tuple(queries)


def _method_name(method) -> str:
    return method if isinstance(method, str) else type(method).__name__


def plan_budget(logical_length: int, ratio: float, sink_tokens: int, local_tokens: int, keep_first=None, keep_last=None):
    """Split the physical budget ceil(T / ratio) into kept first tokens, kept last tokens and slots per head."""
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio)) or ratio < 1:
        raise ValueError(f"`ratio` must be a finite number >= 1, got {ratio!r}")
    budget = max(1, math.ceil(logical_length / ratio))
    first = min(sink_tokens, budget // 8) if keep_first is None else keep_first
    last = min(local_tokens, budget // 4) if keep_last is None else keep_last
    if first < 0 or last < 0:
        raise ValueError("`keep_first` and `keep_last` must be >= 0")
    slots = budget - first - last
    if slots < 1 and first + last < logical_length:
        raise ValueError(
            f"ratio {ratio} leaves {budget} entries, fewer than keep_first + keep_last = {first + last}; "
            "lower them or the ratio"
        )
    return first, last, max(slots, 0)


def allocate_head_budgets(total: int, weights: torch.Tensor, minimum: int = 1) -> list[int]:
    """Split `total` slots over heads in proportion to `weights` (largest remainders), each >= `minimum`."""
    heads = weights.numel()
    if total < minimum * heads:
        raise ValueError(f"{total} slots cannot give {heads} heads at least {minimum} each")
    share = weights.clamp(min=0).double()
    share = share / share.sum() if share.sum() > 0 else torch.full_like(share, 1 / heads)
    extra = total - minimum * heads
    raw = share * extra
    budgets = raw.floor().long()
    remainder = extra - int(budgets.sum())
    budgets[(raw - budgets).argsort(descending=True)[:remainder]] += 1
    return [int(b) + minimum for b in budgets]


@torch.no_grad()
def compact(
    model,
    cache,
    ratio: float,
    method="am",
    input_ids: torch.Tensor | None = None,
    queries=None,
    tokenizer=None,
    keep_first: int | None = None,
    keep_last: int | None = None,
    head_budgets: str | None = None,
    max_queries: int = 2048,
    split_queries: int = 512,
    recent_shares: tuple = (0.25,),
    chunk_size: int | None = None,
    seed: int = 0,
    reference_queries=None,
    on_policy: bool = False,
    whole_span_share: float | str | None = "auto",
):
    """Compact `cache` (a `SparseMemCache` filled by `model`) in place to about 1/`ratio` of its logical
    length, and return it. What the call did (settings, queries, slots per layer and head, seconds) is kept
    as `cache.compaction`, a `CompactionRecord`.

    Everything but the first `keep_first` and the last `keep_last` positions becomes slots (defaults
    derive from the model's sink/local options and the budget). `method`: "am" (Attention Matching),
    "am-omp", "am-no-beta", "am-no-refit", "streaming-llm", "h2o", "snapkv", "kvzip", "random", or a
    `Press`. `queries`: the sources of the reference queries the press fits or scores with ("repeat" is
    the best measured for "am"; it needs the `tokenizer`); default: the press's own (`Press.query_sources`:
    the repeat pass for "kvzip", the context's queries for "h2o" and "snapkv"), else ("context",); see
    `query_sources_for`. `head_budgets`:
    "uniform", "proportional" (slots per KV head in proportion to how much attention that head's reference
    queries give the span) or "global" (all layers' and heads' span entries ranked together by the largest
    attention a reference query gives them, as a share of all that query reads (`outside` of
    `capture_reference_queries`), KVzip-style; each head gets as many slots as it has entries
    among the best, so layers differ in size while the total keeps the ratio). Default: "global", or
    "uniform" with `chunk_size`. `chunk_size`: compact long spans in chunks
    of that many tokens, each to its share of the slots. `max_queries`: reference queries per layer the
    fit uses (subsampled). `recent_shares`: the share of the budget kept as exact recent tokens; given
    several, trial fits choose one per layer by the attention error of the context's own last queries
    (`split_queries` of them). The default, one quarter, measured better than choosing among a quarter,
    a half and three quarters that way: the late context queries that judge the split favour recent
    tokens more than the queries that later read the cache do, and with global budgets the newest
    entries a head keeps exact already give it recency where it needs it.
    `reference_queries`: queries already captured, e.g. by `prefill` (then no pass over the context is made).
    `on_policy`: fit each layer to the repeat queries of a pass that reads the layers below it already
    compacted (one extra pass over the context, made layer by layer as the fits go), so a layer's slots
    serve the queries it will really get rather than those of the full cache; needs `input_ids`, the
    `tokenizer` and "repeat" among `queries` (whose future-style queries it replaces). Slot budgets and
    recent splits are still planned with the captured queries.
    `whole_span_share` (with global budgets): a head whose ranked share reaches this fraction of its span
    (a retrieval head, which attends sharply to single entries everywhere) keeps its whole span exact; the
    other heads share what is left by the same ranking, so the total is unchanged. Heads are made whole in
    order of their share while they take at most half of the slots the ranking gave the others. "auto"
    (the default): `WHOLE_SPAN_SHARE` (0.45) for Attention Matching presses with global budgets, none for
    the eviction baselines and other budgets; None: none. With it, an Attention Matching press whose
    `exact_newest` is "auto" fits every slot over the whole span. On eight H200 documents at 10x the
    default keeps 24 of 24 needles (as the full cache; 8 without whole spans)
    (`reports/compaction-smollm2-h200/true-share/`, `reports/compaction-smollm2-h200/whole-span/`).
    """
    if not getattr(cache, "is_sparsemem", False):
        raise ValueError("compact() needs a SparseMemCache (run the context through a sparsemem model first)")
    if getattr(model.config, "block_size", None) is None:
        raise ValueError("compact() needs a sparsemem model: use sparsemem.convert(model) first")
    if getattr(cache, "padded_batch", False):
        raise ValueError("compact() keeps the same positions of every row, so a padded row would keep padding as "
                         "its sinks: the cache was filled with a padding mask; prefill and compact each sequence alone")
    if head_budgets is None:  # the best measured; chunks are compacted one at a time, so they share uniformly
        head_budgets = "global" if chunk_size is None else "uniform"
    if head_budgets not in HEAD_BUDGETS:
        raise ValueError(f"`head_budgets` must be one of {HEAD_BUDGETS}, got {head_budgets!r}")
    if head_budgets == "global" and chunk_size is not None:
        raise ValueError("`head_budgets='global'` ranks the whole span at once: leave `chunk_size` unset")
    if not recent_shares or not all(0 <= share < 1 for share in recent_shares):
        raise ValueError(f"`recent_shares` must be fractions in [0, 1), got {recent_shares!r}")
    for name, value in (("max_queries", max_queries), ("split_queries", split_queries)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    if whole_span_share != "auto" and whole_span_share is not None:
        if isinstance(whole_span_share, bool) or not isinstance(whole_span_share, (int, float)) or not 0 < whole_span_share <= 1:
            raise ValueError(f"`whole_span_share` must be a fraction in (0, 1], 'auto' or None, got {whole_span_share!r}")
        if head_budgets != "global":
            raise ValueError("`whole_span_share` works on global head budgets: leave `head_budgets` and `chunk_size` unset")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}")
    press = make_press(method)
    sources = query_sources_for(press, queries)
    if on_policy:
        if "repeat" not in sources or not set(sources) <= {"repeat", "context"}:
            raise ValueError(f"`on_policy=True` refits the 'repeat' queries: `queries` must hold 'repeat' and may add "
                             f"'context', got {list(sources)}")
        if input_ids is None or tokenizer is None:
            raise ValueError("`on_policy=True` makes a repeat pass over the context: give `input_ids` and `tokenizer`")
    if queries is None and reference_queries is None and tokenizer is None and {"repeat", "self-study"} & set(sources):
        raise ValueError(f"method {_method_name(method)!r} ranks with the queries of {list(sources)} "
                         "(`Press.query_sources`), which need the `tokenizer`: give it, or name other `queries`")
    if whole_span_share == "auto":
        whole_span_share = WHOLE_SPAN_SHARE if head_budgets == "global" and isinstance(press, AttentionMatchingPress) else None
    if isinstance(press, AttentionMatchingPress):
        press = press.for_head_budgets(head_budgets)
        if whole_span_share is not None:
            press = press.with_whole_spans()
    start_time = time.perf_counter()
    length = cache.get_seq_length()
    if length == 0 or not any(layer.is_initialized for layer in cache.layers):
        raise ValueError("compact() was given an empty cache: run the document through the model (e.g. "
                         "`cache, queries = sparsemem.prefill(model, ids)`) first")
    first, last, slots_per_head = plan_budget(length, ratio, cache.sink_tokens, cache.local_tokens, keep_first, keep_last)
    budget = first + last + slots_per_head
    held = _entries_per_head(cache)
    if held <= budget * len(cache.layers):
        # already compacted to this ratio or further (e.g. the same call twice): nothing is left to fit
        logger.info("compact(ratio=%s): the cache holds %.0f entries per KV head and layer, within the budget of %d; "
                    "nothing to compact", ratio, held / len(cache.layers), budget)
        return cache
    if keep_last is None and slots_per_head > 0:
        rest = budget - first
        # candidate numbers of exact recent tokens (`recent_shares` of the budget). No slots at all
        # (StreamingLLM) is not a candidate: the late context queries that judge the split barely look
        # back, and a layer left without slots loses every mid-document token (a pass key) for good
        splits = sorted({max(0, min(rest - 1, int(rest * share))) for share in recent_shares})
    else:
        splits = [last]
    chosen: list[int] = []
    if reference_queries is None:
        needs_model = [s for s in sources if s != "random"]
        if needs_model and input_ids is None:
            raise ValueError(f"query sources {needs_model} need the context's `input_ids`")
        # with several candidate splits the context's own last queries judge them, whatever the sources
        judges = ("context",) if len(splits) > 1 else ()
        capture = tuple(dict.fromkeys((*judges, *needs_model))) if input_ids is not None else ()
        reference_queries = capture_reference_queries(model, input_ids, capture, tokenizer) if capture else {}
    generator = torch.Generator().manual_seed(seed)
    scaling = model.model.layers[0].self_attn.scaling
    heads = model.config.num_attention_heads
    config = model.config
    kv_head_slots = None
    deferred = []  # (layer index, queries, positions, recent tokens, head scores for global budgets), fitted once all are known
    for layer_idx, layer in enumerate(cache.layers):
        if not layer.is_initialized:
            continue
        device = layer.keys.device
        parts = []
        if layer_idx in reference_queries:
            parts.append(reference_queries[layer_idx])
        if "random" in sources:
            parts.append(_random_queries(layer, heads, max_queries // max(1, heads // layer.keys.shape[1]), generator))
        if not parts:
            raise ValueError(f"no reference queries for layer {layer_idx}")
        layer_queries = torch.cat([part[0] for part in parts], dim=-2)
        layer_positions = torch.cat([part[1] for part in parts])
        outside = torch.cat([_outside_of(part[0], part[2] if len(part) > 2 else None) for part in parts], dim=-1)
        held_out = _held_out(layer_queries, layer_positions, length, generator).to(device) if len(splits) > 1 else None
        if "context" not in sources:
            # context queries (positions >= 0) given only to judge the split take no part in the fit
            fit = layer_positions < 0
            if not bool(fit.any()):
                raise ValueError(f"no reference queries of the sources {list(sources)} for layer {layer_idx} (the given "
                                 "`reference_queries` hold only the context's own? then name `queries=('context',)`)")
            layer_queries, layer_positions, outside = layer_queries[..., fit, :], layer_positions[fit], outside[..., fit]
        groups = heads // layer.keys.shape[1]
        recent = splits[0]
        if len(splits) > 1:
            # the split between exact recent tokens and slots that best keeps this layer's attention output,
            # ranked by trial fits on a subsample of the queries
            trial_queries, trial_positions = _subsample(layer_queries, layer_positions, max(1, split_queries // groups), generator)
            trial_queries, trial_positions = trial_queries.to(device), trial_positions.to(device)
            trial_attention = LayerAttention.measure(layer, trial_queries, scaling) if chunk_size is None else None
            recent = _choose_split(layer, trial_queries, trial_positions, held_out, splits, first, budget, length, press,
                                   scaling, config, chunk_size, trial_attention)
        chosen.append(recent)
        # every query that reads the compacted cache comes after the span: the reference queries that do too
        # (future ones, and context ones past its end) are the ones to fit and rank with
        after = sees_whole_span(layer_positions, length - recent - 1)
        if bool(after.any()):
            layer_queries, layer_positions, outside = layer_queries[..., after, :], layer_positions[after], outside[..., after]
        all_queries = layer_queries
        layer_queries, layer_positions = _subsample(layer_queries, layer_positions, max(1, max_queries // groups), generator)
        layer_queries, layer_positions = layer_queries.to(device), layer_positions.to(device)
        scores = None
        if head_budgets == "global":
            span = (layer.positions >= first) & (layer.positions < length - recent)
            # ranked by all of them, not the fit's subsample: a maximum needs every query
            scores = _max_attention(layer, all_queries.to(device), span, scaling, outside.to(device))
        deferred.append((layer_idx, layer_queries, layer_positions, recent, scores))
    if head_budgets == "global" and deferred:
        # every (layer, KV head) competes for the slots by the largest attention a reference query gives
        # each of its span entries: heads that single entries out keep more of them
        flat = [score for *_, scores in deferred for score in scores]
        total = sum((budget - first - recent) * len(scores) for *_, recent, scores in deferred)
        counts = iter(allocate_by_scores(flat, total, whole_span_share=whole_span_share))
        kv_head_slots = [[next(counts) for _ in scores] for *_, scores in deferred]
    # layer index -> (queries, positions, recent tokens, per-head slots or None)
    plans = {index: (q, p, recent, None if kv_head_slots is None else kv_head_slots[number])
             for number, (index, q, p, recent, _) in enumerate(deferred)}

    def fit_layer(layer_idx, fit_queries, fit_positions):
        layer = cache.layers[layer_idx]
        _, _, recent, own = plans[layer_idx]
        # the queries' attention over the layer as it is now (several chunks change it between fits)
        attention = LayerAttention.measure(layer, fit_queries, scaling) if chunk_size is None else None
        _compact_one_layer(layer, fit_queries, fit_positions, first, recent, budget - first - recent, length,
                           press, scaling, head_budgets, chunk_size, attention, budgets=own)

    if on_policy:
        _fit_on_policy(model, cache, input_ids, tokenizer, plans, fit_layer, max_queries, generator)
    else:
        for layer_idx, (layer_queries, layer_positions, _, _) in plans.items():
            fit_layer(layer_idx, layer_queries, layer_positions)
    record = CompactionRecord(
        method=_method_name(method),
        ratio=ratio,
        queries=list(sources),
        keep_first=first,
        keep_last=chosen,
        slots_per_head=[budget - first - c for c in chosen],
        head_budgets=head_budgets,
        seconds=time.perf_counter() - start_time,
        slots_per_kv_head=kv_head_slots,
        whole_span_share=whole_span_share,
        **(_press_options(press) if isinstance(press, AttentionMatchingPress) else {}),
    )
    cache.record_compaction(record)
    logger.info("compacted %d tokens with %s in %.2f s", length, record.method, record.seconds)
    return cache


def _press_options(press: AttentionMatchingPress) -> dict:
    """The Attention Matching options a `CompactionRecord` keeps."""
    return {"exact_newest": press.exact_share, "query_weights": press.query_weights, "min_beta": press.min_beta,
            "max_beta": press.max_beta, "ridge": press.ridge}


def _fit_on_policy(model, cache, input_ids, tokenizer, plans, fit_layer, max_queries, generator) -> None:
    """Teacher-force "repeat the previous text" over `cache` itself: as each layer's attention gets the
    pass's queries (post-RoPE), the layer is fitted to them, before it reads its own cache, so the queries
    of the layers above come from a model whose lower layers are already compacted. The pass's own
    entries are cropped afterwards."""
    length = cache.get_seq_length()
    device = input_ids.device
    prompt = tokenizer(REPEAT_PROMPT, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    ids = torch.cat([prompt.expand(input_ids.shape[0], -1), input_ids], dim=1)
    fitted = set()

    def record(layer_idx, query_states):
        if layer_idx not in plans or layer_idx in fitted:
            return
        fitted.add(layer_idx)
        queries, positions, _, _ = plans[layer_idx]
        layer = cache.layers[layer_idx]
        groups = query_states.shape[1] // layer.keys.shape[1]
        fresh = query_states[..., prompt.shape[1]:, :].detach().float().cpu()  # as captured queries are kept
        fresh, fresh_positions = _subsample(fresh, torch.full((fresh.shape[-2],), -1), max(1, max_queries // groups), generator)
        context = positions >= 0  # context queries (if asked for) stay as captured: they are the document's own
        device = layer.keys.device
        fit_layer(layer_idx, torch.cat([queries[..., context, :].to(device), fresh.to(device)], dim=-2),
            torch.cat([positions[context].to(device), fresh_positions.to(device)]))

    positions = torch.arange(length, length + ids.shape[1], device=device)[None].expand(ids.shape[0], -1)
    mask = torch.ones(ids.shape[0], length + ids.shape[1], dtype=torch.long, device=device)
    try:
        with query_hook(model, record):
            model(ids, past_key_values=cache, position_ids=positions, attention_mask=mask, use_cache=True)
    finally:
        cache.crop(length)
    missing = sorted(set(plans) - fitted)
    if missing:
        raise RuntimeError(f"the on-policy pass did not reach layers {missing}")


def _choose_split(
    layer, queries, positions, held_out, splits, first, budget, length, press, scaling, config, chunk_size, attention=None
) -> int:
    """The number of exact recent tokens, among `splits`, whose trial compaction best keeps the layer's
    attention output for the `held_out` queries (`attention`: the queries' `LayerAttention`, if measured)."""
    reference = _layer_output(layer, held_out, scaling, config, length)
    best = None
    for last in splits:
        trial = copy.deepcopy(layer)
        _compact_one_layer(trial, queries, positions, first, last, budget - first - last, length, press.for_ranking(),
                           scaling, "uniform", chunk_size, attention)
        error = (_layer_output(trial, held_out, scaling, config, length) - reference).pow(2).sum(-1).mean().item()
        if best is None or error < best[0]:
            best = (error, last)
    return best[1]


def _max_attention(layer, queries, span, scaling, outside, chunk: int = 512) -> list[torch.Tensor]:
    """Per KV head, [T]: the largest attention weight any of `queries` [B, H, n, d] gives each `span` entry
    (over the batch too), in chunks of queries so no [n, N] matrix is kept. The weights are shares of all
    a query reads: `outside` [B, H, n] (log-sum-exp of its logits beyond the cache) takes its part, so a
    head that mostly reads the tokens after the context (a previous-token head in the repeat pass) is not
    ranked as if it read the context as sharply."""
    kv_heads = layer.keys.shape[1]
    best = None
    for start in range(0, queries.shape[-2], chunk):
        attention = LayerAttention.measure(layer, queries[..., start : start + chunk, :], scaling)
        beyond = outside[..., start : start + chunk, None]  # pooled per KV head as the queries are
        top = []
        for head, (phi, lse) in enumerate(zip(attention.phi, attention.lse)):
            # the cache's share of the query's attention: sigmoid(lse_cache - lse_beyond)
            share = torch.sigmoid(lse - group_queries(beyond, head, kv_heads)[..., 0])
            top.append((phi[..., span] * share[..., None]).amax(dim=(0, 1)))
        best = top if best is None else [torch.maximum(a, b) for a, b in zip(best, top)]
    return [score.cpu() for score in best]


def allocate_by_scores(scores: list[torch.Tensor], total: int, minimum: int = 1, whole_span_share: float | None = None) -> list[int]:
    """Split `total` slots over heads by ranking all their entries together: head i gets `minimum` plus
    the number of its entries among the best `total - minimum * heads` of all (never more than it has).

    With `whole_span_share`, a head that wins at least that share of its entries gets all of them: the
    head attends sharply wherever it looks (a retrieval head copying facts back), so any entry it loses
    may be the one a later question needs. The other heads share what is left by the same global
    ranking, so the entries given up are the lowest-ranked of all, not an equal cut of every head.
    Heads are made whole in order of their share while the slots they take stay within
    `WHOLE_SPAN_TAKE` of what the ranking gave the others (at a high ratio a low share would otherwise
    starve every other head); the heads left over keep their ranked count and are logged."""
    if total < minimum * len(scores):
        raise ValueError(f"{total} slots cannot give {len(scores)} heads at least {minimum} each")
    rest = [score.float().sort(descending=True).values[minimum:] for score in scores]
    pool = torch.cat(rest)
    owner = torch.cat([torch.full((r.numel(),), i) for i, r in enumerate(rest)])
    best = pool.topk(min(total - minimum * len(scores), pool.numel())).indices
    sizes = [int(s.numel()) for s in scores]
    counts = [min(int(c), size) for c, size in zip(torch.bincount(owner[best], minlength=len(scores)) + minimum, sizes)]
    if whole_span_share is None:
        return counts
    candidates = [i for i, (count, size) in enumerate(zip(counts, sizes)) if size > 0 and count >= whole_span_share * size]
    candidates.sort(key=lambda i: counts[i] / sizes[i], reverse=True)
    whole = [False] * len(scores)
    taken, given, other_heads = 0, sum(counts), len(scores)  # slots whole heads take; what the others were given
    for rank, i in enumerate(candidates):
        taken_with, given_without = taken + sizes[i] - counts[i], given - counts[i]
        if taken_with > WHOLE_SPAN_TAKE * given_without or given_without - taken_with < minimum * (other_heads - 1):
            logger.info("whole_span_share=%s: %d of %d heads reach it; %d with lower shares keep their "
                        "ranked slots (whole spans would take more than %.0f%% of the other heads' slots)",
                        whole_span_share, len(candidates), len(scores), len(candidates) - rank, 100 * WHOLE_SPAN_TAKE)
            break
        whole[i] = True
        taken, given, other_heads = taken_with, given_without, other_heads - 1
    if not any(whole):
        return counts
    others = [score for score, w in zip(scores, whole) if not w]
    left = total - sum(size for size, w in zip(sizes, whole) if w)
    shared = iter(allocate_by_scores(others, left, minimum) if others else [])
    return [size if w else next(shared) for size, w in zip(sizes, whole)]


def _compact_one_layer(
    layer, queries, reference_positions, first, last, slots_per_head, length, press, scaling, head_budgets, chunk_size,
    attention=None, budgets=None,
):
    span = (layer.positions >= first) & (layer.positions < length - last)
    if not bool(span.any()) and layer.slots is None:
        return
    if slots_per_head == 0:  # the whole budget holds exact tokens: plain eviction
        layer.evict(span)
        layer.set_slots(None)
        return
    kv_heads = layer.keys.shape[1]
    total_slots = slots_per_head * kv_heads
    # chunks are ranges of logical positions: the layer's physical entries shrink as each one is compacted
    positions = layer.positions[span]
    step = chunk_size if chunk_size is not None else max(positions.numel(), 1)
    bounds = [(int(positions[lo]), int(positions[min(lo + step, positions.numel()) - 1])) for lo in range(0, positions.numel(), step)]
    span_total = max(positions.numel(), 1)
    for number, (lo, hi) in enumerate(bounds or [(0, -1)]):
        chunk = (layer.positions >= lo) & (layer.positions <= hi)
        share = max(kv_heads, round(total_slots * int(chunk.sum()) / span_total))
        if budgets is not None:  # given per head (one chunk)
            chunk_budgets = budgets
        elif head_budgets == "uniform":
            chunk_budgets = [share // kv_heads + (1 if h < share % kv_heads else 0) for h in range(kv_heads)]
        else:
            chunk_budgets = allocate_head_budgets(share, _span_attention_share(layer, queries, chunk, scaling, attention if number == 0 else None))
        # later chunks leave the slots made from earlier chunks alone
        compact_layer(layer, queries, reference_positions, chunk, chunk_budgets, press, scaling, fold_slots=number == 0,
                      attention=attention if number == 0 else None)


def _held_out(queries, positions, length, generator, count: int = 256):
    """Queries that stand for what follows the context: its last queries, or, without context queries,
    the future-style ones (-1). Repeat/self-study queries look back over the whole document; mixed in,
    they would outnumber the late queries and favour slots over the recent tokens the continuation reads."""
    late = positions >= length - 64
    if not bool(late.any()):
        late = positions < 0
    pool = queries[..., late, :]
    if pool.shape[-2] > count:
        pool = pool[..., torch.randperm(pool.shape[-2], generator=generator)[:count], :]
    return pool


def _layer_output(layer, queries, scaling, config, length):
    """Attention output [B, n, H, d] of `queries` placed after the whole context, over every tier of `layer`."""
    from types import SimpleNamespace

    from .modeling.attention import MemoryView, sparsemem_attention_forward

    options = SimpleNamespace(**{**config.sparsemem_options(), "top_k_blocks": None, "block_fraction": None})
    view = MemoryView(torch.full((queries.shape[-2],), length, device=queries.device), layer.positions, layer.slots, None)
    out, _ = sparsemem_attention_forward(SimpleNamespace(config=options), queries, layer.keys, layer.values, None, scaling, sparsemem=view)
    return out.float()


def _span_attention_share(layer, queries, span, scaling, attention=None) -> torch.Tensor:
    """[Hkv]: mean share of attention the head's reference queries give the span (non-causal)."""
    attention = attention if attention is not None else LayerAttention.measure(layer, queries, scaling)
    return torch.stack([phi[..., span].sum(-1).mean() for phi in attention.phi])
