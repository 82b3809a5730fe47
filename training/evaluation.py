"""Held-out evaluation of a calibrated scorer: perplexity of dense attention, the training-free minmax
and hybrid scorers and the learned scorer (after phase 1 and after phase 2) at the same block budget, on real text
the calibration did not see. Densities are measured, not assumed: the budget is shared, so the learned
and training-free selections attend the same number of pairs. A run with `block_slots` also gets the
training-free scorer with untrained block slots and the learned scorer without them; the densities then
count the slot pairs too.
"""

import copy
import json
import logging
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from sparsemem.atomic import write_text
from sparsemem.conversion import convert
from sparsemem.machine import device_name
from sparsemem.plots import plot_scorer
from sparsemem.default_model import resolve_model

logger = logging.getLogger(__name__)


def run_base_model(run: dict) -> str:
    """The base checkpoint of a run: its resolved folder when present here, else the recipe's name
    (a run copied from another machine)."""
    resolved = run.get("resolved_base_model")
    return resolved if resolved and Path(resolved).is_dir() else resolve_model(run["base_model"])


@torch.no_grad()
def negative_log_likelihood(model, ids: torch.Tensor) -> float:
    logits = model(ids[None].to(model.device), use_cache=False).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[1:].to(logits.device))
    if not torch.isfinite(nll):
        raise FloatingPointError("non-finite loss in the scorer evaluation")
    return nll.item()


def _density(model):
    stats = model.sparsemem_stats() if hasattr(model, "sparsemem_stats") else None
    return stats["density"] if stats else None


def evaluate_scorer(run_dir, lengths=(4096, 8192), block_fraction: float = 0.1, device=None, dtype="float32",
                    output: Path | None = None, max_windows: int | None = None, block_masses=()) -> dict:
    """Evaluate the run in `run_dir` (a calibration output folder); writes scorer.json / scorer.md.

    At each length the held-out tokens are cut into consecutive windows of that length (at most
    `max_windows`) and every model's loss is the mean over them, so one stretch of unusual text (a table
    copied from earlier in the window) does not decide the comparison alone. Each of `block_masses` adds
    the final learned scorer selecting by that mass threshold (`block_mass`, at least `top_k_blocks`
    blocks, no fraction cap), whose measured density shows what the threshold spends."""
    from transformers import AutoModelForCausalLM

    run_dir = Path(run_dir)
    run = json.loads((run_dir / "final" / "run.json").read_text())
    heldout = run_dir / "heldout.safetensors"
    if not heldout.is_file():
        raise FileNotFoundError(f"{heldout} is missing: the recipe had no `data.eval`")
    ids = load_file(heldout)["input_ids"]
    too_long = [n for n in lengths if n > ids.numel()]
    if too_long:
        raise ValueError(f"eval lengths {too_long} exceed the {ids.numel()} held-out tokens")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"`max_windows` must be a positive integer, got {max_windows!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = AutoModelForCausalLM.from_pretrained(run_base_model(run), dtype=getattr(torch, dtype), attn_implementation="sdpa")
    base = base.to(device).eval()
    options = {**run["sparsemem"], "block_fraction": block_fraction}
    slots = options.get("block_slots")
    plain = {**options, "block_slots": None}  # the training-free baselines drop unselected blocks
    models = {
        "dense": base,
        "training-free (minmax)": convert(base, **{**plain, "scorer": "minmax"}),
        "training-free (hybrid)": convert(base, **{**plain, "scorer": "hybrid"}),
    }
    if slots is not None:  # what the consolidator's initialisation alone gives
        models[f"training-free (minmax), untrained block_slots={slots}"] = convert(base, **{**options, "scorer": "minmax"})
    phase1 = run_dir / "phase1_modules.safetensors"
    final = load_file(run_dir / "final" / "sparsemem_modules.safetensors")
    if phase1.is_file() and run.get("lora") is None and run.get("phase2_steps", 1) > 0:
        learned = convert(base, **options)
        learned.load_sparsemem_modules(load_file(phase1))
        models["learned (phase 1)"] = learned
    source = copy.deepcopy(base) if run.get("lora") else base
    learned = convert(source, **options)
    learned.load_sparsemem_modules(final)
    models["learned (final)"] = learned
    if slots is not None:  # the trained scorer alone, unselected blocks dropped
        alone = convert(source, **plain)
        alone.load_sparsemem_modules({k: v for k, v in final.items() if ".consolidator." not in k})
        models["learned (final), no block slots"] = alone
    for share in block_masses:
        adaptive = convert(source, **{**options, "block_fraction": None, "block_mass": share})
        adaptive.load_sparsemem_modules(final)
        models[f"learned (final), block_mass={share:g}"] = adaptive

    rows = []
    for length in lengths:
        count = ids.numel() // length if max_windows is None else min(ids.numel() // length, max_windows)
        windows = ids[: count * length].view(count, length)
        dense_nll = None
        for name, model in models.items():
            if hasattr(model, "reset_sparsemem_stats"):
                model.reset_sparsemem_stats()
            start = time.perf_counter()
            per_window = [negative_log_likelihood(model, window) for window in windows]
            nll = sum(per_window) / count
            seconds = time.perf_counter() - start
            dense_nll = nll if name == "dense" else dense_nll
            rows.append({
                "model": name, "length": length, "windows": count, "perplexity": math.exp(nll), "nll": nll,
                "nll_gap": nll - dense_nll, "perplexity_gap": math.exp(nll) - math.exp(dense_nll),
                "window_nll": per_window, "density": _density(model), "seconds": round(seconds, 2),
            })
            logger.info("%s @ %d: ppl %.4f density %s", name, length, math.exp(nll), rows[-1]["density"])
    meta = {
        "run": str(run_dir), "base_model": run["base_model"], "options": options, "calibration_steps": run["steps"],
        "calibration_tokens": run["tokens"], "calibration_device": run.get("device"),
        "eval_tokens": f"consecutive windows of the last {ids.numel()} tokens of {run.get('eval_data')}, held out from calibration",
        "device": device_name(device),
        "dtype": dtype, "torch": torch.__version__,
        "block_masses": list(block_masses),
    }
    report = {"meta": meta, "rows": rows}
    output = Path(output) if output else run_dir / "eval"
    output.mkdir(parents=True, exist_ok=True)
    write_text(output / "scorer.json", json.dumps(report, indent=1))
    write_text(output / "scorer.md", render_markdown(report))
    plot_scorer(rows, output / "scorer.png")
    return report


def render_markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [f"# Learned scorer vs training-free: {meta['base_model']}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "| length | windows | model | perplexity | gap to dense | density |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        density = f"{r['density']:.1%}" if r["density"] else "100%"
        gap = "-" if r["model"] == "dense" else f"{r['perplexity_gap']:+.4f} ({r['nll_gap']:+.4f} nats)"
        lines.append(f"| {r['length']} | {r.get('windows', 1)} | {r['model']} | {r['perplexity']:.4f} | {gap} | {density} |")
    return "\n".join(lines) + "\n"
