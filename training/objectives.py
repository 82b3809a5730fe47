"""Calibration objectives.

Phase 1, scorer distillation: for sampled queries of every layer, the dense attention mass of each cold
block (keys neither sinks nor recent), max-pooled over the block's keys' probabilities summed per block
and over the query heads of the KV group, normalised over the candidate blocks, is the target of the
scorer's softmax over the same candidates: KL(target || scorer). The dense model runs unchanged through
an attention function that also feeds (query, key) of each layer to the objective.

With `block_slots` set, the same pass also trains each layer's block consolidator: for the same sampled
queries, the error of the sparse attention output (anchors + selected blocks + the slots of every
unselected complete block) against the dense output, relative to the error with the unselected blocks
dropped (so 1 means the slots do no better than nothing, 0 that they answer the unselected blocks exactly).

Phase 2, end to end: KL(dense teacher next-token distribution || sparse student) on the last tokens of
each sequence; the teacher is the same weights with dense attention (and, with LoRA, adapters off).
"""

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sparsemem.modeling.anchors import anchor_mask, causal_mask, sliding_window_mask
from sparsemem.modeling.block_consolidation import block_slots
from sparsemem.modeling.merge import masked_attention, merge_attention_states
from sparsemem.modeling.scorer import PooledKeyScorer, summarize_blocks
from sparsemem.modeling.selection import score_and_select, select_blocks
from sparsemem.modeling.slot_attention import slot_attention

DISTILL_ATTENTION = "sparsemem_scorer_distillation"
# the collector of the forward pass running in this thread (or asyncio task); set by `distilling`
_COLLECTOR: contextvars.ContextVar = contextvars.ContextVar("sparsemem_scorer_distillation", default=None)


@contextlib.contextmanager
def distilling(collector):
    """Within the block, in this thread only, `DISTILL_ATTENTION` hands every layer's (query, key) to `collector`
    (nothing is set on the model's modules)."""
    token = _COLLECTOR.set(collector)
    try:
        yield collector
    finally:
        _COLLECTOR.reset(token)


class ScorerDistillation:
    """Collects the phase-1 loss of every layer during one dense forward pass.

    `queries_per_layer` query positions are drawn (from `generator`) among those that have cold blocks;
    the loss is the mean over layers of the mean KL over those queries and KV heads. With
    `mass_weighted`, each (query, KV head) counts in proportion to the attention mass its cold blocks
    hold: a query that attends almost only its anchors loses next to nothing whatever blocks it
    selects, and an unweighted mean spends the scorer's capacity on ranking such rows. Also records,
    with the same weights, the share of dense block mass the learned and the training-free selections
    capture at the configured budget.
    """

    def __init__(self, config, queries_per_layer: int, generator: torch.Generator, mass_weighted: bool = True):
        self.config = config
        self.queries_per_layer = queries_per_layer
        self.mass_weighted = mass_weighted
        self.generator = generator
        self.losses: list[torch.Tensor] = []
        self.recall_learned: list[float] = []
        self.recall_training_free: list[float] = []
        self.rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per layer: (positions, KL, cold mass)
        self.slot_losses: list[torch.Tensor] = []  # per layer with a consolidator: error ratio of the slots
        self._training_free = PooledKeyScorer(config.scorer_init)  # the learned scorer's start

    def __call__(self, module, query: torch.Tensor, key: torch.Tensor, scaling: float, value: torch.Tensor | None = None) -> None:
        config = self.config
        block, sink, local = config.block_size, config.sink_tokens, config.local_tokens
        batch, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        groups = heads // kv_heads
        first = sink + local + block  # earlier queries have no cold block
        if length <= first:
            return
        count = min(self.queries_per_layer, length - first)
        positions = torch.randperm(length - first, generator=self.generator)[:count].sort().values + first
        positions = positions.to(query.device)
        key_positions = torch.arange(length, device=query.device)
        query = query.detach()[:, :, positions].float()
        key = key.detach().float()

        with torch.no_grad():
            visible = causal_mask(positions, key_positions)
            window = sliding_window_mask(positions, key_positions, getattr(module, "attention_window", None))
            if window is not None:
                visible = visible & window
            logits = torch.einsum("bhqd,bhnd->bhqn", query, key.repeat_interleave(groups, dim=1)) * scaling
            probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
            cold = visible & ~anchor_mask(positions, key_positions, sink, local)
            block_ids = torch.div(key_positions, block, rounding_mode="floor")
            num_blocks = int(block_ids[-1]) + 1
            mass = torch.zeros(batch, heads, count, num_blocks, device=query.device)
            mass.index_add_(3, block_ids, probs * cold)
            mass = mass.view(batch, kv_heads, groups, count, num_blocks).amax(dim=2)
            candidates = torch.zeros(count, num_blocks, device=query.device).index_add_(1, block_ids, cold.float()) > 0
            candidates = candidates[None, None].expand_as(mass)
            total = mass.sum(-1, keepdim=True)
            target = mass / total.clamp(min=1e-30)
            summaries = summarize_blocks(key, block_ids, num_blocks)

        groups_q = query.view(batch, kv_heads, groups, count, dim)
        with torch.enable_grad():
            scores, selection = module.scorer.scores(groups_q, summaries, candidates)  # trained, and with the union
            log_p = module.scorer.log_distribution(scores, candidates)
            kl = torch.where(target > 0, target * (torch.log(target.clamp(min=1e-30)) - log_p), torch.zeros_like(target))
            row_kl, row_mass = kl.sum(-1), total.squeeze(-1)
            row_weight = self._row_weights(row_mass)
            self.losses.append((row_kl * row_weight).sum())
            self.rows.append((positions, row_kl.detach(), row_mass))

        with torch.no_grad():
            top_k, fraction = config.top_k_blocks, config.block_fraction
            for scorer_scores, store in ((selection.detach(), self.recall_learned), (self._training_free(groups_q, summaries, candidates), self.recall_training_free)):
                chosen = select_blocks(scorer_scores, candidates, top_k, fraction)
                store.append(float(((target * chosen).sum(-1) * row_weight).sum()))

        if getattr(module, "consolidator", None) is not None and value is not None:
            window_size = getattr(module, "attention_window", None)
            self.slot_losses.append(
                self._slot_error(module, groups_q, key, value.detach().float(), positions, logits, probs, visible, cold,
                                 block_ids, candidates, summaries, scaling, window_size)
            )

    def _slot_error(self, module, query, key, value, positions, logits, probs, visible, cold, block_ids, candidates,
                    summaries, scaling, window):
        """Squared error of the sparse output with block slots against the dense output, over the error with
        the unselected blocks dropped; query [B, Hkv, G, c, D], logits and probs [B, H, c, N] of the dense
        pass (the logits are overwritten)."""
        config = self.config
        batch, kv_heads, groups, count, _ = query.shape
        with torch.no_grad():
            _, selected = score_and_select(module.scorer, query, summaries, candidates, config.top_k_blocks,
                                           config.block_fraction, config.block_mass)
            key_selected = selected.gather(-1, block_ids.view(1, 1, 1, -1).expand(batch, kv_heads, count, -1))
            exact = visible & ~cold  # the anchors a query sees
            full = visible[None, None] & (exact[None, None] | key_selected)  # [B, Hkv, c, N]
            # query heads are KV-head major in the dense pass (repeat_interleave), as in the grouped layout
            sparse, sparse_lse = masked_attention(logits.view(batch, kv_heads, groups, count, -1), full[:, :, None], value)
            dense = torch.einsum("bhgqn,bhnd->bhgqd", probs.view(batch, kv_heads, groups, count, -1), value)
        with torch.enable_grad():
            slots = block_slots(module.consolidator, key, value)  # the dense pass holds positions 0..N-1
            if slots is None:
                return torch.zeros((), device=query.device)
            slot_out, slot_lse, _ = slot_attention(query, positions, slots, selected, scaling, config.block_size,
                                                   config.sink_tokens, config.local_tokens, window)
            merged = merge_attention_states([(sparse, sparse_lse), (slot_out, slot_lse)])[0]
            dropped = (sparse - dense).pow(2).sum().clamp(min=1e-30)
            return (merged - dense).pow(2).sum() / dropped

    def _row_weights(self, cold_mass: torch.Tensor) -> torch.Tensor:
        """Weights of the (batch, KV head, query) rows, summing to 1."""
        if not self.mass_weighted:
            return torch.full_like(cold_mass, 1.0 / cold_mass.numel())
        return cold_mass / cold_mass.sum().clamp(min=1e-30)

    def loss(self) -> torch.Tensor:
        if not self.losses:
            raise ValueError("scorer distillation: no layer produced a loss (sequence shorter than sink+local+block tokens?)")
        loss = torch.stack(self.losses).mean()
        return loss + self.slot_loss() if self.slot_losses else loss

    def slot_loss(self) -> torch.Tensor:
        """Mean over layers of the block slots' error ratio (1: no better than dropping the unselected blocks)."""
        return torch.stack(self.slot_losses).mean()

    def reset(self) -> None:
        self.losses.clear()
        self.recall_learned.clear()
        self.recall_training_free.clear()
        self.rows.clear()
        self.slot_losses.clear()


def distillation_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dense SDPA attention; hands (query, key) to the collector of `distilling` if one is active."""
    kwargs.pop("sparsemem", None)
    output = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    collector = _COLLECTOR.get()
    if collector is not None:
        collector(module, query, key, scaling if scaling is not None else module.scaling, value)
    return output


def register_distillation_attention() -> None:
    AttentionInterface.register(DISTILL_ATTENTION, distillation_attention_forward)
    AttentionMaskInterface.register(DISTILL_ATTENTION, sdpa_mask)


def next_token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student), computed in fp32."""
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(student.flatten(0, -2), teacher.flatten(0, -2), log_target=True, reduction="batchmean")
