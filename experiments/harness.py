"""The document the CPU compaction experiments of this folder share, and how they measure a compaction.

The document is the evaluation's (`sparsemem eval compaction`: Python's pydoc_data.topics at a token
offset, context + continuation tokens). Reference queries are captured once per set of sources, always
with the context's own. `measure` compacts a copy of the full cache and returns the continuation's mean
next-token KL to the full cache, the seconds `compact` took, the bytes ratio (measured before the
continuation is appended) and the mean number of exact recent tokens per layer.
"""
import copy
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sparsemem
from sparsemem.compact import capture_reference_queries, compact
from sparsemem.corpus import load_corpus, token_window
from sparsemem.default_model import resolve_model
from sparsemem.evaluation_compaction import _continuation_logprobs, _prefill


class Document:
    def __init__(self, length: int, continuation: int, offset: int):
        path = resolve_model(None)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.model = sparsemem.convert(base, top_k_blocks=None, block_fraction=None)
        ids = torch.tensor([token_window(self.tokenizer, load_corpus(None), length + continuation, offset=offset)])
        self.context, self.continuation = ids[:, :length], ids[:, length:]
        self.full = _prefill(self.model, self.context)
        self.reference = _continuation_logprobs(self.model, copy.deepcopy(self.full), self.continuation)
        self._captured = {}

    def reference_queries(self, sources):
        key = tuple(dict.fromkeys(("context", *sources)))
        if key not in self._captured:
            self._captured[key] = capture_reference_queries(self.model, self.context, key, self.tokenizer)
        return self._captured[key]

    def measure(self, ratio: float, queries=("repeat",), **compact_args) -> dict:
        cache = copy.deepcopy(self.full)
        start = time.perf_counter()
        compact(self.model, cache, ratio, queries=list(queries), reference_queries=self.reference_queries(tuple(queries)),
                **compact_args)
        seconds = time.perf_counter() - start
        size = self.full.memory_bytes()["total"] / cache.memory_bytes()["total"]
        logprobs = _continuation_logprobs(self.model, cache, self.continuation)
        kl = (self.reference.exp() * (self.reference - logprobs)).sum(-1).mean().item()
        recent = cache.compaction_info["keep_last"]
        return {"ratio": ratio, "kl": round(kl, 4), "sec": round(seconds, 1), "bytes": round(size, 2),
                "recent": round(sum(recent) / len(recent), 1)}
