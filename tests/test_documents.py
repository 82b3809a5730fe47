"""Saved compacted documents round-trip exactly and refuse mismatches."""

import json

import pytest
import torch
from conftest import make_base_model, prefilled

import sparsemem
from sparsemem.documents import load_document, save_document


@pytest.fixture(scope="module", params=["proportional", "global"])
def compacted(request):
    # "global" leaves layers of different sizes, "proportional" heads of different sizes within a layer
    model, ids, cache = prefilled("qwen2", 220, 200, top_k_blocks=None, block_size=8, sink_tokens=4, local_tokens=16)
    sparsemem.compact(model, cache, ratio=5, input_ids=ids[:, :200], head_budgets=request.param)
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
    (folder / "document.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        load_document(folder, model)
    with pytest.raises(FileNotFoundError, match="document.json"):
        load_document(tmp_path / "nowhere", model)
