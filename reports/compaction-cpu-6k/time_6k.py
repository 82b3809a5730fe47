"""Seconds to compact a 6K-token context of SmolLM2-135M on the CPU (benchmark, not a test).

Run: OMP_NUM_THREADS=2 python reports/compaction-cpu-6k/time_6k.py
"""
import json
import platform
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sparsemem
from sparsemem.compact import compact
from sparsemem.corpus import python_reference_docs, token_window
from sparsemem.default_model import default_model_dir

torch.manual_seed(0)
folder = default_model_dir()
tokenizer = AutoTokenizer.from_pretrained(folder)
model = sparsemem.convert(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())
ids = torch.tensor([token_window(tokenizer, python_reference_docs(), 6144, offset=20000)])
rows = []
for queries in (("repeat",),):
    for method in ("am", "kvzip", "streaming-llm"):
        cache = sparsemem.SparseMemCache(model.config)
        with torch.no_grad():
            start = time.perf_counter()
            model(ids, past_key_values=cache)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            compact(model, cache, 10, method=method, input_ids=ids, queries=queries, tokenizer=tokenizer)
            seconds = time.perf_counter() - start
        rows.append(dict(method=method, queries=list(queries), ratio=10, context=ids.shape[1], prefill_s=round(prefill, 2),
                         compact_s=round(seconds, 2)))
        print(json.dumps(rows[-1]), flush=True)
print(json.dumps({"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__}))
