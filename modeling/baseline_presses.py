"""Eviction baselines as presses: each keeps `budget` of the span's own entries (keys, values and prior
beta unchanged), ranked by a score: position (StreamingLLM), accumulated attention (H2O), an observation
window (SnapKV), the largest attention of any reference query (KVzip), or chance."""

from dataclasses import dataclass

import torch

from .compaction import Press

@dataclass
class StreamingLLMPress(Press):
    """Keep the newest entries of the span (with the anchors: StreamingLLM's sink + recent window)."""

    reads_attention = False

    def scores(self, span):
        return span.positions.float()[None].expand(span.problem.keys.shape[0], -1)


@dataclass
class H2OPress(Press):
    """Heavy hitters: attention accumulated by the (causal) queries of the context's own prefill."""

    query_sources = ("context",)

    def scores(self, span):
        return span.causal_weights().sum(dim=1)


@dataclass
class SnapKVPress(Press):
    """Attention from an observation window of the last context queries, pooled over neighbours."""

    query_sources = ("context",)

    window: int = 32
    kernel: int = 7

    def scores(self, span):
        context = span.query_positions >= 0
        if not bool(context.any()):
            raise ValueError("SnapKV needs context queries (queries=('context',))")
        order = torch.where(context, span.query_positions, -1).argsort(descending=True)[: self.window]
        weights = span.causal_weights()[:, order].sum(dim=1)
        return torch.nn.functional.max_pool1d(weights[:, None], self.kernel, stride=1, padding=self.kernel // 2)[:, 0]


@dataclass
class KVzipPress(Press):
    """KVzip-style: the largest attention any query of a teacher-forced repeat pass over the context gives
    each entry (KVzip reconstructs the context to score it)."""

    query_sources = ("repeat",)

    def scores(self, span):
        return span.problem.weights().amax(dim=1)


@dataclass
class RandomPress(Press):
    seed: int = 0
    reads_attention = False

    def scores(self, span):
        generator = torch.Generator().manual_seed(self.seed)
        return torch.rand(span.problem.keys.shape[:2], generator=generator).to(span.problem.keys.device)
