"""`sparsemem eval ruler`: the task generators against independent parsing of their prompts, the scorer on
known answers, a tiny end-to-end run and the lm-eval export."""

import json
import re
from dataclasses import asdict
from collections import Counter

import pytest
import torch
import yaml

from conftest import ByteTokenizer, make_base_model
from sparsemem.corpus import load_corpus
from sparsemem.evaluation_ruler import (
    NIAH_SHAPES,
    TASKS,
    evaluate_ruler,
    export_lm_eval,
    lm_eval_process_results,
    make_sample,
    make_samples,
    merge_reports,
    read_progress,
    score_answer,
    summarize,
    write_ruler_report,
    zipf_counts,
)

LENGTH = 3000  # bytes = tokens with the byte tokenizer


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(None)


def _text(tokenizer, sample) -> str:
    return tokenizer.decode(sample.context)


def _prompt_tokens(tokenizer, sample) -> int:
    return len(sample.context) + len(tokenizer(sample.question)["input_ids"])


@pytest.mark.parametrize("task", sorted(NIAH_SHAPES))
def test_niah_needles_and_answers(corpus, task):
    tokenizer = ByteTokenizer()
    sample = make_sample(task, tokenizer, corpus, LENGTH, index=1)
    assert _prompt_tokens(tokenizer, sample) == LENGTH
    needles = re.findall(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.", _text(tokenizer, sample))
    written, per_key, asked = NIAH_SHAPES[task]
    assert len(needles) == written * per_key
    values = {}
    for key, value in needles:
        values.setdefault(key, []).append(value)
    assert len(values) == written and all(len(v) == per_key for v in values.values())
    asked_keys = [key for key in values if key in sample.question]
    assert len(asked_keys) == asked
    assert sorted(sample.expected) == sorted(v for key in asked_keys for v in values[key])


def test_variable_tracking_chain_resolves(corpus):
    tokenizer = ByteTokenizer()
    for index in range(3):
        sample = make_sample("vt", tokenizer, corpus, LENGTH, index=index)
        assert _prompt_tokens(tokenizer, sample) == LENGTH
        assignments = dict(re.findall(r"VAR ([A-Z]{5}) = ([A-Z]{5}|\d+)\.", _text(tokenizer, sample)))
        assert len(assignments) == 5

        def resolve(name):
            value = assignments[name]
            return resolve(value) if value in assignments else value

        value = re.search(r"assigned the value (\d+)", sample.question).group(1)
        assert sorted(name for name in assignments if resolve(name) == value) == sorted(sample.expected)


def test_common_words_are_the_most_common(corpus):
    tokenizer = ByteTokenizer()
    sample = make_sample("cwe", tokenizer, corpus, LENGTH, index=0)
    assert LENGTH - 64 <= _prompt_tokens(tokenizer, sample) <= LENGTH
    counts = Counter(re.findall(r"^\d+\. ([a-z]+)$", _text(tokenizer, sample), flags=re.M))
    common = set(sample.expected)
    assert len(common) == 10
    assert min(counts[w] for w in common) > max(c for w, c in counts.items() if w not in common)


def test_frequent_words_follow_zipf(corpus):
    tokenizer = ByteTokenizer()
    sample = make_sample("fwe", tokenizer, corpus, LENGTH, index=2)
    assert LENGTH - 64 <= _prompt_tokens(tokenizer, sample) <= LENGTH
    body = _text(tokenizer, sample).split("\n\n", 1)[1]
    ranked = Counter(body.split()).most_common()
    assert [w for w, _ in ranked[:3]] == sample.expected
    assert ranked[0][1] > ranked[1][1] > ranked[2][1] > ranked[3][1]
    # counts in proportion to rank^-2: the second word a quarter of the first, the third a ninth
    assert ranked[1][1] == int(ranked[0][1] / 4) or abs(ranked[1][1] - ranked[0][1] / 4) <= 1
    assert abs(ranked[2][1] - ranked[0][1] / 9) <= 1


def test_zipf_counts_closed_form():
    norm = 1 + 1 / 4 + 1 / 9 + 1 / 16
    assert zipf_counts(1000, 4) == [int(1000 / norm), int(1000 / 4 / norm), int(1000 / 9 / norm), int(1000 / 16 / norm)]
    assert zipf_counts(10, 100)[-1] > 0  # words with no occurrence are dropped


def test_samples_are_reproducible(corpus):
    tokenizer = ByteTokenizer()
    first = make_sample("niah_multikey", tokenizer, corpus, LENGTH, index=0, seed=3)
    assert first == make_sample("niah_multikey", tokenizer, corpus, LENGTH, index=0, seed=3)
    assert first.expected != make_sample("niah_multikey", tokenizer, corpus, LENGTH, index=1, seed=3).expected
    with pytest.raises(ValueError, match="--tasks"):
        make_sample("qa", tokenizer, corpus, LENGTH, index=0)
    with pytest.raises(ValueError, match="--lengths"):
        make_sample("vt", tokenizer, corpus, 200, index=0)


def test_score_answer_on_known_outputs():
    assert score_answer(" 1234567.", ["1234567"]) == 1.0
    assert score_answer(" 1234568.", ["1234567"]) == 0.0
    assert score_answer("QYMYQ, qvegi and AZX", ["QYMYQ", "QVEGI", "AZXQX"]) == pytest.approx(2 / 3)
    assert score_answer("1. read 2. build", ["read", "build", "much", "fake"]) == 0.5
    assert lm_eval_process_results({"outputs": ["12", "34"]}, [" 12 and 56"]) == {"score": 0.5}
    with pytest.raises(ValueError):
        score_answer("x", [])


def test_end_to_end_tiny_model(corpus, tmp_path, monkeypatch):
    import sparsemem

    tokenizer = ByteTokenizer()
    model = sparsemem.convert(make_base_model("llama"), top_k_blocks=None, block_fraction=None)
    samples = make_samples(tokenizer, corpus, ["niah_single", "vt"], [480], samples=1)
    for sample in samples:  # a random model's answers: a few tokens show the path, more only cost time
        sample.max_new_tokens = 4
    results = evaluate_ruler(model, tokenizer, samples, methods=["am", "streaming-llm"], ratios=[5],
                             progress=tmp_path / "progress.jsonl", meta={"model": "tiny"})
    assert [(r.task, r.method) for r in results] == [(t, m) for t in ("niah_single", "vt") for m in ("am", "streaming-llm", "full")]
    for r in results:
        assert r.score == score_answer(r.answer, r.expected) and r.prompt_tokens == 480
    by = {(r.task, r.method): r for r in results}
    for task in ("niah_single", "vt"):
        # about a fifth of the full cache's bytes at 5x
        assert 3.5 < by[(task, "full")].kv_bytes / by[(task, "am")].kv_bytes < 6
        # the full cache's answer equals a greedy generation over the whole prompt at once
        sample = next(s for s in samples if s.task == task)
        question = tokenizer(sample.question)["input_ids"]
        ids = torch.tensor([sample.context + question])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=sample.max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert by[(task, "full")].answer == tokenizer.decode(out[0, ids.shape[1]:])
    paths = write_ruler_report(results, {"model": "tiny"}, tmp_path)
    names = sorted(p.name for p in paths)
    assert names[:2] == ["ruler.json", "ruler.md"]
    try:
        import matplotlib  # noqa: F401  (the `plot` extra)
    except ImportError:
        assert names == ["ruler.json", "ruler.md"]
    else:
        assert names[2:] == ["ruler.png"] and (tmp_path / "ruler.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads((tmp_path / "ruler.json").read_text())
    assert payload["summary"] == summarize(results)
    mean = payload["summary"]["mean/480"]["am 5x"]
    assert mean == pytest.approx(50 * (by[("niah_single", "am")].score + by[("vt", "am")].score))
    assert "| niah_single | 480 |" in (tmp_path / "ruler.md").read_text()
    assert len((tmp_path / "progress.jsonl").read_text().splitlines()) == 1 + len(results)
    # two runs' progress merged into one report (a row measured by both counted once)
    rows = [json.dumps(asdict(r)) for r in results]
    (tmp_path / "a.jsonl").write_text("\n".join([json.dumps({"meta": {"model": "tiny"}})] + rows[:4]))
    (tmp_path / "b.jsonl").write_text("\n".join([json.dumps({"meta": {"model": "tiny", "seed": 0}})] + rows[3:]))
    merge_reports([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], str(tmp_path / "merged"))
    assert json.loads((tmp_path / "merged" / "ruler.json").read_text())["summary"] == summarize(results)
    (tmp_path / "c.jsonl").write_text(json.dumps({"meta": {"model": "other"}}))
    with pytest.raises(ValueError, match="model"):
        merge_reports([str(tmp_path / "a.jsonl"), str(tmp_path / "c.jsonl")], str(tmp_path / "merged"))
    # resumed: everything measured is kept, no context is read again
    kept = read_progress(tmp_path / "progress.jsonl", {"model": "tiny"})
    assert kept == results
    monkeypatch.setattr("sparsemem.cache_compaction.prefill", lambda *a, **k: pytest.fail("re-measured"))
    assert evaluate_ruler(model, tokenizer, samples, methods=["am", "streaming-llm"], ratios=[5], done=kept) == results
    with pytest.raises(ValueError, match="--resume.*model"):
        read_progress(tmp_path / "progress.jsonl", {"model": "other"})
    with pytest.raises(ValueError, match="window"):
        evaluate_ruler(model, tokenizer, make_samples(tokenizer, corpus, ["niah_single"], [1100], samples=1))


def test_lm_eval_export(corpus, tmp_path):
    tokenizer = ByteTokenizer()
    samples = make_samples(tokenizer, corpus, ["niah_multivalue", "fwe"], [800, 1000], samples=2)
    export_lm_eval(samples, tokenizer, tmp_path)

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))
    group = yaml.load((tmp_path / "sparsemem_ruler.yaml").read_text(), Loader=Loader)
    assert group["task"] == ["ruler_niah_multivalue_800", "ruler_niah_multivalue_1000", "ruler_fwe_800", "ruler_fwe_1000"]
    for name in group["task"]:
        config = yaml.load((tmp_path / f"{name}.yaml").read_text(), Loader=Loader)
        assert config["task"] == name and config["output_type"] == "generate_until"
        assert config["process_results"] == ("function", "ruler_metric.process_results")
        rows = [json.loads(line) for line in open(config["dataset_kwargs"]["data_files"]["test"])]
        chosen = [s for s in samples if f"ruler_{s.task}_{s.length}" == name]
        assert [r["outputs"] for r in rows] == [s.expected for s in chosen]
        assert [r["input"] for r in rows] == [tokenizer.decode(s.context) + s.question for s in chosen]
        assert config["generation_kwargs"]["max_gen_toks"] == chosen[0].max_new_tokens
    assert "lm_eval_process_results as process_results" in (tmp_path / "ruler_metric.py").read_text()


def test_cli_defaults_and_checks():
    import sparsemem
    from sparsemem.arguments import check_arguments
    from sparsemem.cli import _options, parse_args

    args = parse_args(["eval", "ruler"])
    assert args.tasks == list(TASKS) and args.ratios == [5, 10] and args.methods == ["am", "kvzip", "streaming-llm"]
    assert args.lengths == [4096] and args.func.__name__ == "cmd_eval"
    check_arguments(args)
    sparsemem.convert(make_base_model("llama"), **_options(args))  # no eval option among the model's
    with pytest.raises(ValueError, match="--samples"):
        check_arguments(parse_args(["eval", "ruler", "--samples", "0"]))
    with pytest.raises(ValueError, match="--methods"):
        check_arguments(parse_args(["eval", "ruler", "--methods", "nope"]))


def test_cli_refuses_unhonoured_options(tmp_path, capsys):
    from sparsemem.cli import main

    assert main(["eval", "ruler", "--top-k-blocks", "8", "--output", str(tmp_path / "out")]) == 2
    assert "--top-k-blocks" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_export_lm_eval_with_the_real_tokenizer(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    from sparsemem.cli import main

    assert main(["eval", "ruler", "--export-lm-eval", str(tmp_path), "--tasks", "niah_single", "cwe",
                 "--lengths", "512", "--samples", "2"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    for task in ("niah_single", "cwe"):
        rows = [json.loads(line) for line in (tmp_path / f"ruler_{task}_512.jsonl").read_text().splitlines()]
        assert len(rows) == 2
        for row in rows:
            # decoded and tokenized again by lm-eval: about the target length
            assert 480 <= len(tokenizer(row["input"], add_special_tokens=False).input_ids) <= 520
            assert all(expected in row["input"] for expected in row["outputs"])
