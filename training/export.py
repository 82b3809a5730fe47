"""Export a calibration run as Hub-ready checkpoints.

`OUTPUT/full/`: config, remote code, full safetensors weights, tokenizer and model card; loads with
`trust_remote_code=True` where sparsemem is not installed.
`OUTPUT/modules/`: the same config and code with only the learned modules (`sparsemem_modules.safetensors`,
plus the attention projections when LoRA was merged) and `sparsemem_base_model` naming the base
checkpoint they load on top of.
"""

import json
import logging
import string
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sparsemem.atomic import staged_directory
from sparsemem.convert import convert

from .evaluation import run_base_model

logger = logging.getLogger(__name__)


MODULES_FILE = "sparsemem_modules.safetensors"


def _card(template: str, **values) -> str:
    return string.Template(template).safe_substitute(values)


def load_card_template(path: Path | None = None) -> str:
    if path is not None:
        return Path(path).read_text(encoding="utf-8")
    return resources.files("sparsemem.hub_cards").joinpath("model_card.md").read_text(encoding="utf-8")


def _eval_table(run_dir: Path) -> str:
    report = run_dir / "eval" / "scorer.json"
    if not report.is_file():
        return "Not evaluated yet: run `sparsemem eval scorer --run RUN_DIR` before exporting."
    data = json.loads(report.read_text())
    lines = ["| length | windows | attention | perplexity | gap to dense | density |", "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        density = f"{r['density']:.1%}" if r["density"] else "100%"
        gap = "-" if r["model"] == "dense" else f"{r['perplexity_gap']:+.4f} ({r['nll_gap']:+.4f} nats)"
        lines.append(f"| {r['length']} | {r.get('windows', 1)} | {r['model']} | {r['perplexity']:.4f} | {gap} | {density} |")
    meta = data["meta"]
    lines += ["", f"Measured on {meta['device']} ({meta['dtype']}); held-out text: {meta['eval_tokens']}."]
    return "\n".join(lines)


def build_calibrated_model(run_dir: Path, dtype: str = "float32"):
    """The calibrated sparsemem model of a run and its tokenizer (and the run's metadata)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = json.loads((Path(run_dir) / "final" / "run.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(run_base_model(run), dtype=getattr(torch, dtype))
    model = convert(base, **run["sparsemem"]).eval()
    model.load_sparsemem_modules(load_file(Path(run_dir) / "final" / MODULES_FILE))
    tokenizer = AutoTokenizer.from_pretrained(run_base_model(run))
    return model, tokenizer, run


def export(run_dir, output, repo_id: str | None = None, base_reference: str | None = None,
           card_template: Path | None = None, dtype: str = "float32") -> tuple[Path, Path]:
    """Write OUTPUT/full and OUTPUT/modules. `base_reference` is what the modules-only variant names as its
    base (default: the recipe's base model, or its local folder for the embedded default model)."""
    from transformers.dynamic_module_utils import custom_object_save

    run_dir, output = Path(run_dir), Path(output)
    if not (run_dir / "final" / "run.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished calibration run (no final/run.json)")
    model, tokenizer, run = build_calibrated_model(run_dir, dtype)
    name = repo_id or output.name
    base_name = run["base_model"] if run["base_model"] not in ("default", "", None) else run_base_model(run)
    base_reference = base_reference or base_name
    template = load_card_template(card_template)
    common = dict(
        base_model=base_reference, scorer_dim=run["sparsemem"]["scorer_dim"],
        options=json.dumps(run["sparsemem"], indent=2), data=", ".join(run["data"]), tokens=run["tokens"],
        sequence_length=run["sequence_length"], steps=run["steps"], device=run.get("device"),
        lora=f" with LoRA {run['lora']}" if run.get("lora") else "", eval_table=_eval_table(run_dir),
    )
    full, modules = output / "full", output / "modules"
    with staged_directory(full, marker="config.json") as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        card = _card(template, title=name, repo_id=name, variant="Full weights.", **common)
        (staging / "README.md").write_text(card, encoding="utf-8")
    with staged_directory(modules, marker="config.json") as staging:
        model.config.sparsemem_base_model = base_reference
        try:
            model.config.save_pretrained(staging)
            custom_object_save(model, staging, config=model.config)
        finally:
            del model.config.sparsemem_base_model
        attention = (".self_attn.q_proj.", ".self_attn.k_proj.", ".self_attn.v_proj.", ".self_attn.o_proj.") if run.get("lora") else ()
        state = {k: v.detach().contiguous().cpu() for k, v in model.sparsemem_module_state_dict(attention).items()}
        save_file(state, staging / MODULES_FILE, metadata={"format": "pt", "base_model": base_reference})
        tokenizer.save_pretrained(staging)
        variant = (f"Modules only: loads on top of `{base_reference}` (named in `config.json` as "
                   "`sparsemem_base_model`), which must be reachable.")
        (staging / "README.md").write_text(_card(template, title=f"{name} (modules only)", repo_id=name, variant=variant, **common), encoding="utf-8")
    logger.info("exported %s and %s", full, modules)
    return full, modules
