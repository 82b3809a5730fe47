"""Which RoPE positions a constant-memory stream should give what it holds, measured on SmolLM2-135M.

One stream per configuration (method x `positions` x `place_slots`) of the same real text (the standard
library's sources) through `sparsemem.stream.stream` under online compaction. Each row gives the mean
next-token loss over the chunks after the first two (every later chunk reads a compacted cache), the same
targets from the chunk alone ("no memory"), and the seconds spent compacting and re-rotating keys.

- `positions="logical"`: every token keeps its position in the whole stream (exact distances; beyond the
  trained context they leave the trained range).
- `positions="cache"`: every held entry at its rank in the cache's time order (keys re-rotated when entries
  leave); `place_slots` fits AM's slots where the layout puts them instead of where their keys were chosen.

Writes one JSON line per configuration (`reports/stream-positions-cpu/result.jsonl`):

    OMP_NUM_THREADS=2 python experiments/stream_positions.py --tokens 8192 --chunk 512 --budget 1024 \
        > reports/stream-positions-cpu/result.jsonl
"""

import argparse
import json
import platform
import time

import torch

import sparsemem
from harness import load_default_model
from sparsemem.stream import stream

CONFIGS = (("streaming-llm", "cache", True), ("am", "cache", True), ("am", "cache", False),
           ("streaming-llm", "logical", True), ("am", "logical", True))


def run(model, tokenizer, method: str, positions: str, place_slots: bool, tokens: int, chunk: int, budget: int) -> dict:
    """One stream; its losses averaged over the chunks after the first two."""
    model = sparsemem.convert(model, positions=positions)
    online = sparsemem.OnlineCompaction(budget, keep_first=model.config.sink_tokens, method=method, place_slots=place_slots)
    start = time.perf_counter()
    result, _ = stream(model, tokenizer, tokens, chunk=chunk, budget=budget, method=method, progress=False, online=online)
    later = result.records[2:]
    count = sum(r["chunk_tokens"] for r in later)

    def mean(key):
        return round(sum(r[key] * r["chunk_tokens"] for r in later) / count, 4) if count else None

    return dict(method=method, positions=positions, place_slots=place_slots, tokens=tokens, chunk=chunk, budget=budget,
                loss=mean("loss"), no_memory=mean("loss_no_memory"), chunk_losses=[round(r["loss"], 3) for r in result.records],
                compaction_seconds=round(result.summary["compaction_seconds"], 1),
                layout_seconds=round(result.summary["layout_seconds"], 1), seconds=round(time.perf_counter() - start, 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--configs", type=json.loads, default=None,
                        help='JSON list of [method, positions, place_slots], e.g. \'[["am", "cache", true]]\'')
    args = parser.parse_args()
    model, tokenizer = load_default_model()
    for method, positions, place_slots in args.configs or CONFIGS:
        print(json.dumps(run(model, tokenizer, method, positions, bool(place_slots), args.tokens, args.chunk, args.budget)), flush=True)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                      "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
