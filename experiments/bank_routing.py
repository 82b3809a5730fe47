"""Which layers should route a memory bank's questions: routing recall per set of routing layers.

One bank of token ids (`store="tokens"`, so ingestion runs only up to the last candidate layer) holds a
haystack of `--tokens` tokens of Python sources with `--needles` needles and the code questions of
`sparsemem eval memory` (the same builders, the same hiding of the other cases' needles). Every question
is scored once at every candidate layer (`memory_recall.chunk_scores`); each layer set then chooses as a
bank routed by those layers would (scores summed over the set, the top `--top-k` chunks that reach
`--min-relative-score` of the best). Reported per set: the share of needle and of code questions whose
answer chunks are among those chosen (for a code question, the chunks from its function's `def` to the
default value asked for). Nothing is generated: this measures routing alone, cheaply. One JSON line per set:

    python experiments/bank_routing.py --tokens 524288 --layers 2 3 5 8 11 --sets 3,5 5,8 --top-k 8 \
        > reports/memory-bank-cpu/routing-layers/results.jsonl
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from sparsemem import MemoryBank
from sparsemem.evaluation_memory import answer_span, build_haystack, chunks_overlapping, code_questions, insert_needles
from sparsemem.memory_recall import chunk_scores, question_queries


def chosen(scores: torch.Tensor, top_k: int, min_relative_score: float) -> set[int]:
    """The chunks a bank routed by these summed `scores` [N] reads: the top `top_k` that reach the floor."""
    top = scores.topk(min(top_k, scores.numel()))
    return set(top.indices[top.values >= min_relative_score * scores.max()].tolist())


@torch.no_grad()
def run(model, tokenizer, tokens: int, layers: list[int], sets: list[list[int]] | None = None, needles: int = 10,
        code: int = 100, top_k: int = 8, min_relative_score: float = 0.5, piece_tokens: int | None = None,
        batch_tokens: int = 32768, workdir: Path | None = None) -> list[dict]:
    """Rows {"layers", "needle_recall", "code_recall", "needles", "code_questions"}: one per single layer of
    `layers`, then all of them together, then each of `sets`."""
    plain = build_haystack(tokenizer, tokens)
    docs, needle_questions = insert_needles(tokenizer, plain, needles)
    questions = needle_questions + code_questions(plain, code)
    hidden = [(q.document, q.exclude_span) for q in needle_questions]
    folder = Path(tempfile.mkdtemp(dir=workdir)) / "bank"
    try:
        bank = MemoryBank.create(folder, model, tokenizer, store="tokens", routing_layers=sorted(layers),
                                 piece_tokens=piece_tokens, batch_tokens=batch_tokens)
        bank.add([d.ids for d in docs], progress=False)
        row_of = {layer: row for row, layer in enumerate(bank.routing_layers)}
        candidates = [[layer] for layer in bank.routing_layers] + [list(bank.routing_layers)] + [sorted(s) for s in sets or []]
        candidates = [list(c) for c in dict.fromkeys(tuple(c) for c in candidates)]
        for candidate in candidates:
            unknown = [layer for layer in candidate if layer not in row_of]
            if unknown:
                raise ValueError(f"set {candidate} names layers {unknown} that are not among --layers {layers}")
        hits = {tuple(c): {"needle": [], "code": []} for c in candidates}
        for question in questions:
            if question.kind == "needle":
                span = question.exclude_span
                exclude = [c for (d, s), q in zip(hidden, needle_questions) if q is not question
                           for c in chunks_overlapping(bank, d, s)]
            else:
                span, exclude = answer_span(tokenizer, docs[question.document], question), []
            target = set(chunks_overlapping(bank, question.document, span))
            ids = torch.tensor([tokenizer(question.prompt, add_special_tokens=False)["input_ids"]], device=model.device)
            scores = chunk_scores(bank, question_queries(bank.model, ids), torch.tensor(exclude, dtype=torch.long))
            for candidate in candidates:
                picked = chosen(scores[[row_of[layer] for layer in candidate]].sum(0), top_k, min_relative_score)
                hits[tuple(candidate)][question.kind].append(bool(target & picked))
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)
    mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
    return [{"layers": list(c), "needle_recall": mean(h["needle"]), "code_recall": mean(h["code"]),
             "needles": len(h["needle"]), "code_questions": len(h["code"]), "top_k": top_k, "tokens": tokens}
            for c, h in hits.items()]


def _set(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=131072, help="haystack tokens")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 5, 8], help="candidate routing layers")
    parser.add_argument("--sets", type=_set, nargs="*", default=[], metavar="I,J", help="layer sets to try besides each layer alone and all")
    parser.add_argument("--needles", type=int, default=10)
    parser.add_argument("--code-questions", type=int, default=100)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--min-relative-score", type=float, default=0.5)
    parser.add_argument("--piece-tokens", type=int, default=1024)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    args = parser.parse_args(argv)
    from harness import load_default_model

    model, tokenizer = load_default_model()
    for row in run(model, tokenizer, args.tokens, args.layers, args.sets, args.needles, args.code_questions, args.top_k,
                   args.min_relative_score, args.piece_tokens, args.batch_tokens):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
