"""Saved compacted documents round-trip exactly and refuse mismatches."""

import json

import pytest
import torch
from conftest import make_base_model, prefilled

import sparsemem
from sparsemem.documents import (
    DocumentIntegrityError,
    DocumentModelMismatchError,
    _meta_checksum,
    load_document,
    save_document,
)


@pytest.fixture(scope="module", params=["proportional", "global"])
def compacted(request):
    # "global" leaves layers of different sizes, "proportional" heads of different sizes within a layer
    model, ids, cache = prefilled("qwen2", 220, 200, top_k_blocks=None, block_size=8, sink_tokens=4, local_tokens=16)
    sparsemem.compact(model, cache, ratio=5, input_ids=ids[:, :200], budgets=request.param)
    return model, ids, cache


def test_round_trip_is_bitwise_and_answers_the_same(compacted, tmp_path):
    model, ids, cache = compacted
    save_document(cache, model, tmp_path / "doc")
    loaded = load_document(tmp_path / "doc", model)
    assert loaded.get_seq_length() == cache.get_seq_length() == 200
    for a, b in zip(cache.layers, loaded.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) and torch.equal(a.positions, b.positions)
        for name in ("keys", "values", "beta", "head", "block", "position"):
            assert torch.equal(getattr(a.slots, name), getattr(b.slots, name))
    import copy

    with torch.no_grad():
        expected = model(ids[:, 200:], past_key_values=copy.deepcopy(cache)).logits
        got = model(ids[:, 200:], past_key_values=loaded).logits
    assert torch.equal(expected, got)
    assert json.loads((tmp_path / "doc" / "document.json").read_text())["compaction"]["method"] == "am"
    # what the compaction did comes back as the same record (JSON keeps every number exactly)
    assert isinstance(loaded.compaction, sparsemem.CompactionRecord) and loaded.compaction == cache.compaction
    assert loaded.compaction.slots_per_head and loaded.compaction.queries == ["context"]


def test_a_document_whose_compaction_record_does_not_fit_is_refused(compacted, tmp_path):
    model, _, cache = compacted
    folder = save_document(cache, model, tmp_path / "doc")
    meta = json.loads((folder / "document.json").read_text())
    meta["compaction"]["slots"] = meta["compaction"].pop("slots_per_head")
    meta["checksum"] = _meta_checksum(meta)
    (folder / "document.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"compaction.*unknown compaction record field\(s\) \['slots'\]"):
        load_document(folder, model)
    # an uncompacted cache saves no record and loads with none
    _, ids, _ = compacted
    plain = sparsemem.SparseMemCache(model.config)
    with torch.no_grad():
        model(ids[:, :50], past_key_values=plain)
    assert plain.compaction is None
    assert load_document(save_document(plain, model, tmp_path / "plain"), model).compaction is None


def test_refuses_another_model(compacted, tmp_path):
    model, _, cache = compacted
    save_document(cache, model, tmp_path / "doc")
    other = sparsemem.convert(make_base_model("qwen2", seed=1))
    with pytest.raises(ValueError, match="different model"):
        load_document(tmp_path / "doc", other)


def test_refuses_truncated_or_inconsistent_files(compacted, tmp_path):
    model, _, cache = compacted
    folder = save_document(cache, model, tmp_path / "doc")
    with pytest.raises(FileExistsError):
        save_document(cache, model, folder)
    data = (folder / "kv.safetensors").read_bytes()
    (folder / "kv.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_document(folder, model)
    save_document(cache, model, folder, overwrite=True)
    meta = json.loads((folder / "document.json").read_text())
    meta["num_key_value_heads"] = 4
    meta["checksum"] = _meta_checksum(meta)  # consistent metadata that does not fit the model
    (folder / "document.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        load_document(folder, model)
    with pytest.raises(FileNotFoundError, match="document.json"):
        load_document(tmp_path / "nowhere", model)


def test_a_flipped_data_byte_or_edited_metadata_is_refused(compacted, tmp_path):
    model, _, cache = compacted
    folder = save_document(cache, model, tmp_path / "doc")
    data = bytearray((folder / "kv.safetensors").read_bytes())
    data[-5] ^= 0x01  # one bit of the last tensor's data: still a valid safetensors file
    (folder / "kv.safetensors").write_bytes(bytes(data))
    with pytest.raises(DocumentIntegrityError, match="kv.safetensors is truncated or corrupt"):
        load_document(folder, model)
    save_document(cache, model, folder, overwrite=True)
    meta = json.loads((folder / "document.json").read_text())
    meta["logical_length"] -= 1
    (folder / "document.json").write_text(json.dumps(meta))
    with pytest.raises(DocumentIntegrityError, match="document.json was edited or corrupted"):
        load_document(folder, model)


def test_any_weight_change_is_refused(compacted, tmp_path):
    model, _, cache = compacted
    folder = save_document(cache, model, tmp_path / "doc")
    last = model.model.layers[-1].self_attn
    original = last.v_proj.weight.detach().clone()
    try:
        with torch.no_grad():
            last.v_proj.weight[0, 0] += 1e-3  # a late layer's value projection, nothing else
        with pytest.raises(DocumentModelMismatchError, match="different model"):
            load_document(folder, model)
    finally:
        with torch.no_grad():
            last.v_proj.weight.copy_(original)
    load_document(folder, model)  # the same weights again: accepted


def test_a_lora_on_q_and_v_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    model, ids, cache = prefilled("llama", 120, 100, top_k_blocks=None)
    folder = save_document(cache, model, tmp_path / "doc")
    tuned = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():  # the adapter (B not zero) really changes the model
        adapted = tuned(ids[:, :100]).logits
        with tuned.disable_adapter():
            plain = tuned(ids[:, :100]).logits
    assert (adapted - plain).abs().max() > 1e-3
    with pytest.raises(DocumentModelMismatchError, match="different model"):
        load_document(folder, tuned)


def test_refuses_to_overwrite_a_folder_that_is_not_a_document(compacted, tmp_path):
    model, _, cache = compacted
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="without document.json"):
        save_document(cache, model, folder, overwrite=True)
    assert (folder / "todo.txt").read_text() == "keep me"
