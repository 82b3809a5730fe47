"""Seconds to compact a 6K-token context of SmolLM2-135M on the CPU (benchmark, not a test).

Run: OMP_NUM_THREADS=2 python reports/compaction-cpu-6k/time_6k.py > reports/compaction-cpu-6k/result.jsonl

`prefill` reads the context with dense attention and records its queries in the same pass; "compact"
is the `compact()` call alone. With `queries=("repeat",)` compaction makes its own teacher-forced repeat
pass over twice the context, and that pass is included in its seconds.
"""
import json
import platform
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sparsemem
from sparsemem.corpus import python_reference_docs, token_window
from sparsemem.default_model import default_model_dir

torch.manual_seed(0)
folder = default_model_dir()
tokenizer = AutoTokenizer.from_pretrained(folder)
model = sparsemem.convert(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())
ids = torch.tensor([token_window(tokenizer, python_reference_docs(), 6144, offset=20000)])
start = time.perf_counter()
full, recorded = sparsemem.prefill(model, ids)
prefill = time.perf_counter() - start
print(json.dumps(dict(step="prefill (dense, queries recorded)", context=ids.shape[1], seconds=round(prefill, 2))), flush=True)
runs = [("am", ("context",)), ("streaming-llm", ("context",)), ("am", ("repeat",))]
for method, queries in runs:
    import copy

    cache = copy.deepcopy(full)
    start = time.perf_counter()
    if queries == ("context",):
        sparsemem.compact(model, cache, 10, method=method, reference_queries=recorded)
    else:
        sparsemem.compact(model, cache, 10, method=method, input_ids=ids, queries=queries, tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    print(json.dumps(dict(step="compact", method=method, queries=list(queries), ratio=10, context=ids.shape[1],
                          seconds=round(seconds, 2), bytes_ratio=round(full.memory_bytes()["total"] / cache.memory_bytes()["total"], 2))),
          flush=True)
print(json.dumps({"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__}))
