"""Two CPU processes (gloo): data-parallel and FSDP2 calibrations of the same recipe must train the
same modules, LoRA included, while FSDP2 stores only part of the frozen base on each process."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_calibration import OPTIONS, tiny_base  # noqa: F401 (fixture)


def _launch(recipe: dict, folder: Path, fsdp2: bool, processes: int = 2, cpu: bool = True) -> Path:
    folder.mkdir(parents=True)
    output = folder / "run"
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({**recipe, "output_dir": str(output)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    if fsdp2:  # what `accelerate launch` exports for an FSDP2 config
        env.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", FSDP_RESHARD_AFTER_FORWARD="true")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "sparsemem.training", str(path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return output


def _tiny_recipe(base):
    return {
        "base_model": str(base),
        "sparsemem": {**OPTIONS, "scorer_dim": 8},
        "data": {"train": [{"name": "python-docs", "max_chars": 60000}]},
        "sequence_length": 128,
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 2,
        "phase1": {"steps": 3, "lr": 1e-2, "queries_per_layer": 32},
        "phase2": {"steps": 2, "lr": 1e-3, "kl_tokens": 64, "sequence_length": 96,
                   "lora": {"r": 4, "alpha": 8, "lr": 1e-3, "target_modules": ["q_proj", "v_proj"]}},
        "gradient_checkpointing": True,
        "checkpoint_every": 2,
    }


@pytest.fixture(scope="module")
def runs(tiny_base, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("distributed")
    recipe = _tiny_recipe(tiny_base)
    return _launch(recipe, root / "ddp", fsdp2=False), _launch(recipe, root / "fsdp2", fsdp2=True), tiny_base


def test_fsdp2_trains_what_data_parallel_trains(runs):
    ddp, fsdp2, base = runs
    log = lambda run: [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = log(ddp), log(fsdp2)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5]
    assert a[0]["tokens"] == 2 * 2 * 128  # two processes x two micro-batches x 128 tokens
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"]
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-6), (x, y)
    want = load_file(ddp / "final" / "sparsemem_modules.safetensors")
    got = load_file(fsdp2 / "final" / "sparsemem_modules.safetensors")
    assert sorted(want) == sorted(got)
    # LoRA trained and merged into the exported attention projections
    original = load_file(base / "model.safetensors")
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        assert not torch.allclose(want[key], original[key])
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)


def test_fsdp2_stores_a_share_of_the_base_on_each_process(runs):
    ddp, fsdp2 = (json.loads((run / "final" / "run.json").read_text()) for run in runs[:2])
    assert ddp["num_processes"] == fsdp2["num_processes"] == 2
    assert ddp["fsdp2"] is None and ddp["parameters_per_process"] == ddp["parameters"]
    assert fsdp2["fsdp2"] == {"reshard_after_forward": True, "cpu_offload": False}
    assert fsdp2["parameters"] == ddp["parameters"]
    # every frozen tensor is split in two (odd first dimensions give one row more to rank 0)
    assert fsdp2["parameters_per_process"] < 0.55 * fsdp2["parameters"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fsdp2_through_accelerate_on_one_gpu(tiny_base, tmp_path):  # noqa: F811
    """On CUDA, Accelerate builds the FSDP plugin itself (distributed_type FSDP): one process, a mesh of one."""
    recipe = _tiny_recipe(tiny_base)
    plain = _launch(recipe, tmp_path / "plain", fsdp2=False, processes=1, cpu=False)
    sharded = _launch(recipe, tmp_path / "fsdp2", fsdp2=True, processes=1, cpu=False)
    info = json.loads((sharded / "final" / "run.json").read_text())
    assert info["fsdp2"] == {"reshard_after_forward": True, "cpu_offload": False}
    assert info["num_processes"] == 1 and not info["device"].startswith("cpu")
    log = lambda run: [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert log(sharded) == pytest.approx(log(plain), rel=1e-4, abs=1e-6)
    want = load_file(plain / "final" / "sparsemem_modules.safetensors")
    got = load_file(sharded / "final" / "sparsemem_modules.safetensors")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-5)


class _Accelerator:
    def __init__(self, distributed_type, num_processes, plugin=None):
        self.distributed_type, self.num_processes = distributed_type, num_processes
        self.state = SimpleNamespace(fsdp_plugin=plugin)


def test_launch_mistakes_are_named(monkeypatch):
    from accelerate.utils import DistributedType

    from sparsemem.training.distributed import fsdp2_settings

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="ACCELERATE_USE_CPU"):
        fsdp2_settings(_Accelerator(DistributedType.NO, 1))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="FSDP version 2"):
        fsdp2_settings(_Accelerator(DistributedType.MULTI_CPU, 2))
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    settings = fsdp2_settings(_Accelerator(DistributedType.MULTI_CPU, 2))
    assert settings.cpu_offload and settings.reshard_after_forward
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert fsdp2_settings(_Accelerator(DistributedType.MULTI_CPU, 2)) is None


def test_accelerate_fsdp_plugin_settings():
    """On GPUs Accelerate's plugin says what to do; its offload setting is a policy object, not a flag."""
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    from sparsemem.training.distributed import fsdp2_settings

    plugin = lambda version, offload: SimpleNamespace(fsdp_version=version, reshard_after_forward=True, cpu_offload=offload)  # noqa: E731
    assert not fsdp2_settings(_Accelerator(DistributedType.FSDP, 1, plugin(2, OffloadPolicy()))).cpu_offload
    assert fsdp2_settings(_Accelerator(DistributedType.FSDP, 1, plugin(2, CPUOffloadPolicy()))).cpu_offload
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        fsdp2_settings(_Accelerator(DistributedType.FSDP, 1, plugin(1, False)))
