"""The learned consolidation press (`am-learned`) with several settings, one real document (CPU).

Run (specs: a JSON list of LearnedConsolidationPress keyword arguments, optionally with "ratios"):

    OMP_NUM_THREADS=1 python learned_experiment.py 3000 512 20000 5,10,20,50,100 '[{}]' > learned.jsonl

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



from sparsemem.modeling.consolidation import LearnedConsolidationPress
for spec in json.loads(sys.argv[5]):
    for ratio in spec.pop("ratios", ratios):
        cache = copy.deepcopy(full)
        start = time.perf_counter()
        press = LearnedConsolidationPress(**spec)
        compact(model, cache, ratio, method=press, queries=["repeat"], reference_queries=reference_queries(("repeat",)))
        seconds = time.perf_counter() - start
        logprobs = _continuation_logprobs(model, cache, cont)
        kl = (reference.exp() * (reference - logprobs)).sum(-1).mean().item()
        print(json.dumps({**spec, "ratio": ratio, "kl": round(kl, 4), "sec": round(seconds, 1)}), flush=True)
