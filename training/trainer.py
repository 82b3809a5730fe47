"""The calibration loop: phase 1 (scorer distillation) then phase 2 (end-to-end KL), with Accelerate
for devices and mixed precision, gradient accumulation, periodic checkpoints and exact resumption.

Resumption is exact because nothing random is carried in hidden state: the micro-batch and the sampled
queries of optimizer step s are pure functions of (seed, s, micro-batch, rank), the learning rate is a
function of s, and the checkpoint holds the trainable parameters and the optimizer tensors of step s.
"""

import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from sparsemem.atomic import write_text
from sparsemem.conversion import convert
from sparsemem.default_model import resolve_model
from sparsemem.machine import device_name

from .checkpoint import list_checkpoints, load_checkpoint, optimizer_from_flat, save_checkpoint
from .data import build_data, hash_seed
from .distributed import fsdp2_settings, local_parameter_count, shard_frozen_base
from .objectives import DISTILL_ATTENTION, ScorerDistillation, distilling, next_token_kl, register_distillation_attention
from .recipe import Recipe, check_architecture

logger = logging.getLogger(__name__)

MODULES_FILE = "sparsemem_modules.safetensors"
PHASE1_FILE = "phase1_modules.safetensors"


class StopTraining(Exception):
    """Raised by `train(..., stop_after=N)` after step N, to simulate a run killed mid-way."""


def recipe_fingerprint(recipe: Recipe) -> str:
    values = dataclasses.asdict(recipe)
    for key in ("checkpoint_every", "log_every", "report_to", "eval", "output_dir"):
        values.pop(key, None)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def learning_rate(base: float, step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of `base`; a function of the step alone."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def load_models(recipe: Recipe, device=None):
    """Tokenizer and the sparsemem model (learned scorer at its initialisation), base frozen."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(recipe.base_model)
    check_architecture(AutoConfig.from_pretrained(path))
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, recipe.dtype), attn_implementation="sdpa")
    if device is not None:
        base = base.to(device)
    model = convert(base, **recipe.sparsemem)
    model.requires_grad_(False)
    for module in learned_modules(model):
        module.float().requires_grad_(True)
    return path, tokenizer, model


def scorers(model):
    from sparsemem.modeling.learned_scorer import LearnedBlockScorer

    return [m for m in model.modules() if isinstance(m, LearnedBlockScorer)]


def learned_modules(model):
    """The modules calibration trains: learned scorers and, with `block_slots`, block consolidators."""
    from sparsemem.modeling.modeling_sparsemem import LEARNED_MODULES

    return [m for m in model.modules() if isinstance(m, LEARNED_MODULES)]


def attention_modules(model):
    return [m for m in model.modules() if hasattr(m, "scorer") and hasattr(m, "sparsemem_stats")]


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def add_lora(model, settings, device=None):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), bias="none")
    peft_model = get_peft_model(model, config)
    for module in learned_modules(peft_model):
        module.requires_grad_(True)
    if device is not None:
        # PEFT places adapters next to the base weight, which it cannot read from an FSDP2 shard
        with torch.no_grad():
            for p in peft_model.parameters():
                if p.requires_grad and p.device != torch.device(device):
                    p.data = p.data.to(device)
    return peft_model


def _optimizer(model, phase, lora_lr=None):
    module_params = [p for m in learned_modules(model) for p in m.parameters()]
    ids = {id(p) for p in module_params}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": module_params, "lr": phase.lr, "base_lr": phase.lr}]
    if others:
        groups.append({"params": others, "lr": lora_lr, "base_lr": lora_lr})
    return torch.optim.AdamW(groups, lr=phase.lr, weight_decay=phase.weight_decay)


class _Log:
    """JSON lines, one per optimizer step; on resume, lines past the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        lines = []
        if path.is_file() and resume_step > 0:
            lines = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= resume_step]
        write_text(path, "".join(l + "\n" for l in lines))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


def train(recipe: Recipe, resume: bool = True, stop_after: int | None = None, accelerator=None) -> Path:
    """Run (or resume) the calibration of `recipe`; returns the output folder."""
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator(
        mixed_precision=recipe.mixed_precision, log_with=recipe.report_to or None, project_dir=recipe.output_dir
    )
    from transformers import AutoConfig

    # refuse an unsupported base before anything is written
    check_architecture(AutoConfig.from_pretrained(resolve_model(recipe.base_model)))
    output = Path(recipe.output_dir)
    checkpoints = output / "checkpoints"
    fingerprint = recipe_fingerprint(recipe)
    existing = list_checkpoints(checkpoints) if resume else []
    if existing:
        info, trainable, opt_tensors, opt_meta = load_checkpoint(existing[-1])
        if info.get("fingerprint") != fingerprint:
            raise ValueError(f"{existing[-1]} was written by a different recipe; use a new output_dir or --no-resume")
        start = info["step"]
    else:
        start, info = 0, None
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        write_text(output / "recipe.json", json.dumps(dataclasses.asdict(recipe), indent=1, default=str))

    register_distillation_attention()
    sharding = fsdp2_settings(accelerator)
    path, tokenizer, model = load_models(recipe, accelerator.device)
    if sharding is not None:
        # loaded on the device (buffers and rotary tables too); each process then frees all but its shard
        shard_frozen_base(model, [p for m in learned_modules(model) for p in m.parameters()], sharding)
    data = build_data(tokenizer, recipe.data.train, recipe.data.eval, recipe.sequence_length,
                      recipe.data.eval_tokens, recipe.data.max_train_tokens)
    stored, total_parameters = local_parameter_count(model)
    if accelerator.is_main_process and recipe.data.eval is not None:
        save_file({"input_ids": data.eval_ids}, output / "heldout.safetensors")
    config = model.config
    p1, p2 = recipe.phase1, recipe.phase2
    if recipe.report_to:
        accelerator.init_trackers("sparsemem-calibration", config={"fingerprint": fingerprint})
    log = _Log(output / "log.jsonl", start, accelerator.is_main_process)

    phase = 1 if start < p1.steps else 2
    if phase == 2 and p2.lora is not None:
        model = add_lora(model, p2.lora, accelerator.device)
    optimizer = _optimizer(model, p1 if phase == 1 else p2, p2.lora.lr if (phase == 2 and p2.lora) else None)
    if info is not None:
        if info["phase"] == phase:
            _load_trainable(model, trainable)
            optimizer_from_flat(optimizer, {k: v.to(accelerator.device) for k, v in opt_tensors.items()}, opt_meta)
        else:  # checkpoint at the last phase-1 step: parameters carry over, the phase-2 optimizer starts fresh
            _load_trainable(model, trainable, strict=False)
    if phase == 2 and p1.steps and not (output / PHASE1_FILE).is_file() and accelerator.is_main_process:
        _save_modules(model, output / PHASE1_FILE)

    tokens_seen = start * recipe.micro_batch_size * recipe.gradient_accumulation_steps * recipe.sequence_length * accelerator.num_processes
    progress = tqdm(total=recipe.total_steps, initial=start, desc="calibrate", disable=not accelerator.is_local_main_process)
    started = time.perf_counter()
    step = start
    while step < recipe.total_steps:
        if step == p1.steps and phase == 1:
            phase = 2
            if accelerator.is_main_process:
                _save_modules(model, output / PHASE1_FILE)
            if p2.lora is not None:
                model = add_lora(model, p2.lora, accelerator.device)
            optimizer = _optimizer(model, p2, p2.lora.lr if p2.lora else None)
        settings = p1 if phase == 1 else p2
        local_step = step if phase == 1 else step - p1.steps
        factor = learning_rate(1.0, local_step, settings.steps, settings.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        torch.manual_seed(hash_seed(recipe.seed, step, "global"))

        record = {"step": step + 1, "phase": phase, "lr": settings.lr * factor}
        total = 0.0
        extra: dict[str, list[float]] = {}
        for micro in range(recipe.gradient_accumulation_steps):
            ids = data.batch(recipe.seed, step, micro, accelerator.process_index, recipe.micro_batch_size).to(accelerator.device)
            generator = torch.Generator().manual_seed(hash_seed(recipe.seed, step, micro, accelerator.process_index, "queries"))
            if phase == 1:
                loss, metrics = _phase1_loss(model, config, ids, p1, generator, accelerator)
            else:
                ids = ids[: p2.micro_batch_size or ids.shape[0], : p2.sequence_length or ids.shape[1]]
                loss, metrics = _phase2_loss(model, ids, p2, recipe.gradient_checkpointing, accelerator)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step + 1}")
            (loss / recipe.gradient_accumulation_steps).backward()
            total += loss.item() / recipe.gradient_accumulation_steps
            for key, value in metrics.items():
                extra.setdefault(key, []).append(value)
        params = [p for p in model.parameters() if p.requires_grad]
        if accelerator.num_processes > 1:
            for p in params:
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += ids.numel() * recipe.gradient_accumulation_steps * accelerator.num_processes
        loss_value = accelerator.reduce(torch.tensor(total, device=accelerator.device), reduction="mean").item()
        record.update({"loss": loss_value, "grad_norm": float(grad_norm), "tokens": tokens_seen,
                       "seconds": round(time.perf_counter() - started, 3)})
        record.update({k: sum(v) / len(v) for k, v in extra.items()})
        if step % recipe.log_every == 0 or step == recipe.total_steps:
            log.write(record)
            if recipe.report_to:
                accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
        progress.update(1)
        progress.set_postfix(phase=phase, loss=f"{loss_value:.4f}")
        if accelerator.is_main_process and (step % recipe.checkpoint_every == 0 or step == recipe.total_steps):
            save_checkpoint(checkpoints, step, trainable_state(model), optimizer,
                            {"phase": phase, "fingerprint": fingerprint, "tokens": tokens_seen})
        accelerator.wait_for_everyone()
        if stop_after is not None and step >= stop_after and step < recipe.total_steps:
            progress.close()
            end_phase2(model)
            raise StopTraining(f"stopped after step {step}")
    progress.close()
    end_phase2(model)
    if sharding is not None:
        model = _whole_copy(recipe, model, phase, accelerator.is_main_process)

    if accelerator.is_main_process:
        final = output / "final"
        final.mkdir(exist_ok=True)
        if p1.steps and not (output / PHASE1_FILE).is_file():
            _save_modules(model, output / PHASE1_FILE)
        lora_config = None
        if p2.lora is not None and p2.steps:
            model.save_pretrained(final / "lora")  # adapter only, safetensors
            lora_config = dataclasses.asdict(p2.lora)
            model = model.merge_and_unload()
        _save_modules(model, final / MODULES_FILE, include_attention=lora_config is not None)
        run = {
            "base_model": recipe.base_model,
            "resolved_base_model": str(path),
            "sparsemem": model.config.sparsemem_options(),
            "lora": lora_config,
            "steps": recipe.total_steps,
            "phase1_steps": p1.steps,
            "phase2_steps": p2.steps,
            "tokens": tokens_seen,
            "sequence_length": recipe.sequence_length,
            "data": [s.name for s in recipe.data.train],
            "eval_data": recipe.data.eval.name if recipe.data.eval is not None else None,
            "data_fingerprint": data.fingerprint,
            "fingerprint": fingerprint,
            "device": device_name(accelerator),
            "num_processes": accelerator.num_processes,
            "fsdp2": dataclasses.asdict(sharding) if sharding is not None else None,
            # what one process held during training (FSDP2 keeps 1/N of the frozen decoder weights)
            "parameters_per_process": stored,
            "parameters": total_parameters,
        }
        write_text(final / "run.json", json.dumps(run, indent=1))
    if recipe.report_to:
        accelerator.end_training()
    return output


def _whole_copy(recipe: Recipe, model, phase: int, main: bool):
    """On the main process, an unsharded model on the CPU with the trained modules (and LoRA) of the
    sharded `model`, for the final export (merging LoRA needs whole base weights); None elsewhere.
    The trained tensors are never sharded, so no process has to gather anything."""
    if not main:
        return None
    state = {name: value.detach().cpu() for name, value in trainable_state(model).items()}
    _, _, whole = load_models(recipe)
    if phase == 2 and recipe.phase2.lora is not None:
        whole = add_lora(whole, recipe.phase2.lora)
    _load_trainable(whole, state)
    end_phase2(whole)
    return whole


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _save_modules(model, path: Path, include_attention: bool = False) -> None:
    inner = _unwrap(model)
    extra = (".self_attn.q_proj.", ".self_attn.k_proj.", ".self_attn.v_proj.", ".self_attn.o_proj.") if include_attention else ()
    state = {k: v.detach().contiguous().cpu() for k, v in inner.sparsemem_module_state_dict(extra).items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, tmp)
    tmp.replace(path)


def _load_trainable(model, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    params = dict(model.named_parameters())
    if strict:
        missing = sorted({n for n, p in params.items() if p.requires_grad} - set(state))
        if missing:
            raise ValueError(f"checkpoint lacks trainable parameters {missing[:5]}")
    with torch.no_grad():
        for name, value in state.items():
            if name in params:
                params[name].copy_(value)
            else:
                # a phase-1 checkpoint loaded after LoRA wrapped the model: names gained a prefix
                matches = [n for n in params if n.endswith("." + name)]
                if len(matches) != 1:
                    raise ValueError(f"checkpoint parameter {name!r} has no unique match in the model")
                params[matches[0]].copy_(value)


def _phase1_loss(model, config, ids, settings, generator, accelerator):
    collector = ScorerDistillation(config, settings.queries_per_layer, generator, settings.mass_weighted)
    implementation = config._attn_implementation
    config._attn_implementation = DISTILL_ATTENTION
    try:
        with torch.no_grad(), accelerator.autocast(), distilling(collector):
            model(ids, use_cache=False, logits_to_keep=1)
        loss = collector.loss()
    finally:
        config._attn_implementation = implementation
    metrics = {
        "recall_learned": sum(collector.recall_learned) / len(collector.recall_learned),
        "recall_training_free": sum(collector.recall_training_free) / len(collector.recall_training_free),
    }
    if collector.slot_losses:
        metrics["slot_error_ratio"] = float(collector.slot_loss().detach())
    return loss, metrics


def end_phase2(model) -> None:
    _unwrap(model).config.selection_gate_temperature = None
    _unwrap(model).eval()


def _phase2_loss(model, ids, settings, gradient_checkpointing, accelerator):
    inner = _unwrap(model)
    config = inner.config
    keep = min(settings.kl_tokens, ids.shape[1])
    if gradient_checkpointing and not inner.is_gradient_checkpointing:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    implementation = config._attn_implementation
    with torch.no_grad(), accelerator.autocast():
        config._attn_implementation = "sdpa"
        try:
            if hasattr(model, "disable_adapter"):
                with model.disable_adapter():
                    teacher = model(ids, use_cache=False, logits_to_keep=keep).logits
            else:
                teacher = model(ids, use_cache=False, logits_to_keep=keep).logits
        finally:
            config._attn_implementation = implementation
    # the gates stay on (and the model in training mode) until `end_phase2`: gradient checkpointing
    # recomputes each layer during the backward pass, which must take the same path as the forward pass
    config.selection_gate_temperature = settings.gate_temperature
    inner.train()
    with accelerator.autocast():
        student = model(ids, use_cache=False, logits_to_keep=keep).logits
    loss = next_token_kl(student, teacher)
    return loss, {}
