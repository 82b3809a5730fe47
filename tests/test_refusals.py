"""Inputs that cannot work get an error naming the option, before any work; a repeated compaction does
nothing instead of failing."""

import logging

import pytest
import torch
from conftest import make_base_model, prefilled
from transformers import GPT2Config, GPT2LMHeadModel

import sparsemem
from sparsemem.cli import main


def test_sparsemem_attention_on_an_unsupported_architecture_raises():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    model.set_attn_implementation("sparsemem")
    with pytest.raises(ValueError, match="attn_implementation='sparsemem' supports .* model_type is 'gpt2'"):
        model(torch.randint(0, 64, (1, 12)))


@pytest.mark.parametrize("name,value", [("block_size", -5), ("top_k_blocks", 0), ("sink_tokens", -1), ("scorer", "oracle")])
def test_options_changed_on_a_converted_config_are_checked_when_used(name, value):
    model = sparsemem.convert(make_base_model("llama"), top_k_blocks=2, block_fraction=None)
    ids = torch.randint(3, 256, (1, 40))
    model(ids)
    setattr(model.config, name, value)
    with pytest.raises(ValueError, match=f"`{name}`"):
        model(ids)


def test_empty_prefill_and_empty_cache_are_refused():
    model = sparsemem.convert(make_base_model("llama"))
    with pytest.raises(ValueError, match="at least one token"):
        sparsemem.prefill(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty cache"):
        sparsemem.compact(model, sparsemem.SparseMemCache(model.config), ratio=4, input_ids=torch.randint(3, 256, (1, 50)))


def test_compacting_twice_at_the_same_ratio_leaves_the_cache_as_it_is(caplog):
    model, ids, cache = prefilled("llama", 220, 200, top_k_blocks=None, block_size=8, sink_tokens=4, local_tokens=16)
    sparsemem.compact(model, cache, ratio=5, input_ids=ids[:, :200])
    before = [(layer.keys.clone(), layer.slots.keys.clone(), layer.slots.beta.clone()) for layer in cache.layers]
    with caplog.at_level(logging.INFO, logger="sparsemem.cache_compaction"):
        sparsemem.compact(model, cache, ratio=5, input_ids=ids[:, :200])
    assert "nothing to compact" in caplog.text
    for layer, (keys, slot_keys, beta) in zip(cache.layers, before):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.slots.keys, slot_keys) and torch.equal(layer.slots.beta, beta)


@pytest.mark.parametrize("argv,option", [
    (["eval", "compaction", "--block-size", "-5"], "--block-size"),
    (["eval", "compaction", "--top-k-blocks", "0"], "--top-k-blocks"),
    (["eval", "compaction", "--ratios", "0.5"], "--ratios"),
    (["eval", "compaction", "--methods", "am", "magic"], "--methods"),
    (["eval", "compaction", "--queries", "telepathy"], "--queries"),
    (["eval", "compaction", "--context-tokens", "0"], "--context-tokens"),
    (["eval", "compaction", "--needle-depths", "1.5"], "--needle-depths"),
    (["eval", "compaction", "--whole-span-share", "2"], "--whole-span-share"),
    (["eval", "online", "--budgets", "0"], "--budgets"),
    (["eval", "--depths", "-0.1"], "--depths"),
    (["demo", "--length", "0"], "--length"),
    (["demo", "--block-fraction", "1.5"], "--block-fraction"),
])
def test_cli_checks_values_before_loading_the_model(argv, option, monkeypatch, tmp_path, capsys):
    import sparsemem.cli as cli

    def refuse(args):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(cli, "_load", refuse)
    output = tmp_path / "report"
    code = main([*argv, *(["--output", str(output)] if argv[0] == "eval" else [])])
    assert code == 2
    assert option in capsys.readouterr().err
    assert not output.exists()  # no progress.jsonl, no report folder
