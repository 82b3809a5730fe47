"""Uniform-budget Attention Matching against the public reference implementation, side by side (CPU).

Both sides compact the same full cache of the evaluation's document (3000 tokens of Python's reference
documentation from token 20000) with the same reference queries (the repeat pass, subsampled by
`sparsemem.compact` exactly once, handed to both), every KV head of every layer to the same budget of
ceil(3000 / ratio) entries, and are measured by the mean next-token KL to the full cache on the 512 tokens
that follow. The reference's algorithm runs inside `sparsemem.compact` as a press: for each (layer, KV
head) it gets that head's span keys, values and pooled queries and returns its chosen keys, beta and values,
which the cache then holds as slots, exactly as our own press's.

The reference is the official code of "Fast KV Compaction via Attention Matching" (arXiv 2602.16284), used
from a checkout given by `--reference PATH` or the `AM_REFERENCE` environment variable; its highest-attention
algorithm (`HighestAttentionKeysCompaction`) runs with its `AM-HighestAttnKeys-basic` settings (RMS score,
NNLS by clamped least squares plus 2 projected-gradient steps with beta in [-3, 3], values by least squares).
Two arrangements of the reference: "whole" (it compacts the whole document into the budget, as published)
and "sinks" (the same exact first/last tokens as ours, the rest of the budget its slots). Without a checkout
only our side runs, and the output says so.

Each of our configurations is a JSON object as in `compaction_kl.py` ("method", "press" options, other
`sparsemem.compact` arguments, "tag"); `budgets` is always "uniform". Writes `results.json` and
`table.md` into `--output` (the files of `reports/am-reference-cpu/`) and one JSON line per row on stdout.

    OMP_NUM_THREADS=2 python experiments/am_reference.py --reference /tmp/am-ref --output reports/am-reference-cpu
    OMP_NUM_THREADS=2 python experiments/am_reference.py --ratios 10 '{"tag": "no exact newest", "press": {"exact_newest": 0}}'
    OMP_NUM_THREADS=2 python experiments/am_reference.py --reference /tmp/am-ref --arrangements sinks --offset 23512
"""

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

import torch

import sparsemem.atomic
from harness import Document, build_press, default_corpus, load_default_model, parse_json
from sparsemem.modeling.compaction import Press

logger = logging.getLogger("am_reference")

# the reference's `AM-HighestAttnKeys-basic` configuration (evaluation/configs/algorithms/default.py)
REFERENCE_SETTINGS = {"score_method": "rms", "nnls_iters": 2, "nnls_lower_bound": math.exp(-3),
                      "nnls_upper_bound": math.exp(3), "c2_method": "lsq"}
ARRANGEMENTS = {"whole": {"keep_first": 0, "keep_last": 0}, "sinks": {}}


def load_reference(path):
    """The reference's highest-attention algorithm class from a checkout of its repository, or None."""
    if not path:
        return None
    root = Path(path)
    source = root / "compaction" / "algorithms" / "highest_attention_keys.py"
    if not source.is_file():
        raise SystemExit(f"--reference / AM_REFERENCE: {root} is not a checkout of the reference (no {source.relative_to(root)})")
    sys.path.insert(0, str(root))
    from compaction.algorithms.highest_attention_keys import HighestAttentionKeysCompaction

    return HighestAttentionKeysCompaction


class ReferencePress(Press):
    """A press that hands every (layer, KV head) problem to the reference algorithm, one at a time: its
    span keys [T, d], values [T, d] and pooled reference queries [n, d] (post-RoPE, fp32), and the budget."""

    def __init__(self, algorithm):
        self.algorithm = algorithm

    def compact(self, span, budget):
        problem = span.problem
        total = problem.keys.shape[1]
        if budget >= total:
            return super().compact(span, budget)
        if bool((problem.key_bias != 0).any()):
            raise ValueError("the reference press compacts plain tokens: the span holds slots with a beta")
        rows = []
        for b in range(problem.keys.shape[0]):
            keys, beta, values, indices = self.algorithm.compute_compacted_cache(
                problem.keys[b], problem.values[b], problem.queries[b], budget)
            index = torch.as_tensor(indices, device=problem.keys.device)
            order = index.argsort()  # slots in time order, as ours (each keeps its entry's rotation)
            rows.append((index[order], keys[order].float(), values[order].float(), beta[order].float()))
        return tuple(torch.stack(part) for part in zip(*rows))


def run(model, tokenizer, corpus, configs, ratios, reference=None, length=3000, continuation=512, offset=20000,
        arrangements=tuple(ARRANGEMENTS)):
    """Yield one row per (side, configuration, ratio): its KL, the seconds `compact` took, the bytes ratio."""
    unknown = sorted(set(arrangements) - set(ARRANGEMENTS))
    if unknown:
        raise ValueError(f"--arrangements: unknown {unknown}; choose from {sorted(ARRANGEMENTS)}")
    doc = Document(model, tokenizer, corpus, length, continuation, offset)
    rows = []
    if reference is not None:
        for name in arrangements:
            arrangement = ARRANGEMENTS[name]
            press = ReferencePress(reference(**REFERENCE_SETTINGS))
            rows.append(("reference", name, press, arrangement))
    for config in configs:
        options = dict(config)
        tag = options.pop("tag", json.dumps(config))
        if options.pop("budgets", "uniform") != "uniform":
            raise ValueError(f"configuration {config}: this comparison is of uniform head budgets")
        press = build_press(options.pop("method", "am"), options.pop("press", None))
        rows.append(("sparsemem", tag, press, options))
    for side, tag, press, options in rows:
        for ratio in ratios:
            result = doc.measure(ratio, queries=("repeat",), method=press, budgets="uniform", **options)
            yield {"side": side, "config": tag, **result}


def table(rows) -> str:
    ratios = sorted({row["ratio"] for row in rows})
    configs = list(dict.fromkeys((row["side"], row["config"]) for row in rows))
    kl = {(row["side"], row["config"], row["ratio"]): row["kl"] for row in rows}
    lines = ["| side | configuration | " + " | ".join(f"KL {r:g}x" for r in ratios) + " |",
             "|---|---|" + "---:|" * len(ratios)]
    for side, config in configs:
        cells = [f"{kl[(side, config, r)]:.4f}" if (side, config, r) in kl else "" for r in ratios]
        lines.append(f"| {side} | {config} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", help="our configurations (JSON objects); default: sparsemem's defaults")
    parser.add_argument("--reference", default=os.environ.get("AM_REFERENCE"),
                        help="checkout of the reference implementation (default: $AM_REFERENCE; absent: only our side runs)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[10, 50])
    parser.add_argument("--length", type=int, default=3000, help="context tokens")
    parser.add_argument("--continuation", type=int, default=512, help="continuation tokens the KL is measured on")
    parser.add_argument("--offset", type=int, default=20000, help="corpus token of the document")
    parser.add_argument("--arrangements", nargs="+", default=list(ARRANGEMENTS), choices=list(ARRANGEMENTS),
                        help="the reference's arrangements to run (default: all)")
    parser.add_argument("--output", default=None, help="folder for results.json and table.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    configs = [parse_json(text, f"config {number + 1}", dict) for number, text in enumerate(args.configs)] or [{"tag": "default"}]
    reference = load_reference(args.reference)
    if reference is None:
        logger.warning("no reference checkout given (--reference or AM_REFERENCE): only sparsemem's side runs")
    model, tokenizer = load_default_model()
    rows = []
    for row in run(model, tokenizer, default_corpus(), configs, args.ratios, reference, args.length, args.continuation, args.offset,
                   args.arrangements):
        rows.append(row)
        print(json.dumps({**row, "kl": round(row["kl"], 4), "sec": round(row["sec"], 1), "bytes": round(row["bytes"], 2)}), flush=True)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"arrangements": args.arrangements, "length": args.length, "continuation": args.continuation, "offset": args.offset, "queries": ["repeat"],
                "head_budgets": "uniform", "reference": None if reference is None else REFERENCE_SETTINGS,
                "torch": torch.__version__, "threads": torch.get_num_threads()}
        sparsemem.atomic.write_text(out / "results.json", json.dumps({"settings": meta, "rows": rows}, indent=1) + "\n")
        sparsemem.atomic.write_text(out / "table.md", table(rows))


if __name__ == "__main__":
    main()
