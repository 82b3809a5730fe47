"""KV compaction: replace a span of a cache layer by a few slots, one KV head at a time.

Every method is a small "press" with one contract, `Press.compact(span, budget)`, returning which span
entries to keep and the keys, values and beta of the slots. This module holds the contract (`HeadSpan`,
`Press`, `SlotPlacement`) and the per-layer step that cuts a layer into head spans, runs a press and puts
the slots back (`compact_layer`, `compact_layers`), and `CompactionRecord`, what a whole-cache compaction
did (kept by the cache as `SparseMemCache.compaction`). The presses live in their own modules:
`attention_matching_press.py` (Attention Matching: beta and values fitted in closed form),
`consolidation.py` (its slots refined by gradient steps), `baseline_presses.py` (eviction baselines that
keep original keys and values with their prior beta); `presses.py` is the registry of method names.
"""

from dataclasses import MISSING, asdict, dataclass, fields

import torch

from .attention_matching import SpanProblem
from .slots import SlotTier
from .rope import shift_keys

def sees_whole_span(query_positions: torch.Tensor, last_span_position) -> torch.Tensor:
    """Which reference queries attend to every entry of a span ending at `last_span_position`: those
    standing for the future (-1) and context queries at or past its end."""
    return (query_positions < 0) | (query_positions >= last_span_position)


@dataclass
class CompactionRecord:
    """What `sparsemem.compact` did to a cache: its settings as resolved and what it chose, per layer.

    A compacted cache keeps it as `SparseMemCache.compaction`; a saved document keeps it in its JSON
    metadata (`to_dict` / `from_dict`).

    method: the press's name (a press instance: its class name). ratio: the logical length over the
    physical budget asked for. queries: the reference-query sources the press fitted or ranked with (a
    source's name, with the settings it changed from their defaults).
    keep_first: exact first tokens of every layer. keep_last / slots_per_head: per compacted layer, the
    exact recent tokens and the slots per KV head of its budget (the mean with non-uniform head budgets).
    head_budgets: the head-budget policy's name ("uniform", "proportional" or "global"), and its settings:
    chunk_size (uniform and proportional: the tokens of each chunk, None: the whole span at once),
    whole_span_share (global: the share at which a head kept its whole span, None: none did) and
    whole_span_take (global: the most whole spans could take of the other heads' slots); a setting the
    policy does not have is None. slots_per_kv_head: with global budgets, the slots of every KV head per
    layer (None otherwise). exact_newest, query_weights, min_beta, max_beta, ridge: the Attention Matching
    press's options (None for other presses). seconds: wall time of the call.
    """

    method: str
    ratio: float
    queries: list
    keep_first: int
    keep_last: list
    slots_per_head: list
    head_budgets: str
    seconds: float
    slots_per_kv_head: list | None = None
    whole_span_share: float | None = None
    chunk_size: int | None = None
    whole_span_take: float | None = None
    exact_newest: float | str | None = None
    query_weights: str | None = None
    min_beta: float | None = None
    max_beta: float | None = None
    ridge: float | None = None

    def to_dict(self) -> dict:
        """Plain JSON values (lists, numbers, strings, None)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CompactionRecord":
        """The record `to_dict` wrote; fields it lacks (written before they existed) are None."""
        if not isinstance(data, dict):
            raise ValueError(f"a compaction record must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown compaction record field(s) {unknown}; expected {sorted(known)}")
        required = {f.name for f in fields(cls) if f.default is MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"compaction record lacks field(s) {missing}")
        return cls(**data)


@dataclass
class SlotPlacement:
    """Where the slots replacing a span will sit once the cache lays its entries out at their ranks (cache
    positions): `count` slots take the RoPE positions end - count ... end - 1, right before the entry that
    follows the span. A press that fits slots fits them there (the keys moved by `rotary`'s rotation), so
    queries that read the cache later see the geometry the fit saw."""

    rotary: object
    end: int

    def targets(self, count: int, device) -> torch.Tensor:
        return torch.arange(self.end - count, self.end, device=device)

    def before(self, count: int) -> "SlotPlacement":
        """The placement of slots that come before `count` others (e.g. the exact newest entries)."""
        return SlotPlacement(self.rotary, self.end - count)

    def place(self, keys: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """keys [P, t, d] rotated at `rope` [P, t] -> rotated at the targets."""
        return shift_keys(self.rotary, keys, self.targets(keys.shape[1], keys.device)[None] - rope.to(keys.device))


@dataclass
class HeadSpan:
    """The span of one KV head, for a batch of B sequences.

    problem: reference queries [B, n, d] (the head's query group pooled), span keys/values [B, T, d],
    prior beta [B, T] (0 for tokens, beta for existing slots), context log-sum-exp [B, n].
    positions: [T] logical positions of the span entries; query_positions: [n] logical positions of the
    reference queries (-1 for queries that stand for the future and see every key); rope: [B, T] the RoPE
    positions the span keys are rotated at (None: their logical positions).
    """

    problem: SpanProblem
    positions: torch.Tensor
    query_positions: torch.Tensor
    rope: torch.Tensor | None = None
    placement: "SlotPlacement | None" = None

    def after_span(self) -> "HeadSpan":
        """The span seen only by the reference queries that come after all of it (future queries, and
        context queries at or past its last position): the only ones whose attention the slots must
        reproduce, since every query that reads the compacted cache comes after the span. Unchanged when
        no query qualifies."""
        if self.positions.numel() == 0:
            return self
        keep = sees_whole_span(self.query_positions, self.positions.max())
        if bool(keep.all()) or not bool(keep.any()):
            return self
        return self.with_queries(keep)

    def with_queries(self, keep: torch.Tensor) -> "HeadSpan":
        """The same span with only the reference queries where the boolean `keep` [n] is True."""
        p = self.problem
        phi = None if p.phi is None else p.phi[:, keep]
        problem = SpanProblem(p.queries[:, keep], p.keys, p.values, p.key_bias, p.context_lse[:, keep], p.scaling, phi=phi)
        return HeadSpan(problem, self.positions, self.query_positions[keep], self.rope, self.placement)

    def read_keys(self, index: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Slot keys chosen at span `index` [B, t] where the cache will read them (moved by the placement)."""
        if self.placement is None or self.rope is None:
            return keys
        return self.placement.place(keys, self.rope.gather(1, index))

    def slot_error(self, index, keys, values, beta) -> torch.Tensor:
        """How far slots are from the span for its reference queries, per problem [B]: the mean squared
        difference of the span's part of each query's attention output as it is (m Y, with m the span's share
        of the query's attention and Y its output) and as the slots give it once merged with the rest of the
        cache (s X / (s + 1 - m), with s the slots' share and X their output)."""
        p = self.problem
        mass, output = p.targets(p.weights())
        logits = p.queries @ self.read_keys(index, keys).float().transpose(-1, -2) * p.scaling + beta.float()[:, None, :]
        logits = logits - p.context_lse[..., None]
        slot_mass = torch.logsumexp(logits, dim=-1).exp()
        slot_output = torch.softmax(logits, dim=-1) @ values.float()
        merged = slot_mass[..., None] * slot_output / (slot_mass + 1 - mass).clamp(min=1e-30)[..., None]
        return (mass[..., None] * output - merged).pow(2).sum(-1).mean(-1)

    def causal_weights(self) -> torch.Tensor:
        """Attention weights [B, n, T] with context queries restricted to keys at or before them."""
        phi = self.problem.weights()
        future = self.query_positions < 0
        visible = future[:, None] | (self.positions[None, :] <= self.query_positions[:, None])
        return phi * visible[None]


class Press:
    """Contract: `compact(span, budget)` -> (index [B, t], keys [B, t, d], values [B, t, d], beta [B, t]).

    `reads_attention`: whether the press looks at the reference queries' attention (`span.problem.phi`,
    `weights()`, `context_lse`); a press that ranks by position alone sets it False and is handed spans
    without it (nothing is measured for it).

    `query_sources`: the reference queries the method is defined with (e.g. KVzip's repeat pass), which
    `sparsemem.compact` and the evaluations capture for it unless the caller names other sources; None:
    the caller's choice. Online compaction has only the stream's own newest queries and ranks with those."""

    reads_attention = True
    query_sources: tuple[str, ...] | None = None

    def for_ranking(self) -> "Press":
        """The press used for trial fits that only rank choices (e.g. the recent/slot split): itself by default."""
        return self

    def scores(self, span: HeadSpan) -> torch.Tensor:
        raise NotImplementedError

    def compact(self, span: HeadSpan, budget: int):
        problem = span.problem
        total = problem.keys.shape[1]
        if budget >= total:
            index = torch.arange(total, device=problem.keys.device).expand(problem.keys.shape[0], -1)
        else:
            index = self.scores(span).topk(budget, dim=-1).indices.sort(dim=-1).values
        gather = lambda t: t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
        return index, gather(problem.keys), gather(problem.values), problem.key_bias.gather(1, index)


def group_queries(queries: torch.Tensor, head: int, kv_heads: int) -> torch.Tensor:
    """The queries of KV head `head`'s query group, pooled: [B, H, n, d] -> [B, G*n, d] (fp32)."""
    groups = queries.shape[1] // kv_heads
    batch, _, _, dim = queries.shape
    return queries[:, head * groups : (head + 1) * groups].reshape(batch, -1, dim).float()


@dataclass
class LayerAttention:
    """Attention of one layer's reference queries over everything the layer holds, per KV head, computed
    once and shared by every span compacted with the same queries (e.g. the trial splits of `compact`).

    phi[h]: [B, G*n, N] weights over the exact entries; slot_phi[h]: [B, G*n, S_h] over head h's slots
    (their beta included) or None; lse[h]: [B, G*n] log-sum-exp over all of them."""

    phi: list
    slot_phi: list
    lse: list

    @classmethod
    def measure(cls, layer, queries: torch.Tensor, scaling: float) -> "LayerAttention":
        kv_heads = layer.keys.shape[1]
        keys = layer.keys.float()
        phi, slot_phi, lse = [], [], []
        for head in range(kv_heads):
            q = group_queries(queries, head, kv_heads)
            parts = [q @ keys[:, head].transpose(-1, -2) * scaling]
            if layer.slots is not None:
                own = layer.slots.head == head
                parts.append(q @ layer.slots.keys[:, own].float().transpose(-1, -2) * scaling + layer.slots.beta[:, own].float()[:, None])
            total = torch.logsumexp(torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0], dim=-1)
            weights = [torch.exp(part.sub_(total[..., None])) for part in parts]
            phi.append(weights[0])
            slot_phi.append(weights[1] if len(weights) > 1 else None)
            lse.append(total)
        return cls(phi, slot_phi, lse)


def head_spans(
    layer, queries: torch.Tensor, query_positions: torch.Tensor, span: torch.Tensor, scaling: float, fold_slots: bool,
    attention: LayerAttention | None = None,
):
    """Yield (head, HeadSpan) for every KV head of a `SparseMemLayer`.

    queries [B, H, n, d] (all query heads), span [N] boolean over the layer's physical entries. With
    `fold_slots`, existing slots of each head join the span with their beta; otherwise they only take
    part in the context log-sum-exp. `attention` (measured with the same queries) saves recomputing it.
    """
    kv_heads = layer.keys.shape[1]
    q_pos = query_positions.repeat(queries.shape[1] // kv_heads)  # positions of the pooled group queries
    attention = attention if attention is not None else LayerAttention.measure(layer, queries, scaling)
    keys, values = layer.keys.float(), layer.values.float()
    index = span.nonzero()[:, 0]
    if index.numel() and int(index[-1] - index[0]) + 1 == index.numel():
        span = slice(int(index[0]), int(index[-1]) + 1)  # a contiguous span: views instead of copies
    for head in range(kv_heads):
        q = group_queries(queries, head, kv_heads)
        span_keys, span_values = keys[:, head, span], values[:, head, span]
        bias = torch.zeros(span_keys.shape[:2], device=keys.device)
        positions = layer.positions[span]
        rope = (layer.rope_positions if layer.rope_positions is not None else layer.positions)[span]
        rope = rope[None].expand(span_keys.shape[0], -1)
        phi = attention.phi[head][..., span]
        if layer.slots is not None and fold_slots:
            own = layer.slots.head == head
            span_keys = torch.cat([layer.slots.keys[:, own].float(), span_keys], dim=1)
            span_values = torch.cat([layer.slots.values[:, own].float(), span_values], dim=1)
            bias = torch.cat([layer.slots.beta[:, own].float(), bias], dim=1)
            positions = torch.cat([layer.slots.position[own], positions])
            rope = torch.cat([layer.slots.rope[:, own], rope], dim=1)
            phi = torch.cat([attention.slot_phi[head], phi], dim=-1)
        problem = SpanProblem(q, span_keys, span_values, bias, attention.lse[head], scaling, phi=phi)
        yield head, HeadSpan(problem, positions, q_pos, rope)


def _stack(spans: list[HeadSpan]) -> HeadSpan:
    """One HeadSpan whose batch holds the batches of `spans` (same span positions and query count)."""
    fields = ("queries", "keys", "values", "key_bias", "context_lse")
    stacked = {name: torch.cat([getattr(s.problem, name) for s in spans]) for name in fields}
    if all(s.problem.phi is not None for s in spans):
        stacked["phi"] = torch.cat([s.problem.phi for s in spans])
    rope = None if any(s.rope is None for s in spans) else torch.cat([s.rope for s in spans])
    # grouped spans share their placement (`compact_layers` groups on it)
    return HeadSpan(SpanProblem(**stacked, scaling=spans[0].problem.scaling), spans[0].positions, spans[0].query_positions, rope,
                    spans[0].placement)


def compact_layer(
    layer, queries, query_positions, span: torch.Tensor, budgets: list[int], press: Press, scaling: float, fold_slots: bool = True,
    attention: LayerAttention | None = None, placement: SlotPlacement | None = None,
) -> None:
    """Replace the `span` entries of `layer` (and, with `fold_slots`, its existing slots) by `budgets[h]`
    slots per KV head. Heads with the same span and budget are solved together as one batch.
    `attention`: the queries' `LayerAttention` over this layer as it is now, if already measured.
    `placement`: where the slots will sit under cache positions (they are fitted and rotated there)."""
    compact_layers([LayerCompaction(layer, queries, query_positions, span, budgets, attention, placement)], press, scaling, fold_slots)


@dataclass
class LayerCompaction:
    """One layer's part of `compact_layers`."""

    layer: object
    queries: torch.Tensor
    query_positions: torch.Tensor
    span: torch.Tensor
    budgets: list
    attention: LayerAttention | None = None
    placement: SlotPlacement | None = None


def compact_layers(jobs: list[LayerCompaction], press: Press, scaling: float, fold_slots: bool = True) -> None:
    """`compact_layer` for several layers at once: every (layer, KV head) with the same span positions and
    budget is solved in one batch, so a cache whose layers all reach their budget together (online
    compaction) runs one solve instead of one per layer."""
    if _compact_uniform(jobs, press, scaling, fold_slots):
        return
    groups: list[tuple[list[tuple[int, int]], list[HeadSpan]]] = []
    last_positions = []
    for number, job in enumerate(jobs):
        layer = job.layer
        last_positions.append(int(layer.positions[job.span].max()) if bool(job.span.any()) else -1)
        spans = head_spans(layer, job.queries, job.query_positions, job.span, scaling, fold_slots, job.attention)
        for head, head_span in spans:
            if head_span.problem.keys.shape[1] == 0:
                continue
            head_span.placement = job.placement
            budget = job.budgets[head]
            for members_of, members in groups:
                first_job, first_head = members_of[0]
                same_placement = (job.placement is None) == (jobs[first_job].placement is None) and (
                    job.placement is None or job.placement.end == jobs[first_job].placement.end)
                if (jobs[first_job].budgets[first_head] == budget and same_placement
                        and torch.equal(members[0].positions, head_span.positions)):
                    members_of.append((number, head))
                    members.append(head_span)
                    break
            else:
                groups.append(([(number, head)], [head_span]))
    parts: list[list[SlotTier]] = [[] for _ in jobs]
    for members_of, members in groups:
        stacked = _stack(members)
        first_job, first_head = members_of[0]
        index, keys, values, beta = press.compact(stacked, jobs[first_job].budgets[first_head])
        # a slot key keeps the rotation of the entry it was chosen from (its RoPE position), unless the
        # slots are placed: then they move to where the cache's layout will put them
        rope = stacked.rope.to(index.device).gather(1, index) if stacked.rope is not None else None
        placement = jobs[first_job].placement
        if placement is not None and rope is not None:
            keys = placement.place(keys, rope)
            rope = placement.targets(keys.shape[1], keys.device)[None].expand(keys.shape[0], -1)
        span_last = int(members[0].positions.max())
        for i, (number, head) in enumerate(members_of):
            batch = jobs[number].layer.keys.shape[0]
            rows = slice(i * batch, (i + 1) * batch)
            count = keys.shape[1]
            position = max(last_positions[number], span_last)
            parts[number].append(
                SlotTier(
                    keys[rows].to(jobs[number].layer.keys.dtype),
                    values[rows].to(jobs[number].layer.keys.dtype),
                    beta[rows].float(),
                    torch.full((count,), head, device=keys.device),
                    torch.full((count,), -1, device=keys.device),
                    torch.full((count,), position, device=keys.device),
                    None if rope is None else rope[rows],
                )
            )
    for job, layer_parts in zip(jobs, parts):
        job.layer.evict(job.span)
        if fold_slots:
            job.layer.set_slots(None)
        for part in layer_parts:
            job.layer.add_slots(part)


def _same_layout(jobs: list[LayerCompaction], fold_slots: bool) -> bool:
    """Whether every layer of `jobs` holds the same entries in the same layout (positions, span, reference
    query positions, slots: the same count per KV head, each head's at the same positions; slot keys may sit
    at different RoPE positions) and every head
    gets the same budget with the same placement: then all (layer, head) spans form one batch directly."""
    first = jobs[0]
    layer = first.layer
    if len({budget for job in jobs for budget in job.budgets}) != 1 or (layer.slots is not None and not fold_slots):
        return False
    if len({None if job.placement is None else job.placement.end for job in jobs}) != 1:
        return False
    kv_heads = layer.keys.shape[1]
    slot_count = 0 if layer.slots is None else len(layer.slots)
    if slot_count % kv_heads:
        return False
    # the layers' own layout check (positions, RoPE positions, slots), then what the batch adds: the span,
    # the reference queries, and slots stored head by head with each head's at the same positions
    checks = []
    for job in jobs[1:]:
        same = job.layer.same_layout_as(layer)
        if (same is None or job.queries.shape != first.queries.shape or job.span.shape != first.span.shape
                or job.query_positions.shape != first.query_positions.shape):
            return False
        checks += [*same, (job.span == first.span).all(), (job.query_positions == first.query_positions).all()]
    if slot_count:
        per_head = slot_count // kv_heads
        own_heads = torch.arange(kv_heads, device=layer.keys.device).repeat_interleave(per_head)
        slots = layer.slots
        checks += [(slots.head == own_heads).all(), (slots.position.view(kv_heads, per_head) == slots.position[:per_head]).all()]
    if not checks:
        return True
    return bool(torch.stack(checks).all())


def _compact_uniform(jobs: list[LayerCompaction], press: Press, scaling: float, fold_slots: bool) -> bool:
    """`compact_layers` when every layer has the same layout (`_same_layout`, e.g. a stream's layers): the
    spans of all layers and KV heads are gathered into one `HeadSpan` with a few batched operations rather
    than per-head slicing, and the slots go back to each layer as one tier. Returns False (nothing done) when
    the layouts differ."""
    if not jobs or not _same_layout(jobs, fold_slots):
        return False
    first, layer = jobs[0], jobs[0].layer
    batch, kv_heads, _, dim = layer.keys.shape
    count, query_heads = len(jobs), first.queries.shape[1]
    groups = query_heads // kv_heads
    span = first.span.to(layer.keys.device)
    if not bool(span.any()):
        return True
    # [L, B, Hkv, ...]: the query group of KV head h is query heads h*G ... (h+1)*G - 1, pooled
    queries = torch.stack([job.queries for job in jobs]).float()
    queries = queries.view(count, batch, kv_heads, groups * queries.shape[-2], queries.shape[-1])
    keys = torch.stack([job.layer.keys for job in jobs]).float()
    values = torch.stack([job.layer.values for job in jobs]).float()
    if layer.slots is not None:
        per_head = len(layer.slots) // kv_heads
        shaped = lambda t: torch.stack([t(job.layer.slots) for job in jobs]).view(count, batch, kv_heads, per_head, -1)  # noqa: E731
        slot_keys, slot_values = shaped(lambda s: s.keys).float(), shaped(lambda s: s.values).float()
        slot_beta = shaped(lambda s: s.beta)[..., 0].float()
        slot_rope = shaped(lambda s: s.rope)[..., 0]
    span_keys, span_values = keys[..., span, :], values[..., span, :]
    if press.reads_attention:
        logits = queries @ keys.transpose(-1, -2) * scaling
        parts = [logits]
        if layer.slots is not None:
            parts.append(queries @ slot_keys.transpose(-1, -2) * scaling + slot_beta[..., None, :])
        lse = torch.logsumexp(torch.cat(parts, dim=-1), dim=-1)
        phi = torch.exp(logits - lse[..., None])[..., span]
        if layer.slots is not None:
            phi = torch.cat([torch.exp(parts[1] - lse[..., None]), phi], dim=-1)
    else:  # ranked by position alone: no attention to measure
        lse = torch.zeros(queries.shape[:-1], device=queries.device)
        phi = None
    bias = torch.zeros(span_keys.shape[:-1], device=span_keys.device)
    positions = layer.positions[span]
    rope = (layer.rope_positions if layer.rope_positions is not None else layer.positions)[span]
    rope = rope.expand(count, batch, kv_heads, -1)
    if layer.slots is not None:
        span_keys, span_values = torch.cat([slot_keys, span_keys], -2), torch.cat([slot_values, span_values], -2)
        bias = torch.cat([slot_beta, bias], -1)
        positions = torch.cat([layer.slots.position[:per_head], positions])
        rope = torch.cat([slot_rope, rope], -1)
    flat = lambda t: t.reshape(count * batch * kv_heads, *t.shape[3:])  # noqa: E731
    problem = SpanProblem(flat(queries), flat(span_keys), flat(span_values), flat(bias), flat(lse), scaling,
                          phi=None if phi is None else flat(phi))
    query_positions = first.query_positions.repeat(groups)
    stacked = HeadSpan(problem, positions, query_positions, flat(rope).contiguous(), first.placement)
    budget = first.budgets[0]
    index, new_keys, new_values, beta = press.compact(stacked, budget)
    new_rope = stacked.rope.to(index.device).gather(1, index)
    if first.placement is not None:
        new_keys = first.placement.place(new_keys, new_rope)
        new_rope = first.placement.targets(new_keys.shape[1], new_keys.device)[None].expand(new_keys.shape[0], -1)
    slots = new_keys.shape[1]
    unflat = lambda t: t.reshape(count, batch, kv_heads * slots, *t.shape[2:])  # noqa: E731
    new_keys, new_values, beta, new_rope = unflat(new_keys), unflat(new_values), unflat(beta), unflat(new_rope)
    heads = torch.arange(kv_heads, device=new_keys.device).repeat_interleave(slots)
    position = int(positions.max())
    for number, job in enumerate(jobs):
        target = job.layer
        target.evict(first.span)
        target.set_slots(SlotTier(
            # copies: each layer owns its tensors (a view would keep every layer's slots alive)
            new_keys[number].to(target.keys.dtype, copy=True), new_values[number].to(target.keys.dtype, copy=True),
            beta[number].to(torch.float32, copy=True), heads.clone(), torch.full_like(heads, -1),
            torch.full_like(heads, position), new_rope[number].clone(),
        ))
    return True
