"""`sparsemem eval memory` pieces: needles, AST code questions (checked against `inspect`), BM25 hiding."""

import ast
import importlib
import inspect

import pytest

from conftest import ByteTokenizer
from sparsemem.evaluation_memory import BM25Retriever, Document, build_haystack, code_questions, insert_needles, is_correct


def test_code_questions_match_the_live_signatures():
    tokenizer = ByteTokenizer()
    docs = build_haystack(tokenizer, 1_500_000)
    questions = code_questions(docs, 30)
    assert len(questions) >= 20
    checked = 0
    for question in questions:
        module_name, qualname, param = question.info["module"], question.info["function"], question.info["parameter"]
        try:
            target = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 - some modules cannot be imported here (platform-specific)
            continue
        for part in qualname.split("."):
            target = getattr(target, part, None)
        if target is None:
            continue
        try:
            default = inspect.signature(target).parameters[param].default
        except (TypeError, ValueError, KeyError):
            continue
        assert default == ast.literal_eval(question.accepted[0]), (module_name, qualname, param)
        assert is_correct(question, " " + question.accepted[-1] + ", the rest")
        checked += 1
    assert checked >= 5


def test_needles_sit_inside_the_kept_tokens():
    tokenizer = ByteTokenizer()
    plain = build_haystack(tokenizer, 60_000)
    docs, questions = insert_needles(tokenizer, plain, 6)
    assert len({q.document for q in questions}) == 6 and sum(len(d.ids) for d in docs) > sum(len(d.ids) for d in plain)
    for question in questions:
        lo, hi = question.exclude_span
        text = tokenizer.decode(docs[question.document].ids[lo:hi])
        assert question.accepted[0] in text and "secret number" in text


def test_bm25_finds_a_unique_word_and_hides_spans():
    pytest.importorskip("bm25s")
    tokenizer = ByteTokenizer()
    texts = ["alpha beta gamma " * 10, "delta epsilon zebra quagga " * 10, "omega theta " * 10]
    docs = [Document(f"d{i}", t, tokenizer(t)["input_ids"]) for i, t in enumerate(texts)]
    retriever = BM25Retriever(tokenizer, docs, chunk_tokens=32)
    first = retriever.prompt("where is the quagga", top_k=1, exclude=[])
    assert "quagga" in tokenizer.decode(first)
    hidden = retriever.prompt("where is the quagga", top_k=1, exclude=[(1, (0, len(docs[1].ids)))])
    assert "quagga" not in tokenizer.decode(hidden)


def test_rows_tell_routing_from_reading():
    from sparsemem.evaluation_memory import _summarise, render_memory_markdown

    answers = [
        {"kind": "needle", "depth": 0.0, "key": 11111, "answer": " 11111.", "correct": True, "routed": 1.0,
         "answer_when_forced": " 11111.", "correct_when_forced": True, "seconds_to_first_token": 0.5},
        {"kind": "needle", "depth": 1.0, "key": 22222, "answer": " 3.", "correct": False, "routed": 0.5,
         "answer_when_forced": " 2222.", "correct_when_forced": False, "seconds_to_first_token": 1.5},
        {"kind": "code", "answer": "0", "correct": True, "seconds_to_first_token": 1.0, "code_routed": 1.0},
    ]
    row = _summarise("bank full (per-layer)", 1000, answers)
    assert (row.needle_accuracy, row.routing_recall, row.forced_needle_accuracy, row.code_accuracy) == (0.5, 0.75, 0.5, 1.0)
    assert row.seconds_to_first_token == 1.0
    text = render_memory_markdown([row, _summarise("BM25 RAG", 1000, answers[2:])], {})
    assert "| bank full (per-layer) | 1000 | 50% | 75% | 50% | 100% | 100% | 1.000 |" in text
    assert "| BM25 RAG | 1000 | - | - | - | 100% | 100% |" in text
    assert "| bank full (per-layer) | 1000 | 1.00 | 22222 | 50% | '3.' | '2222.' |" in text


def test_projection_scales_bytes_per_token_and_only_the_routing_time():
    from sparsemem.evaluation_memory import _summarise, render_memory_markdown

    answers = [{"kind": "code", "answer": "0", "correct": True, "seconds_to_first_token": 0.1, "routing_seconds": 0.01}]
    small = _summarise("bank tokens (shared)", 500_000, answers, bytes={"disk": 2**29, "host": 0, "device": 2**28})
    large = _summarise("bank tokens (shared)", 1_000_000, answers, bytes={"disk": 2**30, "host": 2**20, "device": 2**29})
    text = render_memory_markdown([small, large, _summarise("BM25 RAG", 1_000_000, answers)], {})
    # from the 1M row: x100 per tier, 0.1 s + 0.01 s x (100 - 1) = 1.09 s; BM25 has no bank bytes to project
    assert "| bank tokens (shared) | 1000000 | 100.000 | 0.098 | 50.000 | 1.000 | 1.090 |" in text
    assert text.count("| bank tokens (shared) | 500000 |") == 1  # the measured row only, not projected
    assert "| BM25 RAG | 1000000 | 100.000" not in text


def test_answer_span_covers_the_definition_and_its_default():
    tokenizer = ByteTokenizer()
    docs = build_haystack(tokenizer, 300_000)
    from sparsemem.evaluation_memory import answer_span

    questions = code_questions(docs, 5)
    assert len(questions) >= 3
    for question in questions:
        doc = docs[question.document]
        start, end = answer_span(tokenizer, doc, question)
        text = bytes(doc.ids[start + 2 : end - 2]).decode()  # byte tokens: the span's text without its slack
        name = question.info["function"].rsplit(".", 1)[-1]
        assert text.lstrip().startswith(("def " + name, "async def " + name))
        assert question.info["parameter"] in text and text.endswith(question.accepted[0])
