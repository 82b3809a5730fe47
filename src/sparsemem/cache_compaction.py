"""`compact`: Attention-Matching compaction (and baselines) of a `SparseMemCache`.

`compact` plans the budget (exact first and last tokens, slots), gathers the reference queries of its
sources (`query_sources.py`), lets the head-budget policy share the slots over layers and KV heads
(`head_budgets.py`) and runs the press on every layer; what it did is kept as `cache.compaction`.
"""

import copy
import logging
import math
import time

import torch

from .head_budgets import GlobalBudgets, UniformBudgets, budget_policy
from .modeling.compaction import CompactionRecord, LayerAttention, compact_layer, sees_whole_span
from .modeling.attention_matching_press import AttentionMatchingPress
from .modeling.presses import make_press
from .query_sources import (
    RandomQueries, RepeatQueries, capture_reference_queries, dense_attention, outside_of, query_hook, query_sources_for,
    recording_queries,
)

logger = logging.getLogger(__name__)


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
    with dense_attention(model), recording_queries(model) as captured:
        model(input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
    positions = torch.arange(start, start + input_ids.shape[1])
    return cache, {layer: (torch.cat(parts, dim=-2), positions) for layer, parts in captured.items()}


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
    budgets=None,
    max_queries: int = 2048,
    split_queries: int = 512,
    recent_shares: tuple = (0.25,),
    seed: int = 0,
    reference_queries=None,
    on_policy: bool = False,
):
    """Compact `cache` (a `SparseMemCache` filled by `model`) in place to about 1/`ratio` of its logical
    length, and return it. What the call did (settings, queries, head budgets, slots per layer and head,
    seconds) is kept as `cache.compaction`, a `CompactionRecord`, which travels with the cache (a saved
    document keeps it).

    ratio: the logical length over the physical budget, ceil(length / ratio) entries per layer and KV head.
    method: "am" (Attention Matching), "am-omp", "am-no-beta", "am-no-refit", "streaming-llm", "h2o",
        "snapkv", "kvzip", "random", ... (`modeling/presses.py`), or a `Press`.
    input_ids: the context's ids, for the passes that capture reference queries (not needed with
        `reference_queries` that hold every source, or with random queries alone).
    queries: the sources of the reference queries the press fits or ranks with: names ("context",
        "repeat", "self-study", "random") or source objects (`RepeatQueries(reach=64)`, see
        `query_sources.py`). Default: the press's own (`Press.query_sources`: the repeat pass for "kvzip",
        the context's queries for "h2o" and "snapkv"), else ("context",); `query_sources_for` resolves them
        (as the evaluations do). "repeat" is the best measured for "am"; it and "self-study" need the
        `tokenizer`.
    tokenizer: writes the prompts of the repeat and self-study passes.
    keep_first / keep_last: exact first and last tokens of every layer; the rest of the context becomes
        slots. Default: from the model's sink/local options and the budget (`plan_budget`), the last ones
        as `recent_shares` says.
    budgets: how the slots are shared over layers and KV heads: a policy object (`UniformBudgets(chunk_size=512)`,
        `ProportionalBudgets()`, `GlobalBudgets(whole_span_share=None)`, see `head_budgets.py`) or its name
        ("uniform", "proportional", "global"). Default (None): `GlobalBudgets()`, all layers' and heads' span
        entries ranked together, with the retrieval heads of Attention Matching presses kept whole
        (`whole_span_share="auto"`): on eight H200 documents at 10x it keeps 24 of 24 needles (as the
        full cache; 8 without whole spans) (`reports/compaction-smollm2-h200/true-share/`,
        `reports/compaction-smollm2-h200/whole-span/`).
    max_queries: reference queries per layer the fit uses (subsampled).
    split_queries: with several `recent_shares`, the queries per layer of the trial fits that choose one.
    recent_shares: the share of the budget kept as exact recent tokens; given several, trial fits choose
        one per layer by the attention error of the context's own last queries. The default, one quarter,
        measured better than choosing among a quarter, a half and three quarters that way: the late context
        queries that judge the split favour recent tokens more than the queries that later read the cache
        do, and with global budgets the newest entries a head keeps exact already give it recency where it
        needs it.
    seed: of the subsampling and the random queries.
    reference_queries: queries already captured, e.g. by `prefill` or `capture_reference_queries` (then no
        pass over the context is made).
    on_policy: fit each layer to the repeat queries of a pass that reads the layers below it already
        compacted (one extra pass over the context, made layer by layer as the fits go), so a layer's slots
        serve the queries it will really get rather than those of the full cache; needs `input_ids`, the
        `tokenizer` and "repeat" among `queries` (whose future-style queries it replaces). Slot budgets and
        recent splits are still planned with the captured queries.
    """
    if not getattr(cache, "is_sparsemem", False):
        raise ValueError("compact() needs a SparseMemCache (run the context through a sparsemem model first)")
    if getattr(model.config, "block_size", None) is None:
        raise ValueError("compact() needs a sparsemem model: use sparsemem.convert(model) first")
    if getattr(cache, "padded_batch", False):
        raise ValueError("compact() keeps the same positions of every row, so a padded row would keep padding as "
                         "its sinks: the cache was filled with a padding mask; prefill and compact each sequence alone")
    if not recent_shares or not all(0 <= share < 1 for share in recent_shares):
        raise ValueError(f"`recent_shares` must be fractions in [0, 1), got {recent_shares!r}")
    for name, value in (("max_queries", max_queries), ("split_queries", split_queries)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    press = make_press(method)
    policy = budget_policy(budgets).for_press(press)
    sources = query_sources_for(press, queries)
    names = [source.name for source in sources]
    if on_policy:
        if "repeat" not in names or not set(names) <= {"repeat", "context"}:
            raise ValueError(f"`on_policy=True` refits the 'repeat' queries: `queries` must hold 'repeat' and may add "
                             f"'context', got {[source.label for source in sources]}")
        if input_ids is None or tokenizer is None:
            raise ValueError("`on_policy=True` makes a repeat pass over the context: give `input_ids` and `tokenizer`")
    if queries is None and reference_queries is None and tokenizer is None and any(s.needs_tokenizer for s in sources):
        raise ValueError(f"method {_method_name(method)!r} ranks with the queries of {[s.label for s in sources]} "
                         "(`Press.query_sources`), which need the `tokenizer`: give it, or name other `queries`")
    if isinstance(press, AttentionMatchingPress):
        press = press.for_head_budgets(policy.name)
        if getattr(policy, "whole_span_share", None) is not None:
            press = press.with_whole_spans()
    ranked = isinstance(policy, GlobalBudgets)
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
        needs_model = [source for source in sources if source.reads_model]
        if needs_model and input_ids is None:
            raise ValueError(f"query sources {[source.label for source in needs_model]} need the context's `input_ids`")
        # with several candidate splits the context's own last queries judge them, whatever the sources
        judges = ("context",) if len(splits) > 1 else ()
        capture = (*judges, *needs_model) if input_ids is not None else ()
        reference_queries = capture_reference_queries(model, input_ids, capture, tokenizer) if capture else {}
    random = next((source for source in sources if isinstance(source, RandomQueries)), None)
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
        if random is not None:
            parts.append(random.sample(layer, heads, max_queries // max(1, heads // layer.keys.shape[1]), generator))
        if not parts:
            raise ValueError(f"no reference queries for layer {layer_idx}")
        layer_queries = torch.cat([part[0] for part in parts], dim=-2)
        layer_positions = torch.cat([part[1] for part in parts])
        outside = torch.cat([outside_of(part[0], part[2] if len(part) > 2 else None) for part in parts], dim=-1)
        held_out = _held_out(layer_queries, layer_positions, length, generator).to(device) if len(splits) > 1 else None
        if "context" not in names:
            # context queries (positions >= 0) given only to judge the split take no part in the fit
            fit = layer_positions < 0
            if not bool(fit.any()):
                raise ValueError(f"no reference queries of the sources {[s.label for s in sources]} for layer {layer_idx} (the "
                                 "given `reference_queries` hold only the context's own? then name `queries=('context',)`)")
            layer_queries, layer_positions, outside = layer_queries[..., fit, :], layer_positions[fit], outside[..., fit]
        groups = heads // layer.keys.shape[1]
        recent = splits[0]
        if len(splits) > 1:
            # the split between exact recent tokens and slots that best keeps this layer's attention output,
            # ranked by trial fits on a subsample of the queries
            trial_queries, trial_positions = _subsample(layer_queries, layer_positions, max(1, split_queries // groups), generator)
            trial_queries, trial_positions = trial_queries.to(device), trial_positions.to(device)
            trial_attention = LayerAttention.measure(layer, trial_queries, scaling) if policy.chunk_size is None else None
            recent = _choose_split(layer, trial_queries, trial_positions, held_out, splits, first, budget, length, press,
                                   scaling, config, policy.chunk_size, trial_attention)
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
        if ranked:
            span = (layer.positions >= first) & (layer.positions < length - recent)
            # ranked by all of them, not the fit's subsample: a maximum needs every query
            scores = policy.scores(layer, all_queries.to(device), span, scaling, outside.to(device))
        deferred.append((layer_idx, layer_queries, layer_positions, recent, scores))
    if ranked and deferred:
        # every (layer, KV head) competes for the slots of all layers
        kv_head_slots = policy.allocate([scores for *_, scores in deferred], [budget - first - recent for *_, recent, _ in deferred])
    # layer index -> (queries, positions, recent tokens, per-head slots or None)
    plans = {index: (q, p, recent, None if kv_head_slots is None else kv_head_slots[number])
             for number, (index, q, p, recent, _) in enumerate(deferred)}

    def fit_layer(layer_idx, fit_queries, fit_positions):
        layer = cache.layers[layer_idx]
        _, _, recent, own = plans[layer_idx]
        # the queries' attention over the layer as it is now (several chunks change it between fits)
        attention = LayerAttention.measure(layer, fit_queries, scaling) if policy.chunk_size is None else None
        _compact_one_layer(layer, fit_queries, fit_positions, first, recent, budget - first - recent, length,
                           press, scaling, policy, attention, budgets=own)

    if on_policy:
        repeat = next(source for source in sources if isinstance(source, RepeatQueries))
        _fit_on_policy(model, cache, input_ids, tokenizer, repeat.prompt, plans, fit_layer, max_queries, generator)
    else:
        for layer_idx, (layer_queries, layer_positions, _, _) in plans.items():
            fit_layer(layer_idx, layer_queries, layer_positions)
    record = CompactionRecord(
        method=_method_name(method),
        ratio=ratio,
        queries=[source.label for source in sources],
        keep_first=first,
        keep_last=chosen,
        slots_per_head=[budget - first - c for c in chosen],
        seconds=time.perf_counter() - start_time,
        slots_per_kv_head=kv_head_slots,
        **policy.record_fields(),
        **(_press_options(press) if isinstance(press, AttentionMatchingPress) else {}),
    )
    cache.record_compaction(record)
    logger.info("compacted %d tokens with %s in %.2f s", length, record.method, record.seconds)
    return cache


def _press_options(press: AttentionMatchingPress) -> dict:
    """The Attention Matching options a `CompactionRecord` keeps."""
    return {"exact_newest": press.exact_share, "query_weights": press.query_weights, "min_beta": press.min_beta,
            "max_beta": press.max_beta, "ridge": press.ridge}


def _fit_on_policy(model, cache, input_ids, tokenizer, prompt_text, plans, fit_layer, max_queries, generator) -> None:
    """Teacher-force the repeat prompt (`prompt_text`) and the context over `cache` itself: as each layer's
    attention gets the pass's queries (post-RoPE), the layer is fitted to them, before it reads its own
    cache, so the queries of the layers above come from a model whose lower layers are already compacted. The pass's own
    entries are cropped afterwards."""
    length = cache.get_seq_length()
    device = input_ids.device
    prompt = tokenizer(prompt_text, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
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
    """The number of exact recent tokens, among `splits`, whose trial compaction (uniform head budgets, in
    chunks of `chunk_size`) best keeps the layer's attention output for the `held_out` queries
    (`attention`: the queries' `LayerAttention`, if measured)."""
    reference = _layer_output(layer, held_out, scaling, config, length)
    trial_budgets = UniformBudgets(chunk_size=chunk_size)
    best = None
    for last in splits:
        trial = copy.deepcopy(layer)
        _compact_one_layer(trial, queries, positions, first, last, budget - first - last, length, press.for_ranking(),
                           scaling, trial_budgets, attention)
        error = (_layer_output(trial, held_out, scaling, config, length) - reference).pow(2).sum(-1).mean().item()
        if best is None or error < best[0]:
            best = (error, last)
    return best[1]


def _compact_one_layer(
    layer, queries, reference_positions, first, last, slots_per_head, length, press, scaling, policy, attention=None,
    budgets=None,
):
    """Compact the span between the first `first` and the last `last` positions of `layer` to `slots_per_head`
    slots per KV head on average, shared by `policy` chunk by chunk, or as `budgets` (per head) give them."""
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
    step = policy.chunk_size if policy.chunk_size is not None else max(positions.numel(), 1)
    bounds = [(int(positions[lo]), int(positions[min(lo + step, positions.numel()) - 1])) for lo in range(0, positions.numel(), step)]
    span_total = max(positions.numel(), 1)
    for number, (lo, hi) in enumerate(bounds or [(0, -1)]):
        chunk = (layer.positions >= lo) & (layer.positions <= hi)
        measured = attention if number == 0 else None
        if budgets is not None:  # given per head (one chunk)
            chunk_budgets = budgets
        else:
            share = max(kv_heads, round(total_slots * int(chunk.sum()) / span_total))
            chunk_budgets = policy.split(share, layer, queries, chunk, scaling, measured)
        # later chunks leave the slots made from earlier chunks alone
        compact_layer(layer, queries, reference_positions, chunk, chunk_budgets, press, scaling, fold_slots=number == 0,
                      attention=measured)


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
