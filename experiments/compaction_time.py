"""Seconds to compact a long context of SmolLM2-135M on the CPU (a benchmark, not a test).

Measures: `sparsemem.prefill` (dense attention, the context queries recorded in the same pass), then the
`sparsemem.compact` call alone for AM and StreamingLLM fitted on those recorded queries, and AM with
`queries=("repeat",)`, whose own teacher-forced pass over twice the context is included in its seconds.
Each row also gives the physical bytes ratio; the last line the CPU, threads and torch version.

Writes `reports/compaction-cpu-6k/result*.jsonl` (the README's 6K timings):

    OMP_NUM_THREADS=2 python experiments/compaction_time.py > reports/compaction-cpu-6k/result.jsonl
"""

import argparse
import copy
import json
import platform
import time

import torch

import sparsemem
from harness import default_corpus, load_default_model
from sparsemem.corpus import token_window

# (method, reference query sources): from the recorded context queries, and AM's own repeat pass
RUNS = (("am", ("context",)), ("streaming-llm", ("context",)), ("am", ("repeat",)))


def run(model, tokenizer, ids, ratio=10.0, runs=RUNS):
    """Yield the prefill's row, then one row per (method, sources) of `runs`."""
    start = time.perf_counter()
    full, recorded = sparsemem.prefill(model, ids)
    yield {"step": "prefill (dense, queries recorded)", "context": ids.shape[1], "seconds": round(time.perf_counter() - start, 2)}
    for method, queries in runs:
        cache = copy.deepcopy(full)
        start = time.perf_counter()
        if queries == ("context",):
            sparsemem.compact(model, cache, ratio, method=method, queries=queries, reference_queries=recorded)
        else:
            sparsemem.compact(model, cache, ratio, method=method, input_ids=ids, queries=queries, tokenizer=tokenizer)
        seconds = time.perf_counter() - start
        yield {"step": "compact", "method": method, "queries": list(queries), "ratio": ratio, "context": ids.shape[1],
               "seconds": round(seconds, 2), "bytes_ratio": round(full.memory_bytes()["total"] / cache.memory_bytes()["total"], 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=6144, help="context tokens")
    parser.add_argument("--ratio", type=float, default=10.0)
    parser.add_argument("--offset", type=int, default=20000, help="corpus token the context starts at")
    parser.add_argument("--text", default=None, help="a text file instead of Python's reference documentation")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_default_model()
    ids = torch.tensor([token_window(tokenizer, default_corpus(args.text), args.tokens, offset=args.offset)])
    for row in run(model, tokenizer, ids, args.ratio):
        print(json.dumps(row), flush=True)
    print(json.dumps({"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
