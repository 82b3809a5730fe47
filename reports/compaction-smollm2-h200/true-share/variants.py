"""The CPU rows of this report: mean next-token KL of Attention Matching variants on the two-document harness.

    OMP_NUM_THREADS=2 python variants.py '{"en0": {"exact_newest": 0}}' '[5, 10, 20]' --whole-span-share none --reach 64

First argument: {name: AttentionMatchingPress options}; second: ratios. `--whole-span-share`: a share, "auto"
(default) or "none"; `--reach`: `REPEAT_REACH` (tokens of the repetition a repeat query reads besides the
context; "all" counts the whole repetition). The rows with the ranking normalised over the context alone
were measured at commit 77d1f7f with the `exact_newest` options; prints one JSON line per result.
"""
import argparse
import importlib
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sparsemem
from sparsemem.corpus import load_corpus
from sparsemem.default_model import resolve_model
from sparsemem.evaluation_compaction import evaluate_compaction
from sparsemem.modeling import compaction

parser = argparse.ArgumentParser()
parser.add_argument("variants", type=json.loads)
parser.add_argument("ratios", type=json.loads)
parser.add_argument("--documents", type=int, default=2)
parser.add_argument("--whole-span-share", default="auto")
parser.add_argument("--reach", default=None)
args = parser.parse_args()
share = {"auto": "auto", "none": None}.get(args.whole_span_share) or float(args.whole_span_share)
if args.reach is not None:
    importlib.import_module("sparsemem.compact").REPEAT_REACH = None if args.reach == "all" else int(args.reach)
for name, options in args.variants.items():
    compaction.PRESSES[name] = lambda options=options: compaction.AttentionMatchingPress(**options)
path = resolve_model(None)
tokenizer = AutoTokenizer.from_pretrained(path)
model = sparsemem.convert(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), top_k_blocks=None, block_fraction=None)
results, _ = evaluate_compaction(model, tokenizer, load_corpus(None), methods=list(args.variants), ratios=args.ratios,
                                 needle_depths=(), documents=args.documents, whole_span_share=share)
for r in results[1:]:
    print(json.dumps({"method": r.method, "ratio": r.ratio, "whole_span_share": share, "reach": args.reach, "kl": round(r.kl, 4)}))
