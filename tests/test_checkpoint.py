"""Saved checkpoints carry their remote code and load where sparsemem is not installed."""

import ast
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_base_model, remote_code_loader
from safetensors.torch import save_file

import sparsemem

REMOTE_FILES = {
    "configuration_sparsemem.py",
    "modeling_sparsemem.py",
    "attention.py",
    "cache.py",
    "anchors.py",
    "scorer.py",
    "learned_scorer.py",
    "selection_gate.py",
    "selection.py",
    "merge.py",
}
ALLOWED_IMPORTS = {"torch", "transformers", "dataclasses", "contextlib", "contextvars", "copy", "functools", "inspect", "logging", "math", "os", "time", "typing"}

# runs in a fresh interpreter where `import sparsemem` fails
LOADER = remote_code_loader(
    """
assert model.config._attn_implementation == "sparsemem"
with torch.no_grad():
    generated = model.generate(ref["input_ids"], max_new_tokens=8, do_sample=False)
assert torch.equal(generated, ref["generated"]), (generated, ref["generated"])
"""
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    model = sparsemem.convert(make_base_model("qwen3"), top_k_blocks=2, block_size=8, sink_tokens=2, local_tokens=8)
    folder = root / "tiny-sparsemem"
    model.save_pretrained(folder)
    ids = torch.randint(3, 256, (1, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = {
            "input_ids": ids,
            "logits": model(ids).logits,
            "generated": model.generate(ids, max_new_tokens=8, do_sample=False),
        }
    save_file(reference, root / "reference.safetensors")
    return root, folder


def _run_loader(source, reference, env_extra, tmp_path):
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), **env_extra}
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(source), str(reference)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_folder_holds_config_auto_map_code_and_weights(saved):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "sparsemem_qwen3"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_sparsemem.SparseMemQwen3Config",
        "AutoModelForCausalLM": "modeling_sparsemem.SparseMemQwen3ForCausalLM",
    }
    assert (config["top_k_blocks"], config["block_size"]) == (2, 8)
    assert REMOTE_FILES <= {p.name for p in folder.glob("*.py")}
    assert (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.bin"))


def _guarded_imports(tree) -> set[int]:
    """Imports inside `try: ... except ImportError:` (optional, e.g. triton): the code runs without them."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
        ):
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return guarded


def test_remote_code_imports_only_torch_and_transformers(saved):
    _, folder = saved
    assert (folder / "block_sparse.py").exists() and (folder / "block_decode.py").exists()
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        optional = _guarded_imports(tree)
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] in ALLOWED_IMPORTS, (path.name, node.module)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] in ALLOWED_IMPORTS, (path.name, alias.name)


def test_loads_without_sparsemem_installed(saved, tmp_path):
    root, folder = saved
    out = _run_loader(folder, root / "reference.safetensors", {}, tmp_path)
    assert "OK SparseMemQwen3ForCausalLM" in out


def test_loads_by_repo_id_from_an_offline_hub_cache(saved, tmp_path):
    root, folder = saved
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-sparsemem"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf")}
    out = _run_loader("acme/tiny-sparsemem", root / "reference.safetensors", env, tmp_path)
    assert "OK SparseMemQwen3ForCausalLM" in out


def test_resave_of_a_loaded_checkpoint_keeps_remote_code(saved, tmp_path):
    _, folder = saved
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    model.save_pretrained(tmp_path / "again")
    assert REMOTE_FILES <= {p.name for p in (tmp_path / "again").glob("*.py")}
    assert "auto_map" in json.loads((tmp_path / "again" / "config.json").read_text())


def test_default_model_cache_drops_a_gguf_quantization_config(tmp_path, monkeypatch):
    """The cached default model holds dequantised safetensors: a GGUF `quantization_config` left in its
    config.json made every model loaded from it refuse `save_pretrained`."""
    import json

    from transformers import AutoModelForCausalLM

    from sparsemem.default_model import DEFAULT_MODEL_NAME, default_model_dir

    monkeypatch.setenv("SPARSEMEM_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / DEFAULT_MODEL_NAME
    make_base_model("llama").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"dequantize": False, "gguf_file": "x.gguf", "quant_method": "gguf"}
    (folder / "config.json").write_text(json.dumps(config))
    assert default_model_dir() == folder
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    AutoModelForCausalLM.from_pretrained(folder).save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "config.json").is_file()
