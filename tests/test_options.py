"""Invalid options and architectures raise a ValueError naming the problem."""

import pytest
import torch
from conftest import make_base_model
from transformers import GPT2Config, GPT2LMHeadModel

import sparsemem
from sparsemem import SparseMemLlamaConfig, SparseMemLlamaForCausalLM


@pytest.mark.parametrize(
    "options, name",
    [
        ({"block_size": 0}, "block_size"),
        ({"block_size": -4}, "block_size"),
        ({"block_size": 2.5}, "block_size"),
        ({"top_k_blocks": 0}, "top_k_blocks"),
        ({"sink_tokens": -1}, "sink_tokens"),
        ({"local_tokens": -1}, "local_tokens"),
        ({"scorer": "oracle"}, "scorer"),
        ({"query_chunk_size": 0}, "query_chunk_size"),
        ({"topk_blocks": 4}, "topk_blocks"),
        ({"scorer": "subminmax"}, "scorer_sub_block"),
        ({"scorer": "subminmax", "scorer_sub_block": 0}, "scorer_sub_block"),
        ({"scorer": "subminmax", "scorer_sub_block": 3}, "scorer_sub_block.*divide.*block_size"),
        ({"scorer": "subminmax", "scorer_sub_block": True}, "scorer_sub_block"),
        ({"scorer": "subminmax", "block_size": 64, "scorer_sub_block": 8.0}, "scorer_sub_block"),
        ({"scorer": "minmax", "scorer_sub_block": 4}, "scorer_sub_block.*subminmax"),
    ],
)
def test_invalid_options(options, name):
    base = make_base_model("llama")
    with pytest.raises(ValueError, match=name):
        sparsemem.convert(base, **options)


def test_invalid_head_layout():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        SparseMemLlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)


def test_unsupported_architecture():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="gpt2"):
        sparsemem.convert(model)


def test_from_pretrained_validates_options_and_architecture(tmp_path):
    make_base_model("llama").save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="top_k_blocks"):
        SparseMemLlamaForCausalLM.from_pretrained(tmp_path / "llama", top_k_blocks=0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="gpt2"):
        SparseMemLlamaForCausalLM.from_pretrained(tmp_path / "gpt2")
    model = SparseMemLlamaForCausalLM.from_pretrained(tmp_path / "llama", top_k_blocks=3, block_size=16)
    assert (model.config.top_k_blocks, model.config.block_size) == (3, 16)
    assert model.config._attn_implementation == "sparsemem"


def test_dropout_is_refused_not_ignored():
    base = make_base_model("llama", attention_dropout=0.1)
    sparse = sparsemem.convert(base).train()
    with pytest.raises(ValueError, match="dropout"):
        sparse(torch.randint(3, 256, (1, 20)))


@pytest.mark.parametrize("argv", [["eval", "compaction"], ["eval", "scorer", "--run", "r", "--block-mass", "0.9"], ["eval"]])
def test_cli_model_options_are_model_options_only(argv):
    """Each command's model options convert as they are: an eval option never leaks into them."""
    from sparsemem.cli import _options, parse_args

    options = _options(parse_args(argv))
    assert options
    sparsemem.convert(make_base_model("llama"), **options)


def test_cli_eval_help_is_split_per_suite_and_shows_defaults(capsys):
    from sparsemem.cli import parse_args

    assert parse_args(["-v", "eval", "--output", "x"]).suite == "retrieval"  # no suite named: retrieval
    assert parse_args(["eval", "online", "--budgets", "64"]).budgets == [64]
    helps = {}
    for argv in (["eval", "--help"], ["eval", "compaction", "--help"], ["eval", "online", "--help"], ["export", "--help"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
        helps[argv[-2]] = " ".join(capsys.readouterr().out.split())
    assert all(suite in helps["eval"] for suite in ("retrieval", "compaction", "online", "scorer"))
    assert "--ratios" in helps["compaction"] and "--budgets" not in helps["compaction"]
    assert "--budgets" in helps["online"] and "--ratios" not in helps["online"]
    assert "(default: [256, 512])" in helps["online"] and "(default: 3000)" in helps["online"]
    assert "(default: float32)" in helps["export"]


def test_cli_whole_span_share_takes_auto_none_or_a_share():
    from sparsemem.cli import build_parser

    parser = build_parser()
    parse = lambda *extra: parser.parse_args(["eval", "compaction", *extra]).whole_span_share  # noqa: E731
    assert (parse(), parse("--whole-span-share", "none"), parse("--whole-span-share", "0.5")) == ("auto", None, 0.5)
    with pytest.raises(SystemExit):  # argparse prints the message naming the option and exits
        parse("--whole-span-share", "half")
