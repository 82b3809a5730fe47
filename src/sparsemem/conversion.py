"""`convert`: wrap an already-loaded Hugging Face model as the matching sparsemem model, sharing its weights."""

import copy

import torch

from .modeling.configuration_sparsemem import OPTION_NAMES
from .modeling.modeling_sparsemem import FAMILIES, LEARNED_MODULES


def family_of(config) -> str:
    model_type = getattr(config, "model_type", None)
    base = getattr(config, "base_model_type", model_type)
    if base not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not supported by sparsemem; supported families: {sorted(FAMILIES)}"
        )
    return base


def check_options(options: dict) -> None:
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(f"unknown sparsemem option(s) {unknown}; valid options: {list(OPTION_NAMES)}")


def convert(model: torch.nn.Module, **options):
    """Return the sparsemem model of `model`'s family, sharing `model`'s parameters and buffers.

    Options: block_size, sink_tokens, local_tokens, top_k_blocks (None = every block, dense-equivalent),
    block_fraction, block_mass, scorer, scorer_dim, query_chunk_size, query_block_size, attention_backend, positions
    ("logical", "cache" or "auto": RoPE positions of what the cache holds; see `SparseMemOptions`). Learned modules
    (`scorer="learned"`) start from their initialisation; load trained ones with `load_sparsemem_modules`.
    Converting a sparsemem model again gives a new model with the new options.
    """
    check_options(options)
    family = family_of(model.config)
    config_class, model_class = FAMILIES[family]
    config_dict = model.config.to_dict()
    config_dict.update(options)
    config_dict["model_type"] = config_class.model_type
    config_dict.pop("auto_map", None)
    config = config_class.from_dict(config_dict)
    # build on the meta device, then take the base model's own Parameter and buffer objects
    with torch.device("meta"):
        sparse = model_class(config)
    for name, param in model.named_parameters(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        setattr(sparse.get_submodule(owner), leaf, param)
    for name, buffer in model.named_buffers(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        sparse.get_submodule(owner)._buffers[leaf] = buffer
    # the rotary embedding keeps derived tensors as plain attributes too
    sparse.model.rotary_emb = model.model.rotary_emb
    # learned modules have no source in the base model: materialise them next to their layer's weights
    for module in sparse.modules():
        if isinstance(module, LEARNED_MODULES):
            module.to_empty(device=model.device)
            module.reset_parameters()
    left_on_meta = [n for n, t in [*sparse.named_parameters(), *sparse.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise RuntimeError(f"convert: tensors without a source in the base model: {left_on_meta[:5]}")
    sparse.generation_config = copy.deepcopy(model.generation_config)
    sparse.train(model.training)
    return sparse
