"""The real default model, SmolLM2-135M-Instruct (Llama architecture), on real text."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sparsemem
from sparsemem.cli import main
from sparsemem.corpus import load_corpus, passkey_case, token_window
from sparsemem.evaluation import answer_passkey, perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    return tokenizer, model


@torch.no_grad()
def test_dense_equivalent_on_real_text(smollm2):
    """Against the base model's eager attention (the same materialised softmax; transformers' own sdpa and
    eager paths differ by ~9e-5 on these logits, whose magnitude reaches ~43)."""
    tokenizer, base = smollm2
    sparse = sparsemem.convert(base, top_k_blocks=None)
    ids = torch.tensor([token_window(tokenizer, load_corpus(), 700, offset=5000)])
    base.set_attn_implementation("eager")
    try:
        reference = base(ids).logits
    finally:
        base.set_attn_implementation("sdpa")
    diff = (reference - sparse(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert torch.equal(base.generate(ids, **kwargs), sparse.generate(ids, **kwargs))


@torch.no_grad()
def test_sparse_budget_keeps_retrieval_and_perplexity(smollm2):
    """Default sparse options at 2K tokens: same pass-key answers as dense, perplexity within 5%."""
    tokenizer, base = smollm2
    sparse = sparsemem.convert(base)
    corpus = load_corpus()
    for depth in (0.25, 0.75):
        case = passkey_case(tokenizer, corpus, 2000, depth)
        dense_answer = answer_passkey(base, tokenizer, case)
        sparse_answer = answer_passkey(sparse, tokenizer, case)
        assert (case.passkey in dense_answer) == (case.passkey in sparse_answer), (dense_answer, sparse_answer)
    ids = token_window(tokenizer, corpus, 2000, offset=0)
    sparse.reset_sparsemem_stats()
    dense_ppl, sparse_ppl = perplexity(base, ids), perplexity(sparse, ids)
    density = sparse.sparsemem_stats()["density"]
    assert density < 0.4
    assert dense_ppl <= sparse_ppl * 1.001  # skipping blocks does not help on average
    assert sparse_ppl / dense_ppl < 1.05, (dense_ppl, sparse_ppl)


def test_demo_command(capsys):
    assert main(["demo", "--length", "1500", "--depth", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "dense     answer" in out and "sparsemem answer" in out and "attention density" in out


@torch.no_grad()
def test_self_study_queries_drive_compaction(smollm2):
    """The model writes about a real document; the queries of its own words are captured (standing for
    the future: position -1) and Attention Matching compacts the document with them alone."""
    from sparsemem.query_sources import SelfStudyQueries, capture_reference_queries

    tokenizer, base = smollm2
    model = sparsemem.convert(base)
    ids = torch.tensor([token_window(tokenizer, load_corpus(), 300, offset=9000)])
    queries = capture_reference_queries(model, ids, (SelfStudyQueries(max_new_tokens=12),), tokenizer)
    assert sorted(queries) == list(range(model.config.num_hidden_layers))
    layer0, positions, outside = queries[0]
    assert layer0.shape[:2] == (1, model.config.num_attention_heads) and 0 < layer0.shape[2] <= 12
    assert bool((positions == -1).all())
    # the written words also read the prompt and themselves: a finite log-sum-exp beyond the document
    assert outside.shape == layer0.shape[:-1] and bool(torch.isfinite(outside).all())
    cache = sparsemem.SparseMemCache(model.config)
    model(ids, past_key_values=cache)
    full_bytes = cache.memory_bytes()["total"]
    sparsemem.compact(model, cache, ratio=5, method="am", queries=("self-study",), reference_queries=queries)
    assert cache.compaction.queries == ["self-study"]
    assert abs(full_bytes / cache.memory_bytes()["total"] - 5) < 0.25
    assert torch.isfinite(model(ids[:, -1:], past_key_values=cache).logits).all()


def test_compaction_eval_writes_progress_that_merges_like_the_report(smollm2, tmp_path):
    """Each measured row reaches progress.jsonl at once; a folder holding only it merges into the same report."""
    import json

    from sparsemem.corpus import load_corpus
    from sparsemem.evaluation_compaction import evaluate_compaction, merge_reports, render_compaction_markdown

    tokenizer, base = smollm2
    model = sparsemem.convert(base, top_k_blocks=None, block_fraction=None)
    progress = tmp_path / "run" / "progress.jsonl"
    results, meta = evaluate_compaction(model, tokenizer, load_corpus(None), methods=["streaming-llm"], ratios=[4],
                                        length=160, continuation=24, needle_depths=(0.5,), documents=2, progress=progress)
    lines = [json.loads(line) for line in progress.read_text().splitlines()]
    assert lines[0]["meta"] == meta and meta["documents"] == 2 and meta["needle_cases"] == 2
    assert [row["method"] for row in lines[1:]] == ["full", "streaming-llm"] == [r.method for r in results]
    assert lines[2]["kl"] == results[1].kl > 0 and 3.5 < results[1].bytes_ratio < 4.5
    # every needle case is listed with its answer, one per (document, depth), and the accuracy counts them
    for row, result in zip(lines[1:], results):
        answers = row["needle_answers"]
        assert [(a["seed"], a["depth"]) for a in answers] == [(0, 0.5), (1, 0.5)] and answers[0]["key"] != answers[1]["key"]
        assert result.needle_accuracy == sum(a["key"] in a["answer"] for a in answers) / 2
    markdown = render_compaction_markdown(results, meta)
    assert ("## Needles missed" in markdown) == any(r.needle_accuracy < 1 for r in results)
    merged = json.loads(merge_reports([str(tmp_path / "run")], str(tmp_path / "merged"))[0].read_text())
    assert [row["kl"] for row in merged["results"]] == [r.kl for r in results]


def test_needle_wordings_share_keys_lengths_and_haystacks(smollm2):
    tokenizer, _ = smollm2
    corpus = load_corpus(None)
    a = passkey_case(tokenizer, corpus, 600, 0.5, seed=3)
    b = passkey_case(tokenizer, corpus, 600, 0.5, seed=3, wording="secret-number")
    assert a.passkey == b.passkey and len(a.input_ids) == len(b.input_ids) == 600
    text = tokenizer.decode(b.input_ids)
    assert text.count("secret number") == 4 and "pass key" not in text and text.endswith("The secret number is")
    assert tokenizer.decode(a.input_ids[:40]) == tokenizer.decode(b.input_ids[:40])  # same intro and haystack start
    with pytest.raises(ValueError, match="secret-number"):
        passkey_case(tokenizer, corpus, 600, 0.5, wording="secret")


@pytest.mark.slow
def test_compaction_eval_without_needles_and_on_policy(smollm2):
    """No needle depths: no pass-key cases and no accuracy claimed; on-policy fits change AM's slots only."""
    from sparsemem.corpus import load_corpus
    from sparsemem.evaluation_compaction import evaluate_compaction, render_compaction_markdown

    tokenizer, base = smollm2
    model = sparsemem.convert(base, top_k_blocks=None, block_fraction=None)
    runs = {}
    for on_policy in (False, True):
        runs[on_policy] = evaluate_compaction(model, tokenizer, load_corpus(None), methods=["am", "streaming-llm"], ratios=[4],
                                              length=160, continuation=24, needle_depths=(), on_policy=on_policy)
    (off, _), (on, meta) = runs[False], runs[True]
    assert meta["needle_cases"] == 0 and meta["on_policy"] is True
    assert all(r.needle_accuracy is None for r in on) and "Needle" not in render_compaction_markdown(on, meta)
    assert on[1].method == "am" and on[1].kl != off[1].kl and math.isfinite(on[1].kl)
    assert on[2].kl == off[2].kl  # StreamingLLM fits nothing, so on-policy leaves it alone
