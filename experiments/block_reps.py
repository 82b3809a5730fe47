"""Pass keys and perplexity of SmolLM2-135M with large (GPU-sized) blocks, by block scorer (CPU).

Block-sparse GPU kernels want blocks of 64 or 128 tokens. The "minmax" bound of such a block loosens
(each dimension takes its extreme over every key of the block), so the block holding a needle no longer
ranks high; "subminmax" scores each block by its best sub-block's bound. This script runs the pass-key
cases and the perplexity of `sparsemem eval retrieval` (the same `evaluate_model`) for a list of
configurations on one loaded model, and reports each configuration's measured attention density next
to its quality. One JSON line per configuration on stdout; with `--output`, all of them in one JSON file
(written atomically). reports/block-reps-cpu/ holds the results (README.md: the table and the commands).

    OMP_NUM_THREADS=1 python experiments/block_reps.py --configs '[{"name": "dense"},
        {"name": "b64-minmax", "block_size": 64, "top_k_blocks": 2, "block_fraction": 0.1}]' --output out.json

A configuration is a JSON object: "name", then sparsemem options (`sparsemem.convert`); {"name": "dense"}
alone is the base model with SDPA attention.
"""

import argparse
import json
import platform
import time

import torch

import sparsemem
from sparsemem.atomic import write_text
from sparsemem.corpus import load_corpus
from sparsemem.evaluation import evaluate_model

from harness import parse_json


def load_base_model():
    """SmolLM2-135M-Instruct (`sparsemem.default_model`) in fp32 with SDPA attention: (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsemem.default_model import resolve_model

    path = resolve_model(None)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    return base, AutoTokenizer.from_pretrained(path)


def run_config(spec: dict, base, tokenizer, corpus, lengths, depths, ppl_length) -> dict:
    options = {name: value for name, value in spec.items() if name != "name"}
    model = base if spec["name"] == "dense" and not options else sparsemem.convert(base, **options)
    report = evaluate_model(spec["name"], model, tokenizer, corpus, lengths, depths, ppl_length)
    densities = [case.density for case in report.passkey if case.density is not None]
    return {
        "name": spec["name"],
        "options": options,
        "passkeys_correct": sum(case.correct for case in report.passkey),
        "passkeys": len(report.passkey),
        "passkey_density": sum(densities) / len(densities) if densities else None,
        "perplexity": report.perplexity,
        "perplexity_tokens": report.perplexity_tokens,
        "perplexity_density": report.perplexity_density,
        "cases": [
            {"length": c.length, "depth": c.depth, "passkey": c.passkey, "answer": c.answer, "correct": c.correct, "density": c.density}
            for c in report.passkey
        ],
        "seconds": round(report.seconds, 1),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", required=True, help='JSON list of configurations: {"name": ..., sparsemem options}')
    parser.add_argument("--lengths", type=int, nargs="+", default=[4000, 7000], help="pass-key prompt lengths")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8], help="pass-key depths")
    parser.add_argument("--ppl-length", type=int, default=4000, help="tokens of real text for perplexity (0 to skip)")
    parser.add_argument("--text", nargs="*", default=None, help="text files for the haystack (default: Python reference docs)")
    parser.add_argument("--output", default=None, help="JSON file for all the results")
    args = parser.parse_args(argv)
    specs = parse_json(args.configs, "--configs", list)
    for spec in specs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise SystemExit(f'--configs: every configuration needs a "name", got {spec!r}')
    base, tokenizer = load_base_model()
    corpus = load_corpus(args.text)
    rows = []
    for spec in specs:
        row = run_config(spec, base, tokenizer, corpus, args.lengths, args.depths, args.ppl_length)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.output:
        meta = {
            "model": "SmolLM2-135M-Instruct (sparsemem.default_model), float32",
            "corpus": f"{corpus.source} (sha256 {corpus.sha256})",
            "lengths": args.lengths, "depths": args.depths, "ppl_length": args.ppl_length,
            "device": f"cpu ({platform.machine()}), {torch.get_num_threads()} threads", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
        }
        write_text(args.output, json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
