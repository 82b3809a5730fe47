"""Head budgets: how `compact` splits a cache's slots over its layers and KV heads.

A policy is a small object the caller passes as `compact(..., budgets=...)` (or names: "uniform",
"proportional", "global"; `budget_policy` is the one resolver of both):
- `UniformBudgets`: every KV head of a layer gets the same number of slots;
- `ProportionalBudgets`: a layer's slots go to its KV heads in proportion to the attention each head's
  reference queries give the span;
- `GlobalBudgets` (the default): the span entries of all layers and heads are ranked together by the
  largest attention any reference query gives them, and each head gets as many slots as it has entries
  among the best (KVzip-style), so layers differ in size while the total keeps the ratio; retrieval heads
  may keep their whole span (`whole_span_share`).

Every layer keeps the same number of slots per KV head on average (the budget `compact` plans from the
ratio); the policy decides only how they are shared. Each policy checks its own options when it is made.
"""

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .modeling.attention_matching_press import AttentionMatchingPress
from .modeling.compaction import LayerAttention, group_queries

logger = logging.getLogger(__name__)

# `GlobalBudgets(whole_span_share="auto")`: the share Attention Matching uses (best measured for needles at
# 5-10x, and lower mean KL than none at 5-20x over eight documents; reports/compaction-smollm2-h200/whole-span/)
WHOLE_SPAN_SHARE = 0.45
# whole spans may take at most this share of the slots the ranking gave the other heads
WHOLE_SPAN_TAKE = 0.5


class HeadBudgets:
    """What every policy declares: its registry `name`, `chunk_size` (compact the span in chunks of that
    many tokens, or None: all at once), `for_press` and `record_fields`."""

    name: ClassVar[str]
    chunk_size: int | None = None

    def for_press(self, press) -> "HeadBudgets":
        """The policy with its "auto" settings resolved for `press` (itself where it has none)."""
        return self

    def record_fields(self) -> dict:
        """The `CompactionRecord` fields that say what ran: the policy's name and its settings."""
        return {"head_budgets": self.name, **{field.name: getattr(self, field.name) for field in dataclasses.fields(self)}}


@dataclass(frozen=True)
class UniformBudgets(HeadBudgets):
    """Every KV head of a layer gets the same number of slots (the first heads one more where they do not
    divide evenly).

    chunk_size: compact the span in chunks of this many tokens, one after the other, each to its share of
        the layer's slots (slots made from earlier chunks are left alone); None: the whole span at once.
    """

    name: ClassVar[str] = "uniform"
    chunk_size: int | None = None

    def __post_init__(self):
        size = self.chunk_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"{type(self).__name__} `chunk_size` must be an integer >= 1 or None, got {size!r}")

    def split(self, total: int, layer, queries, span, scaling, attention=None) -> list[int]:
        """`total` slots over the layer's KV heads."""
        heads = layer.keys.shape[1]
        return [total // heads + (1 if head < total % heads else 0) for head in range(heads)]


@dataclass(frozen=True)
class ProportionalBudgets(UniformBudgets):
    """A layer's slots go to its KV heads in proportion to the mean share of attention each head's reference
    queries give the span (largest remainders; every head keeps at least one slot).

    chunk_size: as `UniformBudgets`; each chunk is split by the attention its own entries get.
    """

    name: ClassVar[str] = "proportional"

    def split(self, total: int, layer, queries, span, scaling, attention=None) -> list[int]:
        return allocate_head_budgets(total, span_attention_share(layer, queries, span, scaling, attention))


@dataclass(frozen=True)
class GlobalBudgets(HeadBudgets):
    """The span entries of every layer and KV head are ranked together by the largest attention any reference
    query gives them, as a share of all that query reads (its `outside` log-sum-exp, see
    `capture_reference_queries`); each head gets as many slots as it has entries among the best, so heads
    that single entries out keep more of them. The whole span is ranked at once (no chunks).

    whole_span_share: a head whose ranked share reaches this fraction of its span (a retrieval head, which
        attends sharply to single entries everywhere) keeps its whole span exact; the other heads share what
        is left by the same ranking, so the total is unchanged. "auto": `WHOLE_SPAN_SHARE` (0.45) for
        Attention Matching presses, None for the eviction baselines (measured as published); None: no head
        keeps its whole span. With whole spans, an Attention Matching press whose `exact_newest` is "auto"
        fits every slot over the whole span.
    whole_span_take: heads are made whole in order of their share while the slots they take stay within
        this share of what the ranking gave the other heads (at a high ratio a low `whole_span_share`
        would otherwise starve every other head); the heads left over keep their ranked count.
    """

    name: ClassVar[str] = "global"
    whole_span_share: float | str | None = "auto"
    whole_span_take: float = WHOLE_SPAN_TAKE

    def __post_init__(self):
        share = self.whole_span_share
        if share not in ("auto", None) and (isinstance(share, bool) or not isinstance(share, (int, float))
                                            or not 0 < share <= 1):
            raise ValueError(f"GlobalBudgets `whole_span_share` must be a fraction in (0, 1], 'auto' or None, got {share!r}")
        take = self.whole_span_take
        if isinstance(take, bool) or not isinstance(take, (int, float)) or not math.isfinite(take) or take <= 0:
            raise ValueError(f"GlobalBudgets `whole_span_take` must be a finite number > 0, got {take!r}")

    def for_press(self, press) -> "GlobalBudgets":
        if self.whole_span_share != "auto":
            return self
        share = WHOLE_SPAN_SHARE if isinstance(press, AttentionMatchingPress) else None
        return dataclasses.replace(self, whole_span_share=share)

    def scores(self, layer, queries, span, scaling, outside) -> list[torch.Tensor]:
        """Per KV head, the ranking score [T] of each `span` entry of `layer` (see `max_attention`)."""
        return max_attention(layer, queries, span, scaling, outside)

    def allocate(self, scores: list[list[torch.Tensor]], slots_per_head: list[int]) -> list[list[int]]:
        """Slots per KV head of every layer, from each layer's per-head `scores` (`scores`) and its mean
        slots per head: the layers' totals are pooled and ranked together."""
        if self.whole_span_share == "auto":
            raise ValueError("GlobalBudgets(whole_span_share='auto') is resolved by `for_press` before it allocates")
        flat = [score for layer in scores for score in layer]
        total = sum(slots * len(layer) for slots, layer in zip(slots_per_head, scores))
        counts = iter(allocate_by_scores(flat, total, whole_span_share=self.whole_span_share,
                                         whole_span_take=self.whole_span_take))
        return [[next(counts) for _ in layer] for layer in scores]


# the registry of policy names
HEAD_BUDGETS = {policy.name: policy for policy in (UniformBudgets, ProportionalBudgets, GlobalBudgets)}


def budget_policy(budgets=None, **options) -> HeadBudgets:
    """The head-budget policy `budgets` names or is: a policy object (returned as it is), a name from
    `HEAD_BUDGETS` made with `options` (e.g. `budget_policy("uniform", chunk_size=512)`), or None: the
    default, `GlobalBudgets(**options)`. An option the named policy does not have is an error."""
    if isinstance(budgets, HeadBudgets):
        if options:
            raise ValueError(f"options {sorted(options)} were given with the policy object {budgets!r}: set them on it")
        return budgets
    name = "global" if budgets is None else budgets
    if not isinstance(name, str) or name not in HEAD_BUDGETS:
        raise ValueError(f"`budgets` must be one of {list(HEAD_BUDGETS)}, a policy object (e.g. UniformBudgets()) "
                         f"or None, got {budgets!r}")
    policy = HEAD_BUDGETS[name]
    own = {field.name for field in dataclasses.fields(policy)}
    for option in options:
        if option not in own:
            owners = [other for other, kind in HEAD_BUDGETS.items() if option in {f.name for f in dataclasses.fields(kind)}]
            where = f"it is an option of {owners} budgets" if owners else "no policy has it"
            raise ValueError(f"`{option}` is not an option of {name!r} head budgets ({policy.__name__}: "
                             f"{sorted(own) or 'none'}); {where}")
    return policy(**options)


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


def allocate_by_scores(scores: list[torch.Tensor], total: int, minimum: int = 1, whole_span_share: float | None = None,
                       whole_span_take: float = WHOLE_SPAN_TAKE) -> list[int]:
    """Split `total` slots over heads by ranking all their entries together: head i gets `minimum` plus
    the number of its entries among the best `total - minimum * heads` of all (never more than it has).

    With `whole_span_share`, a head that wins at least that share of its entries gets all of them: the
    head attends sharply wherever it looks (a retrieval head copying facts back), so any entry it loses
    may be the one a later question needs. The other heads share what is left by the same global
    ranking, so the entries given up are the lowest-ranked of all, not an equal cut of every head.
    Heads are made whole in order of their share while the slots they take stay within
    `whole_span_take` of what the ranking gave the others; the heads left over keep their ranked count
    and are logged."""
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
        if taken_with > whole_span_take * given_without or given_without - taken_with < minimum * (other_heads - 1):
            logger.info("whole_span_share=%s: %d of %d heads reach it; %d with lower shares keep their "
                        "ranked slots (whole spans would take more than %.0f%% of the other heads' slots)",
                        whole_span_share, len(candidates), len(scores), len(candidates) - rank, 100 * whole_span_take)
            break
        whole[i] = True
        taken, given, other_heads = taken_with, given_without, other_heads - 1
    if not any(whole):
        return counts
    others = [score for score, w in zip(scores, whole) if not w]
    left = total - sum(size for size, w in zip(sizes, whole) if w)
    shared = iter(allocate_by_scores(others, left, minimum) if others else [])
    return [size if w else next(shared) for size, w in zip(sizes, whole)]


def span_attention_share(layer, queries, span, scaling, attention=None) -> torch.Tensor:
    """[Hkv]: mean share of attention the head's reference queries give the span (non-causal)."""
    attention = attention if attention is not None else LayerAttention.measure(layer, queries, scaling)
    return torch.stack([phi[..., span].sum(-1).mean() for phi in attention.phi])


def max_attention(layer, queries, span, scaling, outside, chunk: int = 512) -> list[torch.Tensor]:
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
