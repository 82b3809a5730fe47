"""Export a calibration run as Hub-ready checkpoints.

`OUTPUT/full/`: config, remote code, full safetensors weights, tokenizer and model card; loads with
`trust_remote_code=True` where sparsemem is not installed. Both name their base model by its Hub id and
keep nothing of the source's format (a GGUF's `quantization_config`, local paths) in their config.
`OUTPUT/modules/`: the same config and code with only the learned modules (`sparsemem_modules.safetensors`,
plus the attention projections when LoRA was merged) and `sparsemem_base_model` naming the base
checkpoint they load on top of.
"""

import json
import logging
import re
import shutil
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sparsemem.atomic import staged_directory
from sparsemem.conversion import convert
from sparsemem.default_model import DEFAULT_MODEL_HUB_ID, DEFAULT_MODEL_NAME

from .evaluation import run_base_model

logger = logging.getLogger(__name__)


MODULES_FILE = "sparsemem_modules.safetensors"


# owner/name, as the Hub spells repo ids
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# config keys a source format leaves behind that name this machine or a format the export is not in
SOURCE_LEFTOVERS = ("quantization_config", "_model_name_or_path")


def hub_base_model(run: dict, base_model: str | None = None) -> str:
    """The Hub id an export names as its base: `base_model` when given, else the run's base model when it
    is a Hub id, or the Hub repo of the embedded default model; a local folder needs `base_model`."""
    if base_model is None:
        name = run.get("base_model")
        if name in (None, "", "default", DEFAULT_MODEL_NAME):
            base_model = DEFAULT_MODEL_HUB_ID
        elif HUB_ID.match(name) and not Path(name).exists():
            base_model = name
        else:
            raise ValueError(f"the run's base model {name!r} is a local folder: name its Hub repo with "
                             "`--base-model OWNER/NAME` (`base_model=`)")
    if not HUB_ID.match(base_model) or Path(base_model).exists():
        raise ValueError(f"`--base-model` must be a Hub repo id (OWNER/NAME), not a local path; got {base_model!r}")
    return base_model


def render_card(template: str, base_model: str, **values) -> str:
    """A model card from a Jinja template (`{{ card_data }}` is the YAML metadata), built with huggingface_hub."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="transformers", base_model=base_model, pipeline_tag="text-generation",
                         tags=["sparsemem", "sparse-attention", "long-context"])
    return str(ModelCard.from_template(data, template_str=template, base_model=base_model, **values))


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


def _portable_config(config, base_model: str) -> None:
    for key in SOURCE_LEFTOVERS:
        config.__dict__.pop(key, None)
    config._name_or_path = base_model


def _copy_adapter(source: Path, target: Path, base_model: str) -> None:
    """The phase-2 LoRA adapter (PEFT format), its base named by the Hub id."""
    files = {"adapter_config.json", "adapter_model.safetensors"}
    missing = sorted(name for name in files if not (source / name).is_file())
    if missing:
        raise FileNotFoundError(f"{source}: the run trained LoRA but {missing} are missing")
    target.mkdir()
    adapter = json.loads((source / "adapter_config.json").read_text())
    adapter["base_model_name_or_path"] = base_model
    (target / "adapter_config.json").write_text(json.dumps(adapter, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(source / "adapter_model.safetensors", target / "adapter_model.safetensors")


def export(run_dir, output, repo_id: str | None = None, base_model: str | None = None,
           card_template: Path | None = None, dtype: str = "float32") -> tuple[Path, Path]:
    """Write OUTPUT/full and OUTPUT/modules (with the phase-2 LoRA adapter in `modules/lora/` when one was
    trained). `base_model`: the Hub id both name as their base (see `hub_base_model`)."""
    from transformers.dynamic_module_utils import custom_object_save

    run_dir, output = Path(run_dir), Path(output)
    if not (run_dir / "final" / "run.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished calibration run (no final/run.json)")
    run = json.loads((run_dir / "final" / "run.json").read_text())
    base_model = hub_base_model(run, base_model)
    if repo_id is not None and not HUB_ID.match(repo_id):
        raise ValueError(f"`--repo-id` must be OWNER/NAME, got {repo_id!r}")
    adapter = run_dir / "final" / "lora" if run.get("lora") else None
    model, tokenizer, run = build_calibrated_model(run_dir, dtype)
    _portable_config(model.config, base_model)
    name = repo_id or output.name
    template = load_card_template(card_template)
    adapter_note = ("\n\nThe phase-2 LoRA adapter is merged into the attention projections; `lora/` of the modules-only "
                    "variant holds it in PEFT format." if adapter is not None else "")
    common = dict(
        scorer_dim=run["sparsemem"]["scorer_dim"],
        options=json.dumps(run["sparsemem"], indent=2), data=", ".join(run["data"]), tokens=run["tokens"],
        sequence_length=run["sequence_length"], steps=run["steps"], device=run.get("device"),
        lora=f" with LoRA {run['lora']}" if run.get("lora") else "", eval_table=_eval_table(run_dir),
        adapter=adapter_note, repo_id=name,
    )
    full, modules = output / "full", output / "modules"
    with staged_directory(full, marker="config.json") as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        card = render_card(template, base_model, title=name, variant="Full weights.", **common)
        (staging / "README.md").write_text(card, encoding="utf-8")
    with staged_directory(modules, marker="config.json") as staging:
        model.config.sparsemem_base_model = base_model
        try:
            model.config.save_pretrained(staging)
            custom_object_save(model, staging, config=model.config)
        finally:
            del model.config.sparsemem_base_model
        attention = (".self_attn.q_proj.", ".self_attn.k_proj.", ".self_attn.v_proj.", ".self_attn.o_proj.") if run.get("lora") else ()
        state = {k: v.detach().contiguous().cpu() for k, v in model.sparsemem_module_state_dict(attention).items()}
        save_file(state, staging / MODULES_FILE, metadata={"format": "pt", "base_model": base_model})
        tokenizer.save_pretrained(staging)
        if adapter is not None:
            _copy_adapter(adapter, staging / "lora", base_model)
        variant = (f"Modules only: loads on top of `{base_model}` (named in `config.json` as "
                   "`sparsemem_base_model`), which must be reachable.")
        card = render_card(template, base_model, title=f"{name} (modules only)", variant=variant, **common)
        (staging / "README.md").write_text(card, encoding="utf-8")
    logger.info("exported %s and %s", full, modules)
    return full, modules
