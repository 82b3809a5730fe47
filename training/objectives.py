"""Calibration objectives.

Phase 1, scorer distillation: for sampled queries of every layer, the dense attention mass of each cold
block (keys neither sinks nor recent), max-pooled over the block's keys' probabilities summed per block
and over the query heads of the KV group, normalised over the candidate blocks, is the target of the
scorer's softmax over the same candidates: KL(target || scorer). The dense model runs unchanged through
an attention function that also feeds (query, key) of each layer to the objective.

Phase 2, end to end: KL(dense teacher next-token distribution || sparse student) on the last tokens of
each sequence; the teacher is the same weights with dense attention (and, with LoRA, adapters off).
"""

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sparsemem.modeling.anchors import anchor_mask, causal_mask, sliding_window_mask
from sparsemem.modeling.scorer import PooledKeyScorer, summarize_blocks
from sparsemem.modeling.selection import select_blocks

DISTILL_ATTENTION = "sparsemem_scorer_distillation"


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
        self._training_free = PooledKeyScorer(config.scorer_init)  # the learned scorer's start

    def __call__(self, module, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
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

    def _row_weights(self, cold_mass: torch.Tensor) -> torch.Tensor:
        """Weights of the (batch, KV head, query) rows, summing to 1."""
        if not self.mass_weighted:
            return torch.full_like(cold_mass, 1.0 / cold_mass.numel())
        return cold_mass / cold_mass.sum().clamp(min=1e-30)

    def loss(self) -> torch.Tensor:
        if not self.losses:
            raise ValueError("scorer distillation: no layer produced a loss (sequence shorter than sink+local+block tokens?)")
        return torch.stack(self.losses).mean()

    def reset(self) -> None:
        self.losses.clear()
        self.recall_learned.clear()
        self.recall_training_free.clear()
        self.rows.clear()


def distillation_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dense SDPA attention; hands (query, key) to the module's `scorer_distillation` collector if set."""
    kwargs.pop("sparsemem", None)
    output = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    collector = getattr(module, "scorer_distillation", None)
    if collector is not None:
        collector(module, query, key, scaling if scaling is not None else module.scaling)
    return output


def register_distillation_attention() -> None:
    AttentionInterface.register(DISTILL_ATTENTION, distillation_attention_forward)
    AttentionMaskInterface.register(DISTILL_ATTENTION, sdpa_mask)


def next_token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student), computed in fp32."""
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(student.flatten(0, -2), teacher.flatten(0, -2), log_target=True, reduction="batchmean")
