"""Compacted documents on disk: read a long document once, compact it, answer many questions later.

A document is a folder with `kv.safetensors` (every tier of every layer) and `document.json` (format,
model fingerprint, shapes, logical length, how it was compacted, the SHA-256 of the tensor file and a
checksum of the metadata itself). It is written by `atomic.staged_directory`, so a crash never leaves half
a document nor loses the one it replaces. Loading checks both checksums (`DocumentIntegrityError`), the
model's fingerprint over all its weights (`DocumentModelMismatchError`) and the shapes.
"""

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import recover, staged_directory
from .modeling.cache import SparseMemCache, SparseMemLayer
from .modeling.compaction import CompactionRecord
from .modeling.slots import SlotTier

FORMAT = "sparsemem-compacted-document/2"
TENSORS, META = "kv.safetensors", "document.json"
_SLOT_FIELDS = ("keys", "values", "beta", "head", "block", "position", "rope")


class DocumentIntegrityError(ValueError):
    """A saved document's tensors or metadata differ from what was written (corrupt or edited)."""


class DocumentModelMismatchError(ValueError):
    """A saved document was made by a model whose weights or architecture differ from this one."""


def _learned_module(name: str) -> bool:
    # sparsemem's scorer and consolidator read the cache; they do not make it
    return any(part in ("scorer", "consolidator") for part in name.split("."))


def model_fingerprint(model) -> str:
    """Architecture fields plus a hash of every weight that shapes the cached keys and values (every
    layer's attention projections, MLP and norms, the embeddings, adapters such as LoRA included):
    two models share a fingerprint only if their caches are interchangeable."""
    config = model.config
    fields = {name: getattr(config, name, None) for name in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
        "rope_parameters", "rope_theta",
    )}
    fields["family"] = getattr(config, "base_model_type", config.model_type)
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
    for name, parameter in model.named_parameters():
        if _learned_module(name):
            continue
        digest.update(name.encode())
        digest.update(memoryview(parameter.detach().float().cpu().contiguous().numpy()).cast("B"))
    return digest.hexdigest()[:32]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):  # a document may not fit in memory twice
            digest.update(chunk)
    return digest.hexdigest()


def _meta_checksum(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def save_document(cache: SparseMemCache, model, path, overwrite: bool = False) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    tensors: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(cache.layers):
        if not layer.is_initialized:
            raise ValueError(f"layer {index} of the cache is empty: run the document through the model first")
        tensors[f"layers.{index}.keys"] = layer.keys
        tensors[f"layers.{index}.values"] = layer.values
        tensors[f"layers.{index}.positions"] = layer.positions
        if layer.rope_positions is not None:
            tensors[f"layers.{index}.rope_positions"] = layer.rope_positions
        if layer.slots is not None:
            for name in _SLOT_FIELDS:
                tensors[f"layers.{index}.slots.{name}"] = getattr(layer.slots, name)
    if getattr(cache, "token_ids", None) is not None:  # lets generate tell new tokens from a repeated document
        tensors["token_ids"] = cache.token_ids[:, : cache.get_seq_length()]
    first = cache.layers[0]
    meta = {
        "format": FORMAT,
        "model_fingerprint": model_fingerprint(model),
        "num_layers": len(cache.layers),
        "batch_size": first.keys.shape[0],
        "num_key_value_heads": first.keys.shape[1],
        "head_dim": first.keys.shape[-1],
        "dtype": str(first.keys.dtype).removeprefix("torch."),
        "logical_length": cache.get_seq_length(),
        # RoPE position policy and where the held keys are rotated (see rope.py)
        "positions": cache.positions,
        "cache_positions": cache.cache_positions,
        "rope_offset": [layer.rope_offset for layer in cache.layers],
        "sink_tokens": cache.sink_tokens,
        "local_tokens": cache.local_tokens,
        "compaction": None if cache.compaction is None else cache.compaction.to_dict(),
        "bytes": cache.memory_bytes(),
    }
    with staged_directory(path, marker=META) as staging:
        # copies: layers compacted or laid out together hold views of one shared tensor, which safetensors refuses
        save_file({k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}, staging / TENSORS)
        meta["tensors_sha256"] = _file_sha256(staging / TENSORS)
        meta = json.loads(json.dumps(meta, default=str))  # the checksum covers what a reader will parse
        meta["checksum"] = _meta_checksum(meta)
        (staging / META).write_text(json.dumps(meta, indent=2))
    return path


def load_document(path, model) -> SparseMemCache:
    """A `SparseMemCache` holding the saved document, on the model's device, ready for `generate`."""
    path = Path(path)
    if not path.exists():
        recover(path)  # a writer killed mid-swap leaves the previous copy aside
    for name in (META, TENSORS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing: not a saved sparsemem document")
    try:
        meta = json.loads((path / META).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path / META} is not valid JSON: {error}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / META}: format {meta.get('format')!r}, expected {FORMAT!r} (save the document again)")
    if meta.get("checksum") != _meta_checksum(meta):
        raise DocumentIntegrityError(f"{path / META} was edited or corrupted: its checksum does not match its content")
    if _file_sha256(path / TENSORS) != meta.get("tensors_sha256"):
        raise DocumentIntegrityError(f"{path / TENSORS} is truncated or corrupt: its SHA-256 differs from the one in {META}")
    fingerprint = model_fingerprint(model)
    if meta.get("model_fingerprint") != fingerprint:
        raise DocumentModelMismatchError(
            f"{path} was made with a different model (fingerprint {meta.get('model_fingerprint')}, this model {fingerprint})"
        )
    config = model.config
    expected = {
        "num_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
    }
    for key, value in expected.items():
        if meta.get(key) != value:
            raise ValueError(f"{path / META}: {key} is {meta.get(key)}, the model has {value}")
    try:
        tensors = load_file(path / TENSORS)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path / TENSORS} is truncated or corrupt: {error}") from None
    device = model.device
    cache = SparseMemCache(config, positions=meta.get("positions", "logical"))
    cache.cache_positions = bool(meta.get("cache_positions", False))
    offsets = meta.get("rope_offset") or [0] * meta["num_layers"]
    for index in range(meta["num_layers"]):
        prefix = f"layers.{index}."
        try:
            keys, values, positions = (tensors[prefix + n] for n in ("keys", "values", "positions"))
        except KeyError as error:
            raise ValueError(f"{path / TENSORS} lacks tensor {error.args[0]!r}") from None
        if keys.shape[1] != meta["num_key_value_heads"] or keys.shape[-1] != meta["head_dim"] or keys.shape[-2] != positions.shape[0]:
            raise ValueError(f"{path / TENSORS}: layer {index} has keys {tuple(keys.shape)}, inconsistent with {META}")
        layer = SparseMemLayer()
        layer.lazy_initialization(keys.to(device), values.to(device))
        layer.keys, layer.values, layer.positions = keys.to(device), values.to(device), positions.to(device)
        layer.logical_length = meta["logical_length"]
        layer.rope_offset = int(offsets[index])
        if prefix + "rope_positions" in tensors:
            layer.rope_positions = tensors[prefix + "rope_positions"].to(device)
        if prefix + "slots.keys" in tensors:
            # documents written before slots recorded their RoPE positions lack "rope": the default applies
            layer.slots = SlotTier(*(tensors[prefix + "slots." + n].to(device) if prefix + "slots." + n in tensors else None
                                     for n in _SLOT_FIELDS))
        layer.entries_left = True  # laid out again (a no-op where nothing moved) once cache positions apply
        cache.layers.append(layer)
    token_ids = tensors.get("token_ids")
    if token_ids is not None and tuple(token_ids.shape) != (meta["batch_size"], meta["logical_length"]):
        raise ValueError(f"{path / TENSORS}: token_ids {tuple(token_ids.shape)} do not match the batch and length in {META}")
    cache.token_ids = None if token_ids is None else token_ids.to(device)
    if meta.get("compaction") is not None:
        try:
            cache.record_compaction(CompactionRecord.from_dict(meta["compaction"]))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path / META}: \"compaction\": {error}") from None
    return cache
