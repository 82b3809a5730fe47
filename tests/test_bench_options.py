"""`sparsemem bench` sparse options: they reach the converted models and caches, or are refused by name; the
decode-small section's quality is `sparsemem eval retrieval`'s (CPU)."""

import math

import pytest
import torch
from conftest import ByteTokenizer, make_base_model

import sparsemem
from sparsemem.bench import SMALL_TIMED_OPTIONS, _decode_run, _sparse_options, run_bench, settings_quality, small_models
from sparsemem.cli import build_parser
from sparsemem.corpus import load_corpus
from sparsemem.evaluation import evaluate_model
from sparsemem.modeling.configuration_sparsemem import SparseMemOptions


def bench_args(*argv):
    return build_parser().parse_args(["bench", *argv])


@pytest.mark.parametrize("argv, message", [
    (["--sections", "decode-small", "--device", "cpu", "--small-scorer", "minmax", "--small-scorer-sub-block", "4"],
     r"--small-scorer minmax --small-scorer-sub-block 4\): `scorer_sub_block` is used by scorer='subminmax' alone"),
    (["--sections", "decode-small", "--device", "cpu", "--small-block-size", "60", "--small-scorer-sub-block", "8"],
     r"--small-block-size 60 .*`scorer_sub_block` \(8\) must divide `block_size` \(60\)"),
    (["--sections", "decode-small", "--device", "cpu", "--small-block-fraction", "1.5"], r"`block_fraction` must be a number in \(0, 1\]"),
    (["--sections", "decode-small", "--device", "cpu", "--small-depths", "0.5", "1.5"], r"--small-depths must lie in \[0, 1\], got \[1.5\]"),
    (["--sections", "decode-small", "--device", "cpu", "--scorer-sub-block", "4"],
     r"--scorer-sub-block is read by the attention/prefill/decode section\(s\) alone"),
    (["--sections", "attention", "--small-block-size", "32"], r"--small-block-size is read by the decode-small section\(s\) alone"),
    (["--sections", "decode", "--small-steps", "64"], r"--small-steps is read by the decode-small section\(s\) alone"),
    (["--sections", "prefill", "--small-context", "2048"], r"--small-context is read by the decode-small section\(s\) alone"),
    (["--sections", "attention", "--scorer", "subminmax"], r"--scorer subminmax --scorer-sub-block None: scorer='subminmax' needs"),
    (["--sections", "decode", "--scorer", "minmax", "--scorer-sub-block", "4"], r"`scorer_sub_block` is used by scorer='subminmax' alone"),
])
def test_bench_refuses_sparse_options_it_would_not_honour(argv, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        run_bench(bench_args(*argv, "--output", str(tmp_path / "out")), "sparsemem bench")
    assert not (tmp_path / "out").exists()  # refused before anything is loaded or written


def test_decode_small_options_reach_the_models_and_both_caches():
    """The GPU-sized configuration runs the --small-* settings: its config holds them, the static cache keeps its
    sub-block summaries, and its teacher-forced loss equals that of a model converted with the same options by hand
    (eager and static cache alike) and differs from the default sub-block's."""
    base = make_base_model("llama", max_position_embeddings=512)
    argv = ["--small-block-size", "16", "--small-top-k-blocks", "1", "--small-block-fraction", "0.1", "--small-scorer-sub-block", "4"]
    models = small_models(base, bench_args(*argv))
    timed = models["GPU-sized"]
    assert models["dense"] is base and models["default"].config.block_size == SparseMemOptions().block_size
    expected = dict(block_size=16, top_k_blocks=1, block_fraction=0.1, scorer="subminmax", scorer_sub_block=4)
    assert {name: getattr(timed.config, name) for name in expected} == expected
    static = sparsemem.StaticSparseMemCache(timed.config, max_cache_len=320, cuda_graph=False)
    assert (static.layers[0].block_size, static.layers[0].sub_block) == (16, 4)

    ids = torch.randint(3, 256, (1, 280), generator=torch.Generator().manual_seed(0))
    context = 256

    def loss(model, cache):
        with torch.no_grad():
            return _decode_run(model, cache, ids, context)[1]

    eager = loss(timed, sparsemem.SparseMemCache(timed.config))
    assert loss(timed, sparsemem.StaticSparseMemCache(timed.config, max_cache_len=320, cuda_graph=False)) == pytest.approx(eager, abs=1e-5)
    by_hand = sparsemem.convert(base, **expected)
    # the same computation on the CPU gives the same bits; another selection moves the loss (by ~2e-5 here)
    assert loss(by_hand, sparsemem.SparseMemCache(by_hand.config)) == pytest.approx(eager, abs=1e-7)
    default_sub_block = small_models(base, bench_args(*argv[:-2]))["GPU-sized"]
    assert default_sub_block.config.scorer_sub_block == SMALL_TIMED_OPTIONS["scorer_sub_block"] == 2
    assert abs(loss(default_sub_block, sparsemem.SparseMemCache(default_sub_block.config)) - eager) > 5e-6
    wider = small_models(base, bench_args(*argv[:-4], "--small-block-fraction", "0.5"))["GPU-sized"]
    assert abs(loss(wider, sparsemem.SparseMemCache(wider.config)) - eager) > 1e-4


def test_the_8b_sections_options_carry_the_scorer_and_its_sub_block():
    """`_sparse_options` (prefill and decode sections' `convert`) carries --scorer and --scorer-sub-block: the
    converted model's output follows them."""
    base = make_base_model("llama", max_position_embeddings=512)
    ids = torch.randint(3, 256, (1, 384), generator=torch.Generator().manual_seed(1))
    common = ["--block-size", "32", "--sink-tokens", "0", "--local-tokens", "32"]
    outputs = {}
    for scorer in (["--scorer", "minmax"], ["--scorer", "subminmax", "--scorer-sub-block", "4"]):
        options = _sparse_options(bench_args(*common, *scorer), 0.125)
        model = sparsemem.convert(base, **options)
        assert (model.config.scorer, model.config.scorer_sub_block) == (options["scorer"], options["scorer_sub_block"])
        with torch.no_grad():
            outputs[model.config.scorer] = model(ids).logits
    assert outputs["subminmax"].shape == outputs["minmax"].shape
    assert (outputs["subminmax"] - outputs["minmax"]).abs().max() > 1e-4


class PaddedByteTokenizer(ByteTokenizer):
    pad_token_id = 0


def test_settings_quality_is_evaluate_model():
    """The decode-small quality rows hold what `sparsemem eval retrieval` (`evaluate_model`) measures."""
    base = make_base_model("llama", max_position_embeddings=1024)
    sparse = sparsemem.convert(base, block_size=16, top_k_blocks=1, block_fraction=0.1, scorer="subminmax", scorer_sub_block=4)
    tokenizer, corpus = PaddedByteTokenizer(), load_corpus(None)
    rows = settings_quality({"dense": base, "GPU-sized": sparse}, tokenizer, corpus, 400, (0.25, 0.75), 300)
    assert [row["configuration"] for row in rows] == ["dense", "GPU-sized"]
    assert rows[0]["block_size"] is None and (rows[1]["block_size"], rows[1]["scorer_sub_block"]) == (16, 4)
    for row, model in zip(rows, (base, sparse)):
        direct = evaluate_model(row["configuration"], model, tokenizer, corpus, [400], [0.25, 0.75], 300)
        assert row["perplexity"] == pytest.approx(direct.perplexity, rel=1e-6) and math.isfinite(row["perplexity"])
        assert row["perplexity_density"] == direct.perplexity_density and row["perplexity_tokens"] == 300
        assert [case["answer"] for case in row["cases"]] == [case.answer for case in direct.passkey]
        assert row["passkeys_correct"] == sum(case.correct for case in direct.passkey) and row["passkeys"] == 2
        densities = [case.density for case in direct.passkey]
        if model is base:
            assert row["passkey_density"] is None and densities == [None, None]
        else:
            assert row["passkey_density"] == pytest.approx(sum(densities) / 2) and 0 < row["passkey_density"] < 1


@pytest.mark.slow
def test_bench_decode_small_on_the_cpu_with_smollm2(tmp_path, smollm2_dir):
    """`sparsemem bench --sections decode-small --device cpu`: timed rows and quality rows of the three
    configurations in one report; the static cache steps give the eager loss; the dense perplexity is eval's."""
    import json

    from sparsemem.cli import main
    from sparsemem.corpus import token_window
    from sparsemem.default_model import load_model
    from sparsemem.evaluation import perplexity

    code = main(["bench", "--sections", "decode-small", "--device", "cpu", "--small-context", "256", "--small-steps", "4",
                 "--small-depths", "0.5", "--small-ppl-length", "96", "--output", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["decode_small_failed"] == []
    rows = {(r["configuration"], r["method"]): r for r in report["decode_small"]}
    for name in ("default", "GPU-sized"):
        eager, static = rows[name, "sparsemem eager, SparseMemCache"], rows[name, "sparsemem, static cache (eager steps)"]
        assert static["nll"] == pytest.approx(eager["nll"], abs=1e-4) and 0 < eager["decode_density"] < 1
    quality = {q["configuration"]: q for q in report["decode_small_quality"]}
    assert list(quality) == ["dense", "default", "GPU-sized"]
    assert (quality["GPU-sized"]["block_size"], quality["GPU-sized"]["scorer"], quality["GPU-sized"]["scorer_sub_block"]) == (64, "subminmax", 2)
    assert quality["default"]["block_size"] == SparseMemOptions().block_size
    assert all(q["passkeys"] == 1 and q["passkey_length"] == 256 and q["perplexity_tokens"] == 96 for q in quality.values())
    _, tokenizer, base = load_model(None, "cpu", "float32")
    direct = perplexity(base, token_window(tokenizer, load_corpus(None), 96))
    assert quality["dense"]["perplexity"] == pytest.approx(direct, rel=1e-5)
    markdown = (tmp_path / "bench.md").read_text()
    assert "Quality at the timed settings" in markdown and "| GPU-sized | 64 | subminmax (sub-blocks of 2) | 1 / 0.1 |" in markdown
