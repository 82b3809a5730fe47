"""Attention Matching as a press: chosen keys, a logit bias beta fitted by NNLS and values by least squares,
so a few slots reproduce the attention the span's reference queries give it (the solver, which knows
nothing about the model, is `attention_matching.py`)."""

import copy
import math
from dataclasses import dataclass

import torch

from .attention_matching import NNLS_METHODS, QUERY_WEIGHTS, VALUE_PRIORS, SpanProblem, attention_matching
from .baseline_presses import StreamingLLMPress
from .compaction import HeadSpan, Press

# `exact_newest="auto"` without whole spans: the share of each head's budget kept as its newest entries
EXACT_NEWEST = 0.75
# `ridge` / `min_beta` / `max_beta` "auto": the value fit's ridge and the bounds of the fitted beta, and what
# `for_head_budgets` chooses with uniform or proportional budgets (reports/am-reference-cpu/)
RIDGE = 1e-3
MIN_BETA = None
MAX_BETA = None
HEAD_BUDGET_RIDGE = 1e-5
HEAD_BUDGET_MIN_BETA = -1.0
HEAD_BUDGET_MAX_BETA = 3.0


@dataclass
class AttentionMatchingPress(Press):
    """Attention Matching; `fit_bias=False` / `refit_values=False` are its ablations. `key_selection`:
    "attention" (highest RMS attention), "peak" (highest attention weight from any one query), "omp", or "recent" (the span's newest entries, as StreamingLLM
    keeps them, with beta and values fitted so they also stand for the older ones). `exact_newest`: the
    share of each head's budget kept as its newest span entries, exact; the fitted slots then stand for
    the older part alone (queries that read the cache later look at the newest entries most). "auto":
    `EXACT_NEWEST`, or none once `compact` keeps the retrieval heads whole (`with_whole_spans`) or gives
    every head its own budget (`for_head_budgets`): the heads then measured better with every slot fitted
    over the whole span. `query_weights`: see `attention_matching`; "auto": "share", or what
    `for_head_budgets` chooses. `ridge` (the value fit's, relative to its Gram matrix's mean diagonal) and
    `min_beta` (the lowest beta a fitted slot may get; None: beta's NNLS may switch slots off) and `max_beta`
    (the highest; None: no cap): "auto" is `RIDGE` / `MIN_BETA` / `MAX_BETA`, or what `for_head_budgets`
    chooses (see `attention_matching`)."""

    key_selection: str = "attention"
    fit_bias: bool = True
    refit_values: bool = True
    ridge: float | str = "auto"  # the value fit's ridge (see `attention_matching.fit_values`), or "auto"
    omp_picks_per_step: int | None = None
    nnls_iterations: int = 400  # projected gradient's steps where it runs (accelerators; see `nnls`)
    exact_newest: float | str = "auto"  # share of each head's budget kept as its newest span entries, exact
    # hold every `guard_every`-th reference query out of the fit and keep, per problem (head), the fitted
    # slots only where they reproduce those queries' attention better than the span's newest entries kept as
    # they are (StreamingLLM's choice for the same budget); None: always the fitted slots
    guard_every: int | None = None
    query_weights: str = "auto"  # "share", "peak" or "auto" (see `attention_matching`, `for_head_budgets`)
    nnls_method: str = "auto"  # the beta fit's NNLS solver (see `attention_matching.nnls`)
    # the value fit's ridge shrinks toward "zero" or toward the chosen entries' own values ("kept")
    value_prior: str = "zero"
    # scale fitted values down to the longest value of the span's tokens (see `bound_value_norms`)
    bound_values: bool = False
    # lower bound of each fitted slot's beta, or "auto" (None: NNLS's w >= 0, which leaves some slots dead)
    min_beta: float | str | None = "auto"
    # upper bound of each fitted slot's beta (a clip), or "auto" (None: no cap)
    max_beta: float | str | None = "auto"

    def __post_init__(self):
        share = self.exact_newest
        if share != "auto" and (isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1):
            raise ValueError(f"`exact_newest` must be a share in [0, 1] or 'auto', got {share!r}")
        guard = self.guard_every
        if guard is not None and (isinstance(guard, bool) or not isinstance(guard, int) or guard < 2):
            raise ValueError(f"`guard_every` must be an integer >= 2 or None, got {guard!r}")
        self.last_kept_fit = None  # share of the problems that kept their fitted slots at the last guarded compaction
        if self.nnls_method not in NNLS_METHODS:
            raise ValueError(f"`nnls_method` must be one of {NNLS_METHODS}, got {self.nnls_method!r}")
        if self.value_prior not in VALUE_PRIORS:
            raise ValueError(f"`value_prior` must be one of {VALUE_PRIORS}, got {self.value_prior!r}")
        if self.query_weights not in ("auto", *QUERY_WEIGHTS):
            raise ValueError(f"`query_weights` must be 'auto' or one of {QUERY_WEIGHTS}, got {self.query_weights!r}")
        ridge = self.ridge
        if ridge != "auto" and (isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge)
                                or ridge < 0):
            raise ValueError(f"`ridge` must be a finite number >= 0 or 'auto', got {ridge!r}")
        floor = self.min_beta
        if floor not in ("auto", None) and (isinstance(floor, bool) or not isinstance(floor, (int, float))
                                            or not math.isfinite(floor)):
            raise ValueError(f"`min_beta` must be a finite number, None or 'auto', got {floor!r}")
        cap = self.max_beta
        if cap not in ("auto", None) and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap)):
            raise ValueError(f"`max_beta` must be a finite number, None or 'auto', got {cap!r}")
        if isinstance(floor, (int, float)) and isinstance(cap, (int, float)) and floor > cap:
            raise ValueError(f"`min_beta` ({floor}) must not exceed `max_beta` ({cap})")

    def for_head_budgets(self, head_budgets: str) -> "AttentionMatchingPress":
        """This press for `compact` with these head budgets: with "uniform" or "proportional" ones, "auto"
        fits every slot over the whole span (`exact_newest=0`) with the reference's query weights ("peak"),
        keeps every fitted slot alive (beta >= `HEAD_BUDGET_MIN_BETA`: exact NNLS switched off up to three
        quarters of a head's slots, budget that then served nothing), caps them at beta <= `HEAD_BUDGET_MAX_BETA`
        (as the published implementation bounds them) and fits values with a lighter ridge
        (`HEAD_BUDGET_RIDGE`); measured against the published implementation on the same document and
        queries, each lowers the next-token KL at 10x and 50x (reports/am-reference-cpu/). Global budgets
        keep "share" weights and the general defaults."""
        press = copy.copy(self)  # shallow: a subclass's own state (learned weights) stays shared
        if head_budgets == "global":
            press.query_weights = "share" if self.query_weights == "auto" else self.query_weights
            press.ridge = RIDGE if self.ridge == "auto" else self.ridge
            press.min_beta = MIN_BETA if self.min_beta == "auto" else self.min_beta
            press.max_beta = MAX_BETA if self.max_beta == "auto" else self.max_beta
            return press
        if self.exact_newest == "auto":
            press.exact_newest = 0.0
        if self.query_weights == "auto":
            press.query_weights = "peak"
        if self.ridge == "auto":
            press.ridge = HEAD_BUDGET_RIDGE
        if self.min_beta == "auto":
            press.min_beta = HEAD_BUDGET_MIN_BETA
        if self.max_beta == "auto":
            press.max_beta = HEAD_BUDGET_MAX_BETA
        return press

    @property
    def exact_share(self) -> float:
        return EXACT_NEWEST if self.exact_newest == "auto" else self.exact_newest

    def with_whole_spans(self) -> "AttentionMatchingPress":
        """This press for a compaction that keeps the retrieval heads whole: "auto" keeps no newest entries
        exact (lower next-token KL at 2-50x on SmolLM2 with whole spans, higher without)."""
        if self.exact_newest != "auto":
            return self
        press = copy.copy(self)  # shallow: a subclass's own state (learned weights) stays shared
        press.exact_newest = 0.0
        return press

    def exact_count(self, budget: int, total: int) -> int:
        """How many of a head's `budget` slots are its newest span entries kept exact (0: all are fitted)."""
        keep = int(budget * self.exact_share)
        return keep if 0 < keep < budget < total else 0

    def compact(self, span: HeadSpan, budget: int):
        return self.compact_after_span(span.after_span(), budget)

    def compact_after_span(self, span: HeadSpan, budget: int):
        """`compact` of a span already restricted to the reference queries after it (`HeadSpan.after_span`)."""
        total, queries = span.problem.keys.shape[1], span.problem.queries.shape[1]
        if self.guard_every is None or budget >= total or queries < 2 * self.guard_every:
            return self.fit_split(span, budget)
        held_out = torch.arange(queries, device=span.problem.queries.device) % self.guard_every == 0
        fitted = self.fit_split(span.with_queries(~held_out), budget)
        newest = StreamingLLMPress().compact(span, budget)
        check = span.with_queries(held_out)
        keep = check.slot_error(*fitted) <= check.slot_error(*newest)  # [B]
        self.last_kept_fit = float(keep.float().mean())
        return tuple(torch.where(keep.view(-1, *[1] * (a.dim() - 1)), a, b.to(a.dtype)) for a, b in zip(fitted, newest))

    def fit_split(self, span: HeadSpan, budget: int):
        """The newest `exact_count` span entries as they are and Attention Matching's slots for the rest."""
        total = span.problem.keys.shape[1]
        keep = self.exact_count(budget, total)
        if keep:
            # the newest `keep` entries stay as they are; AM fits the rest of the budget to the older part
            # exactly `keep` entries: slots folded in from an earlier compaction share one position, and a
            # threshold on positions would keep every tie and overrun the budget (online compaction)
            newest = torch.zeros(total, dtype=torch.bool, device=span.positions.device)
            newest[span.positions.sort(stable=True).indices[total - keep :]] = True
            p = span.problem
            older = HeadSpan(
                SpanProblem(p.queries, p.keys[:, ~newest], p.values[:, ~newest], p.key_bias[:, ~newest], p.context_lse,
                            p.scaling, phi=None if p.phi is None else p.phi[..., ~newest]),
                span.positions[~newest], span.query_positions, None if span.rope is None else span.rope[:, ~newest],
                None if span.placement is None else span.placement.before(keep),
            )
            index, keys, values, beta = self._fit(older, budget - keep)
            index = (~newest).nonzero()[:, 0][index]  # into the span, as the contract says, not into its older part
            pick = lambda t: t[:, newest]  # noqa: E731
            return (torch.cat([index, newest.nonzero()[:, 0].expand(index.shape[0], -1)], 1), torch.cat([keys, pick(p.keys)], 1),
                    torch.cat([values, pick(p.values)], 1), torch.cat([beta, pick(p.key_bias)], 1))
        return self._fit(span, budget)

    def _fit(self, span: HeadSpan, budget: int):
        key_selection = self.key_selection
        if key_selection == "recent":  # StreamingLLM's keys (the span's newest), refitted
            order = span.positions.float()[None].expand(span.problem.keys.shape[0], -1)
            key_selection = order.topk(min(budget, order.shape[-1]), dim=-1).indices.sort(dim=-1).values
        place = None
        if span.placement is not None and span.rope is not None:
            # fit beta and values to the keys where they will sit, not where they were chosen
            place = lambda index, keys: span.placement.place(keys, span.rope.gather(1, index))  # noqa: E731
        return attention_matching(
            span.problem,
            budget,
            place=place,
            key_selection=key_selection,
            fit_bias=self.fit_bias,
            refit_values=self.refit_values,
            ridge=RIDGE if self.ridge == "auto" else self.ridge,
            omp_picks_per_step=self.omp_picks_per_step,
            nnls_iterations=self.nnls_iterations,
            nnls_method=self.nnls_method,
            query_weights="share" if self.query_weights == "auto" else self.query_weights,
            value_prior=self.value_prior,
            bound_values=self.bound_values,
            min_beta=MIN_BETA if self.min_beta == "auto" else self.min_beta,
            max_beta=MAX_BETA if self.max_beta == "auto" else self.max_beta,
        )

    def for_ranking(self) -> "AttentionMatchingPress":
        """A cheaper fit, good enough to compare candidate splits of a budget."""
        trial = copy.copy(self)  # shallow: a subclass's own state stays shared
        trial.nnls_iterations = min(self.nnls_iterations, 100)
        return trial
