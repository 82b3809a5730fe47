"""Held-out gap to dense of the calibrated learned scorer: fixed budgets (`block_fraction`) against
mass thresholds (`block_mass`), each with the density it measured, on the first held-out windows.

    python density_curve.py --length 4096 --windows 2 --fractions 0.09 0.1 0.196 0.317 --masses 0.6 0.7 0.8 0.9 > curve.jsonl
"""
import argparse
import json
import math

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sparsemem import convert
from sparsemem.training.evaluation import negative_log_likelihood, run_base_model

parser = argparse.ArgumentParser()
parser.add_argument("--run", default="reports/calibration-smollm2-h200/run")
parser.add_argument("--length", type=int, default=4096)
parser.add_argument("--windows", type=int, default=2)
parser.add_argument("--fractions", type=float, nargs="*", default=[])
parser.add_argument("--masses", type=float, nargs="*", default=[])
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = parser.parse_args()

torch.set_grad_enabled(False)
run = json.load(open(f"{args.run}/final/run.json"))
ids = load_file(f"{args.run}/heldout.safetensors")["input_ids"][: args.windows * args.length].view(args.windows, args.length)
base = AutoModelForCausalLM.from_pretrained(run_base_model(run), dtype=torch.float32, attn_implementation="sdpa").to(args.device).eval()
modules = load_file(f"{args.run}/final/sparsemem_modules.safetensors")
dense = sum(negative_log_likelihood(base, w.to(args.device)) for w in ids) / args.windows
settings = [("block_fraction", f, {"block_fraction": f}) for f in args.fractions]
settings += [("block_mass", m, {"block_fraction": None, "block_mass": m}) for m in args.masses]
for kind, value, override in settings:
    model = convert(base, **{**run["sparsemem"], **override})
    model.load_sparsemem_modules(modules)
    model.reset_sparsemem_stats()
    nll = sum(negative_log_likelihood(model, w.to(args.device)) for w in ids) / args.windows
    print(json.dumps({"length": args.length, "windows": args.windows, kind: value, "density": model.sparsemem_stats()["density"],
                      "nll_gap": nll - dense, "perplexity": math.exp(nll), "dense_perplexity": math.exp(dense)}), flush=True)
