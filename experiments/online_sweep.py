"""Which online-compaction settings keep generation closest to the full cache under a memory budget.

The same measurement as `sparsemem eval online` (a real text decoded token by token, teacher-forced, under
`max_kv_tokens`; mean next-token KL and perplexity against the unbounded cache), for configurations of
`sparsemem.OnlineCompaction` that the CLI does not expose. SmolLM2-135M-Instruct as a dense-equivalent sparsemem
model, so the compaction is the only approximation. A configuration is the JSON object `stream_sweep.py` takes:
`method`, `online` (fields of `OnlineCompaction`, e.g. `{"recent_fraction": 0.75}`) and `press` (fields of the
press it sets up, e.g. `{"exact_newest": 0.9}`). One JSON line per (configuration, budget).

    python experiments/online_sweep.py --budgets 256 512 \
        --configs '[{"method": "am"}, {"method": "am", "online": {"recent_fraction": 0.75}, "press": {"exact_newest": 0.9}}]' \
        > reports/online-sweep-cpu/sweep.jsonl
"""

import argparse
import dataclasses
import json

import torch

from harness import online_compaction, parse_json
from sparsemem.corpus import load_corpus
from sparsemem.evaluation_compaction import evaluate_online
from sparsemem.machine import device_name


def run(model, tokenizer, corpus, configs: list[dict], budgets, context: int, steps: int) -> list[dict]:
    """The rows of the configurations, one per configuration and budget (the full cache's row left out), all
    against one full-cache reference."""
    for config in configs:  # every configuration is checked before the first run
        online_compaction(config, max(budgets), model.config.sink_tokens)
    by_label = {f"config {index}": config for index, config in enumerate(configs)}  # the results' method names
    results, _ = evaluate_online(
        model, tokenizer, corpus, methods=list(by_label), budgets=budgets, context=context, steps=steps,
        make_online=lambda budget, label: online_compaction(by_label[label], budget, model.config.sink_tokens),
    )
    return [{**dataclasses.asdict(result), "config": by_label[result.method], "method": by_label[result.method].get("method", "am")}
            for result in results if result.method != "full"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--context", type=int, default=1024, help="tokens read before decoding")
    parser.add_argument("--steps", type=int, default=512, help="teacher-forced decode steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--configs", type=lambda text: parse_json(text, "--configs", list), default=[{"method": "am"}],
                        help="JSON list of configurations (see the module's description)")
    args = parser.parse_args(argv)
    from sparsemem import convert
    from sparsemem.default_model import load_model

    _, tokenizer, base = load_model(None, args.device, args.dtype)
    model = convert(base, top_k_blocks=None, block_fraction=None)
    corpus = load_corpus(None)
    for row in run(model, tokenizer, corpus, args.configs, args.budgets, args.context, args.steps):
        print(json.dumps(row), flush=True)
    print(json.dumps({"device": device_name(args.device), "torch": torch.__version__, "dtype": args.dtype,
                      "context": args.context, "steps": args.steps}), flush=True)


if __name__ == "__main__":
    main()
