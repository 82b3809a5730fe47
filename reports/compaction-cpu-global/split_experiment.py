"""Attention Matching's split of each budget, one real document (CPU): `exact_newest` (the share of each
head's slot budget kept as its newest entries, exact) and `recent_shares` (the shares of the layer's
budget kept as exact recent tokens that compact() chooses among by trial fits), at several ratios.

Run (specs: a JSON list of {"en": exact_newest, "shares": [...], "ratios": [...]}; defaults: shares
0.25/0.5/0.75 and the ratios argument):

    OMP_NUM_THREADS=1 python split_experiment.py 3000 512 20000 50,100 '[{"en":0.75,"shares":[0.25]}]' > split.jsonl

The rest of this docstring is kl_experiment.py's, whose document and reference queries this reuses:


Run (one process at a time; each config is a JSON object of `sparsemem.compact` arguments):

    OMP_NUM_THREADS=2 python kl_experiment.py 3000 512 20000 5,10,20,50,100 \
        '{"method":"am","head_budgets":"global"}' '{"method":"kvzip","head_budgets":"global"}' ... > kl.jsonl

Arguments: context tokens, continuation tokens, corpus offset, ratios, configs. The document is the
evaluation's (`sparsemem eval compaction`: Python's pydoc_data.topics at offset 20000, 3000 + 512
tokens). Reference queries are captured once per set of sources, always with the context's own; each
method takes the sources the evaluation gives it unless the config names them (AM and KVzip the repeat
pass, H2O and SnapKV the context).
Bytes are measured before the continuation is appended.
"""
import copy
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sparsemem
from sparsemem.compact import capture_reference_queries, compact
from sparsemem.corpus import load_corpus, token_window
from sparsemem.default_model import resolve_model
from sparsemem.evaluation_compaction import _continuation_logprobs, _prefill, _queries_for

path = resolve_model(None)
tokenizer = AutoTokenizer.from_pretrained(path)
base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
model = sparsemem.convert(base, top_k_blocks=None, block_fraction=None)
length, continuation, offset = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
ratios = [float(x) for x in sys.argv[4].split(",")]

ids = torch.tensor([token_window(tokenizer, load_corpus(None), length + continuation, offset=offset)])
context, cont = ids[:, :length], ids[:, length:]
full = _prefill(model, context)
reference = _continuation_logprobs(model, copy.deepcopy(full), cont)
captured = {}


def reference_queries(sources):
    # the context's queries always come along (they judge the split), as in the evaluation
    key = tuple(dict.fromkeys(("context", *sources)))
    if key not in captured:
        captured[key] = capture_reference_queries(model, context, key, tokenizer)
    return captured[key]



from sparsemem.modeling.compaction import AttentionMatchingPress
for spec in json.loads(sys.argv[5]):
    en, shares = spec["en"], tuple(spec.get("shares", (0.25, 0.5, 0.75)))
    for ratio in spec.get("ratios", ratios):
        cache = copy.deepcopy(full)
        start = time.perf_counter()
        compact(model, cache, ratio, method=AttentionMatchingPress(exact_newest=en), queries=["repeat"], recent_shares=shares, reference_queries=reference_queries(("repeat",)))
        seconds = time.perf_counter() - start
        size = full.memory_bytes()["total"] / cache.memory_bytes()["total"]
        logprobs = _continuation_logprobs(model, cache, cont)
        kl = (reference.exp() * (reference - logprobs)).sum(-1).mean().item()
        recent = cache.compaction_info["keep_last"]
        print(json.dumps({"exact_newest": en, "shares": shares, "recent": round(sum(recent) / len(recent), 1), "ratio": ratio, "kl": round(kl, 4), "sec": round(seconds, 1), "bytes": round(size, 2)}), flush=True)
