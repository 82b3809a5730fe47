"""Next-token KL to the full cache after compaction, for any set of `sparsemem.compact` settings.

Measures: the mean next-token KL of a real continuation read through the compacted cache against the full
cache, the seconds `compact` took and the physical bytes ratio, on the evaluation's documents (Python's
reference documentation from token 20000, 3000 context + 512 continuation tokens; `--documents 2` is the
two-document harness of `sparsemem eval compaction --documents 2`, averaged). Each config is a JSON
object: "method" (a press name, default "am"), "press" (that press's options, e.g. {"exact_newest": 0}),
"queries" (reference query sources, default ["repeat"]; H2O and SnapKV are published with ["context"]),
"ratios" (overrides `--ratios`), "tag", "budgets" (a head-budget policy's name, or {"policy": name, its
options}), and any other `sparsemem.compact` argument. One JSON line per
(config, ratio) on stdout. The configs come before the options.

Writes the JSON-lines tables of `reports/compaction-cpu-global/` (kl_*.jsonl: head budgets, splits,
learned consolidation, on-policy fits) and the CPU rows of `reports/compaction-smollm2-h200/true-share/`.

    OMP_NUM_THREADS=2 python experiments/compaction_kl.py \
        '{"method": "am"}' '{"method": "kvzip"}' '{"method": "h2o", "queries": ["context"]}' > kl.jsonl
    OMP_NUM_THREADS=2 python experiments/compaction_kl.py '{"method": "am-learned", "press": {"max_ratio": null}}'
    OMP_NUM_THREADS=2 python experiments/compaction_kl.py '{"on_policy": true}' --ratios 10 20 50
    OMP_NUM_THREADS=2 python experiments/compaction_kl.py '{"press": {"exact_newest": 0}, "budgets": {"policy": "global", "whole_span_share": null}}' --documents 2 --ratios 5 10 20
    OMP_NUM_THREADS=2 python experiments/compaction_kl.py '{"budgets": "uniform"}' '{"budgets": {"policy": "uniform", "chunk_size": 512}}'
"""

import argparse
import json

from harness import Document, build_press, default_corpus, load_default_model, parse_json


def run(model, tokenizer, corpus, configs, ratios, length=3000, continuation=512, offset=20000, documents=1):
    """Yield one result row per (config, ratio): the config's own fields, then ratio, KL, seconds, bytes
    ratio (KL and seconds averaged over `documents` consecutive windows; unrounded)."""
    if documents < 1:
        raise ValueError(f"`documents` must be >= 1, got {documents}")
    docs = [Document(model, tokenizer, corpus, length, continuation, offset + number * (length + continuation))
            for number in range(documents)]
    for config in configs:
        options = dict(config)
        tag = options.pop("tag", "")
        press = build_press(options.pop("method", "am"), options.pop("press", None))
        queries = options.pop("queries", ["repeat"])
        for ratio in options.pop("ratios", ratios):
            rows = [doc.measure(ratio, queries=queries, method=press, **options) for doc in docs]
            yield {"tag": tag, **config, "ratio": ratio, "kl": sum(r["kl"] for r in rows) / documents,
                   "sec": sum(r["sec"] for r in rows) / documents, "bytes": rows[0]["bytes"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", help="JSON objects: method, press, queries, ratios, tag, compact() arguments")
    parser.add_argument("--ratios", type=float, nargs="+", default=[5, 10, 20, 50, 100])
    parser.add_argument("--length", type=int, default=3000, help="context tokens")
    parser.add_argument("--continuation", type=int, default=512, help="continuation tokens the KL is measured on")
    parser.add_argument("--offset", type=int, default=20000, help="corpus token of the first document")
    parser.add_argument("--documents", type=int, default=1, help="consecutive documents averaged")
    parser.add_argument("--text", default=None, help="a text file instead of Python's reference documentation")
    args = parser.parse_args(argv)
    configs = [parse_json(text, f"config {number + 1}", dict) for number, text in enumerate(args.configs)]
    model, tokenizer = load_default_model()
    for row in run(model, tokenizer, default_corpus(args.text), configs, args.ratios, args.length, args.continuation,
                   args.offset, args.documents):
        print(json.dumps({**row, "kl": round(row["kl"], 4), "sec": round(row["sec"], 1), "bytes": round(row["bytes"], 2)}), flush=True)


if __name__ == "__main__":
    main()
