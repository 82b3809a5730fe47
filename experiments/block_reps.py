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

`--mass-recall LENGTH DEPTH` measures instead the share of the dense attention of the prompt's last query
that the sinks, the recent window and the blocks a scorer selects hold (mean over layers, KV heads and
query heads), for the same token budget at every block size: how much a scorer, and how much the block
size alone, costs. Its configurations name "block_size" and "scorer" ("minmax", "subminmax" with
"scorer_sub_block", or "oracle": the blocks holding the most dense attention).

    OMP_NUM_THREADS=1 python experiments/block_reps.py --mass-recall 6000 0.25 --budgets 0.1 0.14 \
        --configs '[{"name": "b64-oracle", "block_size": 64, "scorer": "oracle"}]'
"""

import argparse
import json
import math
import platform
import time

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import sparsemem
from sparsemem.atomic import write_text
from sparsemem.corpus import load_corpus, passkey_case
from sparsemem.evaluation import evaluate_model
from sparsemem.modeling.scorer import PooledKeyScorer, summarize_contiguous_blocks
from sparsemem.modeling.selection import select_blocks

from harness import parse_json


def load_base_model():
    """SmolLM2-135M-Instruct (`sparsemem.default_model`) in fp32 on the CPU with SDPA attention: (model, tokenizer)."""
    from sparsemem.default_model import load_model

    _, tokenizer, base = load_model(None, "cpu", "float32")
    return base, tokenizer


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


@torch.no_grad()
def last_query_states(model, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(query of the last position [1, H, 1, D], keys [1, Hkv, N, D]) of every layer, RoPE applied, from one
    dense (SDPA) forward pass of `model`."""
    states = []

    def capture(module, query, key, value, attention_mask, **kwargs):
        states.append((query[:, :, -1:].float(), key.float()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("block_reps_capture", capture)
    previous = model.config._attn_implementation
    model.set_attn_implementation("block_reps_capture")
    try:
        model(input_ids, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return states


def block_scores(spec: dict, query: torch.Tensor, keys: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Scores [B, Hkv, nb] of the blocks of `keys` for `query` [B, Hkv, G, 1, D]; "oracle": the dense
    attention `probs` [B, Hkv, G, N] each block holds (its best query head's)."""
    block_size, total = spec["block_size"], keys.shape[-2]
    num_blocks = math.ceil(total / block_size)
    if spec["scorer"] == "oracle":
        block_ids = torch.arange(total) // block_size
        return probs.new_zeros(*probs.shape[:-1], num_blocks).index_add_(-1, block_ids, probs).amax(2)
    scorer = PooledKeyScorer(spec["scorer"], spec.get("scorer_sub_block"))
    summaries = summarize_contiguous_blocks(keys, block_size, num_blocks, scorer.sub_block)
    return scorer(query, summaries)[:, :, 0]


def mass_recall(states, specs, budgets, sink: int = 16, local: int = 64):
    """Rows of (configuration, budget): the dense attention share the anchors and the selected blocks hold,
    with `budget` x N tokens per query (sinks and window included) spent on as many whole blocks as fit."""
    total = states[0][1].shape[-2]
    positions = torch.arange(total)
    anchors = (positions < sink) | (positions > total - 1 - local)
    for budget in budgets:
        for spec in specs:
            block_size = spec["block_size"]
            top_k = max(1, (int(budget * total) - sink - local) // block_size)
            num_blocks = math.ceil(total / block_size)
            block_ids = torch.arange(num_blocks)
            candidates = (block_ids >= sink // block_size) & (block_ids <= (total - 1 - local) // block_size)
            shares = []
            for query, keys in states:
                batch, heads, _, dim = query.shape
                kv_heads = keys.shape[1]
                query = query.view(batch, kv_heads, heads // kv_heads, 1, dim)
                logits = torch.einsum("bhgqd,bhnd->bhgn", query, keys) / math.sqrt(dim)
                probs = logits.softmax(-1)
                scores = block_scores(spec, query, keys, probs)
                selected = select_blocks(scores[:, :, None], candidates.view(1, 1, 1, -1), top_k)[:, :, 0]
                kept = selected[:, :, positions // block_size] | anchors  # [B, Hkv, N]
                shares.append((probs * kept[:, :, None]).sum(-1).mean())
            shares = torch.stack(shares)
            if not torch.isfinite(shares).all():
                raise FloatingPointError(f"non-finite attention share for {spec['name']}")
            yield {"name": spec["name"], "budget": budget, "blocks": top_k, "tokens": sink + local + top_k * block_size,
                   "mass_recall": round(float(shares.mean()), 4), "worst_layer": round(float(shares.min()), 4)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", required=True, help='JSON list of configurations: {"name": ..., sparsemem options}')
    parser.add_argument("--lengths", type=int, nargs="+", default=[4000, 7000], help="pass-key prompt lengths")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8], help="pass-key depths")
    parser.add_argument("--ppl-length", type=int, default=4000, help="tokens of real text for perplexity (0 to skip)")
    parser.add_argument("--text", nargs="*", default=None, help="text files for the haystack (default: Python reference docs)")
    parser.add_argument("--output", default=None, help="JSON file for all the results")
    parser.add_argument("--mass-recall", nargs=2, type=float, metavar=("LENGTH", "DEPTH"), default=None,
                        help="the last query's dense attention share kept, on the pass-key prompt LENGTH, DEPTH")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.14], help="token budgets of --mass-recall, shares of N")
    args = parser.parse_args(argv)
    specs = parse_json(args.configs, "--configs", list)
    for spec in specs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise SystemExit(f'--configs: every configuration needs a "name", got {spec!r}')
        if args.mass_recall and not (isinstance(spec.get("block_size"), int) and spec.get("scorer") in ("minmax", "subminmax", "oracle")):
            raise SystemExit(f'--mass-recall: every configuration needs "block_size" and "scorer" (minmax, subminmax, oracle), got {spec!r}')
    base, tokenizer = load_base_model()
    corpus = load_corpus(args.text)
    rows = []
    if args.mass_recall:
        case = passkey_case(tokenizer, corpus, int(args.mass_recall[0]), args.mass_recall[1])
        states = last_query_states(base, torch.tensor([case.input_ids]))
        results = mass_recall(states, specs, args.budgets)
    else:
        results = (run_config(spec, base, tokenizer, corpus, args.lengths, args.depths, args.ppl_length) for spec in specs)
    for row in results:
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.output:
        meta = {
            "model": "SmolLM2-135M-Instruct (sparsemem.default_model), float32",
            "corpus": f"{corpus.source} (sha256 {corpus.sha256})",
            **({"mass_recall_case": args.mass_recall, "budgets": args.budgets} if args.mass_recall else
               {"lengths": args.lengths, "depths": args.depths, "ppl_length": args.ppl_length}),
            "device": f"cpu ({platform.machine()}), {torch.get_num_threads()} threads", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
        }
        write_text(args.output, json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
