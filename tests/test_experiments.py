"""The scripts of `experiments/`: each imports without doing any work, reaches sparsemem through its public
API only, and the cheap ones run end to end on a tiny random Llama with real text, their numbers checked
against the evaluation or against identities they must satisfy."""

import ast
import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

import sparsemem
from sparsemem.corpus import python_reference_docs

from conftest import ByteTokenizer, make_base_model

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SCRIPTS = sorted(EXPERIMENTS.glob("*.py"))


@pytest.fixture(scope="module", autouse=True)
def experiments_on_path():
    # the scripts import their shared `harness` as a sibling, as when run as `python experiments/x.py`
    sys.path.insert(0, str(EXPERIMENTS))
    yield
    sys.path.remove(str(EXPERIMENTS))


@pytest.fixture(scope="module")
def tiny():
    """A dense-equivalent sparsemem model of a tiny random Llama, a byte tokenizer, real text."""
    model = sparsemem.convert(make_base_model("llama"), top_k_blocks=None, block_fraction=None)
    return model, ByteTokenizer(), python_reference_docs()


def test_the_experiments_are_found():
    assert {"harness", "compaction_kl", "compaction_time", "needles", "gpu_profile"} <= {path.stem for path in SCRIPTS}


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda path: path.stem)
def test_experiment_imports_and_uses_the_public_api(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sparsemem"):
            private = [alias.name for alias in node.names if alias.name.startswith("_")]
            assert not private and "._" not in f".{node.module}", f"{path.name} imports private {node.module} {private}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
            assert "importlib" not in names and "runpy" not in names, f"{path.name} reaches modules around the import system"
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            # patching a module's globals at run time (e.g. `compact_module.REPEAT_REACH = ...`)
            assert not (isinstance(node.value, ast.Name) and node.value.id in {"sparsemem", "compaction", "C"}), \
                f"{path.name} sets {ast.unparse(node)}"
    module = importlib.import_module(path.stem)
    assert module.__doc__ and len(module.__doc__.split()) > 20, f"{path.name} needs a docstring saying what it measures"
    if path.stem != "harness":
        # the docstring says how to run it and which report it writes; the work waits for main()
        assert f"python experiments/{path.name}" in module.__doc__ and "reports/" in module.__doc__
        assert callable(module.main)
        assert "if __name__ == \"__main__\":\n    main()" in path.read_text(encoding="utf-8")


def test_compaction_kl_agrees_with_the_evaluation(tiny):
    from compaction_kl import run

    from sparsemem.evaluation_compaction import evaluate_compaction

    model, tokenizer, corpus = tiny
    rows = list(run(model, tokenizer, corpus, [{"method": "streaming-llm"}, {"method": "am", "press": {"exact_newest": 0.5}}],
                    ratios=[1, 4], length=192, continuation=32))
    assert [(row["method"], row["ratio"]) for row in rows] == [("streaming-llm", 1), ("streaming-llm", 4), ("am", 1), ("am", 4)]
    for row in rows:
        if row["ratio"] == 1:  # nothing to compact: the continuation reads the full cache
            assert abs(row["kl"]) < 1e-6 and 0.95 < row["bytes"] <= 1.0  # slots also store their beta
        else:
            assert row["kl"] > 0 and 3.5 < row["bytes"] <= 4.05, row
    # fitted slots beat the sink + recent window at the same bytes (as on SmolLM2)
    assert rows[3]["kl"] < rows[1]["kl"] / 10
    # the same document, method and ratio through `sparsemem eval compaction`'s own loop
    results, _ = evaluate_compaction(model, tokenizer, corpus, methods=["streaming-llm"], ratios=[4], length=192,
                                     continuation=32, needle_depths=())
    assert rows[1]["kl"] == pytest.approx(results[1].kl, abs=2e-4)


def test_compaction_kl_averages_documents(tiny):
    from compaction_kl import run

    model, tokenizer, corpus = tiny
    config = [{"method": "streaming-llm"}]
    two = next(run(model, tokenizer, corpus, config, [4], length=128, continuation=16, documents=2))
    first = next(run(model, tokenizer, corpus, config, [4], length=128, continuation=16))
    second = next(run(model, tokenizer, corpus, config, [4], length=128, continuation=16, offset=20000 + 144))
    assert two["kl"] == pytest.approx((first["kl"] + second["kl"]) / 2, abs=2e-4)


def test_needles_modes_agree(tiny):
    from harness import NeedleCase
    from needles import answers, restore, tokens

    model, tokenizer, corpus = tiny
    cases = [NeedleCase(model, tokenizer, corpus, seed=0, depth=0.5, length=320)]
    am, streaming = answers(cases, [{"ratios": [4]}, {"method": "streaming-llm", "ratios": [4]}])
    per_token = {row["ratio"]: row for row in tokens(cases, ratios=(1, 4))}  # default AM
    [restored] = restore(cases, ratio=4, compact_args={"method": "streaming-llm"})
    assert am["key"] == cases[0].key and am["correct"] == (cases[0].key in am["answer"])
    # one answer log-probability through several code paths
    assert am["logprob"] == pytest.approx(per_token[4]["sum"], abs=0.02)
    assert streaming["logprob"] == pytest.approx(restored["compact"], abs=0.02) and streaming["logprob"] != am["logprob"]
    assert per_token[1]["sum"] == pytest.approx(restored["full"], abs=0.02)
    assert len(per_token[1]["rest"]) == len(cases[0].answer_ids) - 1 and all(x <= 0 for x in per_token[4]["rest"])
    # two layers: restoring one leaves exactly the other compacted
    assert restored["restored"] == pytest.approx(restored["only"][::-1], abs=0.011)
    assert restored["full"] != restored["compact"]
    assert max(restored["physical"]) < cases[0].document.shape[1]
    # copy scores: shares of attention, best heads first, over the model's 2 layers x 2 KV heads
    from needles import copy_scores

    [scores] = copy_scores(cases, model)
    heads = scores["layer_head_echo_induction"]
    assert sorted((layer, head) for layer, head, _, _ in heads) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    best = [max(echo, induction) for _, _, echo, induction in heads]
    assert best == sorted(best, reverse=True) and all(0 <= x <= 1 for x in best)


def test_compaction_time_rows(tiny):
    from compaction_time import run

    from sparsemem.corpus import token_window

    model, tokenizer, corpus = tiny
    ids = torch.tensor([token_window(tokenizer, corpus, 256, offset=20000)])
    rows = list(run(model, tokenizer, ids, ratio=4))
    assert rows[0]["step"].startswith("prefill") and rows[0]["context"] == 256
    assert [(row["method"], row["queries"]) for row in rows[1:]] == [("am", ["context"]), ("streaming-llm", ["context"]), ("am", ["repeat"])]
    for row in rows[1:]:
        assert row["seconds"] >= 0 and row["bytes_ratio"] == pytest.approx(4, rel=0.1)


def test_bad_arguments_are_named_before_any_model_loads():
    import compaction_kl
    import needles

    with pytest.raises(SystemExit, match="config 2: not valid JSON"):
        compaction_kl.main(["{}", "{method: am}"])
    with pytest.raises(SystemExit, match="--cases: expected a JSON list of"):
        needles.main(["--cases", "[[1]]", "tokens"])
    import block_reps

    with pytest.raises(SystemExit, match='needs a "name"'):
        block_reps.main(["--configs", '[{"block_size": 64}]'])
    from harness import build_press

    with pytest.raises(ValueError, match="no option"):
        build_press("am", {"exact_newst": 0.5})


def test_block_reps_rows_follow_the_evaluation(tiny):
    """Whole sub-blocks make "subminmax" the "minmax" scorer: the same answers, perplexity and density."""
    from block_reps import run_config

    model, _, corpus = tiny
    tokenizer = ByteTokenizer()
    tokenizer.pad_token_id = None  # generate() reads it
    options = {"block_size": 16, "top_k_blocks": 1, "block_fraction": 0.1, "local_tokens": 16}
    args = (model, tokenizer, corpus, [300], [0.5], 200)
    dense = run_config({"name": "dense"}, *args)
    minmax = run_config({"name": "minmax", **options}, *args)
    whole = run_config({"name": "sub16", **options, "scorer": "subminmax", "scorer_sub_block": 16}, *args)
    finer = run_config({"name": "sub2", **options, "scorer": "subminmax", "scorer_sub_block": 2}, *args)
    assert dense["passkey_density"] == pytest.approx(1.0) and dense["perplexity_density"] == pytest.approx(1.0)
    assert minmax["passkeys"] == 1 and minmax["options"]["block_size"] == 16
    for name in ("perplexity", "passkey_density", "perplexity_density", "cases"):
        assert whole[name] == minmax[name], name
    assert 0 < minmax["perplexity_density"] < 0.6 and minmax["perplexity"] != dense["perplexity"]
    assert finer["perplexity"] != minmax["perplexity"]
    with pytest.raises(ValueError, match="scorer_sub_block"):
        run_config({"name": "bad", **options, "scorer": "subminmax", "scorer_sub_block": 3}, *args)


def test_block_reps_mass_recall_against_the_dense_attention(tiny):
    """A budget above every block keeps all the attention; whole sub-blocks rank as "minmax"; the states are
    the model's (its dense output is unchanged by the capture)."""
    from block_reps import last_query_states, mass_recall

    model, tokenizer, corpus = tiny
    ids = torch.tensor([tokenizer(corpus.text[5000:5400])["input_ids"]])
    with torch.no_grad():
        before = model(ids).logits
    states = last_query_states(model, ids)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert len(states) == model.config.num_hidden_layers and states[0][1].shape[-2] == 400
    specs = [{"name": "minmax", "block_size": 16, "scorer": "minmax"},
             {"name": "whole", "block_size": 16, "scorer": "subminmax", "scorer_sub_block": 16},
             {"name": "exact", "block_size": 16, "scorer": "subminmax", "scorer_sub_block": 1},
             {"name": "oracle", "block_size": 16, "scorer": "oracle"}]
    everything = list(mass_recall(states, specs, [2.0], sink=4, local=16))  # room for every block
    assert all(row["mass_recall"] == pytest.approx(1.0, abs=1e-5) for row in everything)
    rows = {row["name"]: row for row in mass_recall(states, specs, [0.15], sink=4, local=16)}
    assert rows["whole"]["mass_recall"] == rows["minmax"]["mass_recall"]
    assert rows["minmax"]["tokens"] == 4 + 16 + rows["minmax"]["blocks"] * 16 <= 0.15 * 400
    assert all(0 < row["mass_recall"] < 1 for row in rows.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="profiles the kernels on CUDA")
def test_gpu_profile_needs_cuda():
    import gpu_profile

    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_profile.main(["decode"])


def test_stream_positions_runs_on_a_tiny_model(tiny):
    """A short stream per configuration: finite losses, and positions/placement honoured."""
    stream_positions = importlib.import_module("stream_positions")
    model, tokenizer, _ = tiny
    row = stream_positions.run(model, tokenizer, "am", "cache", True, tokens=200, chunk=40, budget=64)
    assert row["loss"] is not None and math.isfinite(row["loss"]) and row["positions"] == "cache" and row["place_slots"]
    assert len(row["chunk_losses"]) == 5


def test_stream_sweep_runs_each_configuration_on_a_tiny_model(tiny):
    """Configurations reach the online compaction and its press; unknown keys are refused."""
    stream_sweep = importlib.import_module("stream_sweep")
    model, tokenizer, _ = tiny
    model = sparsemem.convert(model, top_k_blocks=None, block_fraction=None, positions="cache")
    rows = [stream_sweep.run(model, tokenizer, config, tokens=200, chunk=40, budget=64)
            for config in ({"method": "streaming-llm"}, {"method": "am", "online": {"num_queries": 32}, "press": {"exact_newest": 0.5}})]
    for row in rows:
        assert math.isfinite(row["loss_within_window"]) and row["tokens"] == 200 and row["budget_respected"]
    assert rows[0]["loss_within_window"] != rows[1]["loss_within_window"]
    with pytest.raises(ValueError, match="unknown configuration keys"):
        stream_sweep.run(model, tokenizer, {"method": "am", "queries": 3}, tokens=200, chunk=40, budget=64)
def test_online_sweep_matches_the_evaluation_and_reaches_the_options(tiny):
    """The default configuration gives `evaluate_online`'s own numbers; options of the online compaction and its
    press change them; unknown keys are refused."""
    from sparsemem.evaluation_compaction import evaluate_online

    online_sweep = importlib.import_module("online_sweep")
    model, tokenizer, corpus = tiny
    expected, _ = evaluate_online(model, tokenizer, corpus, methods=["am"], budgets=(48,), context=120, steps=24)
    plain, changed = online_sweep.run(model, tokenizer, corpus, [{"method": "am"}, {
        "method": "am", "online": {"recent_fraction": 0.75}, "press": {"exact_newest": 0.9}}], (48,), 120, 24)
    assert plain["kl"] == next(result.kl for result in expected if result.method == "am") and plain["method"] == "am"
    assert changed["kl"] != plain["kl"] and changed["compactions"] > 0 and changed["config"]["press"] == {"exact_newest": 0.9}
    with pytest.raises(ValueError, match="unknown configuration keys"):
        online_sweep.run(model, tokenizer, corpus, [{"method": "am"}, {"method": "am", "budget": 3}], (48,), 120, 24)


STAND_IN_REFERENCE = '''
import torch


class HighestAttentionKeysCompaction:
    """Stands in for the reference's class: keeps the newest t keys as they are (beta 0)."""

    def __init__(self, **settings):
        assert settings["score_method"] == "rms" and settings["c2_method"] == "lsq", settings

    def compute_compacted_cache(self, K, V, queries, t, attention_bias=None):
        assert K.shape == V.shape and queries.shape[-1] == K.shape[-1]
        keep = torch.arange(K.shape[0] - t, K.shape[0]).flip(0)  # out of order: the press sorts them
        return K[keep], torch.zeros(t), V[keep], keep.tolist()
'''


def test_am_reference_runs_the_reference_inside_compact(tiny, tmp_path, monkeypatch):
    """With a stand-in reference that keeps each head's newest keys, its "whole" rows are StreamingLLM
    without sinks or recent window, to the digit; without a checkout only our side runs."""
    import am_reference

    model, tokenizer, corpus = tiny
    folder = tmp_path / "checkout" / "compaction" / "algorithms"
    folder.mkdir(parents=True)
    (folder / "highest_attention_keys.py").write_text(STAND_IN_REFERENCE)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("compaction", "compaction.algorithms", "compaction.algorithms.highest_attention_keys"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    reference = am_reference.load_reference(str(tmp_path / "checkout"))
    streaming = {"tag": "streaming", "method": "streaming-llm", "keep_first": 0, "keep_last": 0}
    rows = list(am_reference.run(model, tokenizer, corpus, [streaming, {"tag": "am"}], [4], reference, length=192, continuation=32))
    kl = {(row["side"], row["config"]): row["kl"] for row in rows}
    assert set(kl) == {("reference", "whole"), ("reference", "sinks"), ("sparsemem", "streaming"), ("sparsemem", "am")}
    assert kl[("reference", "whole")] == pytest.approx(kl[("sparsemem", "streaming")], abs=1e-6)
    assert all(row["kl"] > 0 and 3.5 < row["bytes"] <= 4.05 for row in rows)
    assert "| reference | whole |" in am_reference.table(rows)
    ours = list(am_reference.run(model, tokenizer, corpus, [{"tag": "am"}], [4], None, length=192, continuation=32))
    assert [(row["side"], row["config"]) for row in ours] == [("sparsemem", "am")]
    with pytest.raises(SystemExit, match="not a checkout of the reference"):
        am_reference.load_reference(str(tmp_path))


def test_nnls_solvers_rows():
    from nnls_solvers import METHODS, run

    rows = list(run([(2, 64, 8)], torch.device("cpu"), repeats=1))
    assert [row["method"] for row in rows] == list(METHODS)
    excess = {row["method"]: row["residual_excess"] for row in rows}
    assert excess["active-set"] == 0 and abs(excess["fista"]) < 1e-4 and excess["projected gradient alone"] > -1e-9
    assert all(row["seconds"] > 0 for row in rows)


def test_memory_placement_rows_agree_inside_the_window(tiny):
    """The placements read the window identically and differ past it; every row's losses are finite."""
    import memory_placement

    _, tokenizer, corpus = tiny
    base = make_base_model("llama", max_position_embeddings=128)
    sparse = dict(block_size=8, top_k_blocks=2, block_fraction=None, sink_tokens=4, local_tokens=16, positions="auto",
                  query_block_size=8)
    rows = {}
    for name in memory_placement.CONFIGS:
        model, new_cache = memory_placement.build(base, name, sparse, budget=64)
        rows[name] = memory_placement.measure(model, new_cache, tokenizer, corpus, 400, [0.5], 64, 128, "cpu")
    assert all(math.isfinite(row["loss_beyond_window"]) for row in rows.values())
    placed = [rows[f"sparse, {scheme}"] for scheme in ("cache", "fixed", "ordered")]
    assert len({row["loss_within_window"] for row in placed}) == 1
    assert len({row["loss_beyond_window"] for row in placed}) == 3
    assert rows["dense (logical)"]["passkey_cases"][0]["key"] == placed[0]["passkey_cases"][0]["key"]


def test_bank_routing_recall_is_whole_when_every_chunk_is_read(tiny, tmp_path):
    import bank_routing

    model, tokenizer, _ = tiny
    layers = list(range(model.config.num_hidden_layers))
    kwargs = dict(needles=3, code=4, piece_tokens=256, batch_tokens=2048, workdir=tmp_path)
    # a top-k larger than the bank, no floor: every chunk is read, so every answer's chunks are among them
    every = bank_routing.run(model, tokenizer, 60_000, layers, top_k=10**6, min_relative_score=0.0, **kwargs)
    assert [row["layers"] for row in every] == [[layer] for layer in layers] + [layers]
    assert all(row["needle_recall"] == 1.0 and row["code_recall"] == 1.0 for row in every)
    assert every[0]["needles"] == 3 and every[0]["code_questions"] >= 1
    # one chunk read per question: recall falls below 1 (3 needles hide each other, so routing must choose)
    one = bank_routing.run(model, tokenizer, 60_000, layers, top_k=1, min_relative_score=0.0, **kwargs)
    assert all(0.0 <= row["needle_recall"] <= 1.0 for row in one)
    assert min(row["needle_recall"] + row["code_recall"] for row in one) < 2.0
    assert not any(tmp_path.iterdir())  # the bank is removed
