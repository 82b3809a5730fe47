"""Online compaction: a physical memory budget for generation.

When a layer's physical memory (full-resolution entries plus its largest per-head slot count) reaches
`max_kv_tokens` after a forward pass, everything but the first `keep_first` and the newest tokens is
compacted into slots, existing slots (with their beta) included, and generation goes on. Compaction
shrinks the layer to `target` x the budget so it does not run at every decode step, and decode steps
never push the layer past the budget.

The reference queries are the layer's own most recent queries, kept in a small ring per layer: the
tokens being generated are exactly the queries whose attention the slots must preserve.
"""

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import torch

from .compaction import LayerCompaction, SlotPlacement, compact_layers
from .attention_matching_press import AttentionMatchingPress
from .presses import make_press

logger = logging.getLogger(__name__)

GUARD_EVERY = 4  # online compaction's held-out share of reference queries for Attention Matching (1 in 4)


@dataclass
class OnlineCompaction:
    """max_kv_tokens: physical entries per layer and KV head that a forward pass leaves at most.
    keep_first: first tokens kept exact (attention sinks). recent_fraction: share of the compacted
    budget kept as exact recent tokens (the rest are slots). target: the layer shrinks to this share
    of the budget. method: a compaction press name ("am", "streaming-llm", ...). num_queries: recent
    queries remembered per layer as reference queries. place_slots: under cache positions, fit the slots
    where the cache's layout will put them (right before the recent entries) rather than where their keys
    were chosen; logical positions never move a slot. guard_every: for Attention Matching presses, every
    n-th reference query is held out of the fit and each head keeps its fitted slots only where they serve
    those queries better than its newest span entries kept as they are (`AttentionMatchingPress.guard_every`;
    online compaction also fits values toward the chosen entries' own and bounds their length, see
    `value_prior`, `bound_values`, and solves beta's NNLS with `nnls_method="fast"`; a refined press such as
    "am-learned" refines values and beta only, `train_keys=False`);
    "auto": 4 for Attention Matching presses, none for the others (which fit nothing); None: no guard.
    press_options: fields of the method's press changed after the online settings above (e.g.
    {"exact_newest": 0.9} for "am"); a field the press does not have is an error."""

    max_kv_tokens: int
    keep_first: int = 16
    recent_fraction: float = 0.5
    target: float = 0.75
    method: str = "am"
    num_queries: int = 256
    place_slots: bool = True
    guard_every: int | None | str = "auto"
    press_options: dict | None = None

    def __post_init__(self):
        if isinstance(self.max_kv_tokens, bool) or not isinstance(self.max_kv_tokens, int) or self.max_kv_tokens < 8:
            raise ValueError(f"`max_kv_tokens` must be an integer >= 8, got {self.max_kv_tokens!r}")
        if not 0 < self.target < 1:
            raise ValueError(f"online compaction `target` must lie in (0, 1), got {self.target!r}")
        if not 0 <= self.recent_fraction < 1:
            raise ValueError(f"online compaction `recent_fraction` must lie in [0, 1), got {self.recent_fraction!r}")
        if self.num_queries < 1:
            raise ValueError(f"online compaction `num_queries` must be >= 1, got {self.num_queries!r}")
        self.press = make_press(self.method)
        fits = isinstance(self.press, AttentionMatchingPress)
        if self.guard_every == "auto":
            self.guard_every = GUARD_EVERY if fits else None
        elif self.guard_every is not None and not fits:
            raise ValueError(f"online compaction `guard_every` guards fitted slots; method={self.method!r} fits none")
        if fits:
            # slots are folded into every later compaction: their values shrink toward the entries they were
            # chosen from and stay within the span's value lengths, so refits cannot drift over thousands of
            # compactions (a 1M-token stream on SmolLM2 diverged after ~230 without)
            # it repeats every few steps: the NNLS without its exact finish on accelerators ("fast")
            self.press = dataclasses.replace(self.press, guard_every=self.guard_every, value_prior="kept", bound_values=True,
                                             nnls_method="fast")
            if any(field.name == "train_keys" for field in dataclasses.fields(self.press)):
                # a refined press moves values and beta only: refined keys, refitted at every compaction, drifted
                # (SmolLM2 stream: loss 2.8 at 90K tokens and a non-finite value fit; keys kept: 1.580 at 262K
                # tokens, no memory 1.666)
                self.press = dataclasses.replace(self.press, train_keys=False)
        if self.press_options:
            known = {field.name for field in dataclasses.fields(self.press)} if dataclasses.is_dataclass(self.press) else set()
            unknown = sorted(set(self.press_options) - known)
            if unknown:
                raise ValueError(f"online compaction `press_options`: method={self.method!r} has no option(s) {unknown}; "
                                 f"it has {sorted(known)}")
            self.press = dataclasses.replace(self.press, **self.press_options)
        self.compactions = 0  # layer compactions done so far
        self.seconds = 0.0  # wall seconds spent in them (the compaction reads results back, so it ends synchronised)
        compacted = math.floor(self.target * self.max_kv_tokens)
        # the sinks may take at most an eighth of the compacted budget
        self.keep_first = min(self.keep_first, compacted // 8)
        self.keep_last = max(1, math.floor(self.recent_fraction * (compacted - self.keep_first)))
        self.slots_per_head = compacted - self.keep_first - self.keep_last
        if self.slots_per_head < 1:
            raise ValueError(f"`max_kv_tokens`={self.max_kv_tokens} leaves no room for slots; raise it")

    def observe(self, layer, query_states: torch.Tensor, query_positions: torch.Tensor) -> None:
        """Remember the newest `num_queries` queries [B, H, q, d] of the layer (fp32, detached)."""
        queries = query_states.detach()[..., -self.num_queries :, :].float()
        query_positions = query_positions[-self.num_queries :]
        if layer.recent_queries is not None and layer.recent_queries.shape[0] == queries.shape[0]:
            queries = torch.cat([layer.recent_queries, queries], dim=-2)
            query_positions = torch.cat([layer.recent_query_positions, query_positions])
        # copies: a view would keep the whole forward pass's queries alive until the next one
        layer.recent_queries = queries[..., -self.num_queries :, :].clone()
        layer.recent_query_positions = query_positions[-self.num_queries :].clone()

    @staticmethod
    def physical_size(layer) -> int:
        """Entries one KV head holds: full-resolution tokens plus that head's slots (the largest head)."""
        slots = 0
        if layer.slots is not None and len(layer.slots):
            slots = int(torch.bincount(layer.slots.head).max())
        return layer.physical_length + slots

    def maybe_compact(self, layer, scaling: float, placement: SlotPlacement | None = None) -> bool:
        """Compact `layer` if it reached the budget (see `compact_full_layers` for a whole cache)."""
        return bool(self._compact([layer], scaling, lambda _: placement))

    def compact_full_layers(self, cache, module) -> int:
        """After a forward pass: compact every layer of `cache` that reached the budget, all in one batched
        solve (the layers of a stream reach it together). Under cache positions the slots are fitted where
        the cache's layout will put them, right before the recent entries. Returns the layers compacted."""
        layers = [layer for layer in cache.layers if layer.is_initialized]

        def placement(layer):
            if not self.place_slots or not getattr(cache, "cache_positions", False) or layer.rope_positions is None:
                return None
            # the first recent entry that stays exact: the slots go right before it
            first_kept = int(torch.searchsorted(layer.positions, layer.logical_length - self.keep_last))
            return SlotPlacement(cache._rotary_embedding(module), int(layer.rope_positions[first_kept]))

        return self._compact(layers, module.scaling, placement)

    def _compact(self, layers, scaling: float, placement) -> int:
        # compact when the next token would not fit
        full = [layer for layer in layers if self.physical_size(layer) >= self.max_kv_tokens]
        if not full:
            return 0
        start = time.perf_counter()
        jobs = []
        for layer in full:
            length = layer.logical_length
            span = (layer.positions >= self.keep_first) & (layer.positions < length - self.keep_last)
            budgets = [self.slots_per_head] * layer.keys.shape[1]
            jobs.append(LayerCompaction(layer, layer.recent_queries, layer.recent_query_positions, span, budgets,
                                        placement=placement(layer)))
        compact_layers(jobs, self.press, scaling, fold_slots=True)
        self.compactions += len(full)
        self.seconds += time.perf_counter() - start
        logger.debug("online compaction of %d layers at %d tokens: %d physical entries per head", len(full),
                     full[0].logical_length, self.physical_size(full[0]))
        return len(full)
