"""Training checkpoints without pickle: trainable parameters and optimizer tensors in safetensors,
everything else (step, phase, optimizer hyper-parameters, recipe fingerprint) in JSON. Each checkpoint is
written to a staging folder and renamed into place, so a run killed while saving leaves the previous
checkpoint intact.
"""

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sparsemem.atomic import staged_directory

STATE_FILE = "state.json"
_STEP = re.compile(r"step-(\d+)$")


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(root: Path, step: int, trainable: dict[str, torch.Tensor], optimizer, info: dict, keep: int = 2) -> Path:
    target = Path(root) / f"step-{step:07d}"
    with staged_directory(target, marker=STATE_FILE) as staging:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, staging / "trainable.safetensors")
        tensors, meta = optimizer_to_flat(optimizer)
        save_file(tensors, staging / "optimizer.safetensors")
        (staging / "optimizer.json").write_text(json.dumps(meta, indent=1))
        (staging / STATE_FILE).write_text(json.dumps({**info, "step": step}, indent=1))
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP.search(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP.search(p.name).group(1)))


def load_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    path = Path(path)
    info = json.loads((path / STATE_FILE).read_text())
    trainable = load_file(path / "trainable.safetensors")
    optimizer_tensors = load_file(path / "optimizer.safetensors")
    optimizer_meta = json.loads((path / "optimizer.json").read_text())
    return info, trainable, optimizer_tensors, optimizer_meta
