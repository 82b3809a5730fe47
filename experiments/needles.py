"""Needle recall after compaction, and where it is lost (CPU).

The cases are the needle prompts of `sparsemem eval compaction`: 3000-token haystacks of Python's
reference documentation with a 5-digit number at a depth; `--cases` lists [haystack seed, depth] pairs
(default: the six of `--documents 2`, seeds 0 and 1 at depths 0.25/0.5/0.75; seed = document number
with more documents), `--wording secret-number` words needle and question as a secret number. One JSON
line per result on stdout. Modes:

- `answers SPECS`: the greedy answer and the teacher-forced answer log-probability after compaction with
  each spec (a JSON object: "method", "press" options, "queries" (default ["repeat"]), "ratios" (default
  [10]), other `sparsemem.compact` arguments).
- `restore [--ratio R] [--compact JSON]`: the answer log-probability with one layer's full cache put back
  into the compacted one ("restored"), and with only that layer compacted ("only"), per layer.
- `tokens [--ratios ...]`: the log-probability of each answer token (space, digits, full stop) at each
  ratio (1: the full cache), and the first token the model prefers.
- `copy-scores`: per KV head, the largest mean attention one of its query heads gives, in the repeat
  pass, to the original of the token its query reads (echo) and to the token after it (induction); the
  14 best heads (which heads copy the context back, and so need it whole).

Writes the JSON lines of `reports/compaction-cpu-needle/` (needles*.jsonl, layers-*.jsonl,
remaining-*.jsonl; first_token.md, now as JSON lines) and the needle paragraphs of the README.

    OMP_NUM_THREADS=2 python experiments/needles.py answers '[{"press": {"exact_newest": 0.75}, "ratios": [10]}]' > needles.jsonl
    OMP_NUM_THREADS=2 python experiments/needles.py --wording secret-number restore --ratio 10 > layers-secret-number.jsonl
    OMP_NUM_THREADS=2 python experiments/needles.py --wording secret-number --cases '[[3, 0.5]]' answers '[{}, {"method": "am-peak"}]'
    OMP_NUM_THREADS=2 python experiments/needles.py tokens --ratios 1 5 10 20 > first_token.jsonl
    OMP_NUM_THREADS=2 python experiments/needles.py --wording secret-number --cases '[[5, 0.5]]' copy-scores
"""

import argparse
import copy
import json

import torch

from harness import SIX_CASES, NeedleCase, build_press, default_corpus, load_default_model, parse_json


def answers(cases, specs):
    for needle in cases:
        for spec in specs:
            options = dict(spec)
            press = build_press(options.pop("method", "am"), options.pop("press", None))
            queries = tuple(options.pop("queries", ["repeat"]))
            for ratio in options.pop("ratios", [10]):
                cache = needle.compacted(ratio, press, queries, **options)
                logprob = float(needle.answer_logprobs(cache).sum())
                text = needle.answer(copy.deepcopy(cache))
                yield {**spec, **needle.row(), "ratio": ratio, "answer": text, "correct": needle.key in text,
                       "logprob": round(logprob, 2)}


def restore(cases, ratio=10.0, compact_args=None):
    compact_args = dict(compact_args or {})
    press = build_press(compact_args.pop("method", "am"), compact_args.pop("press", None))
    for needle in cases:
        small = needle.compacted(ratio, press, **compact_args)
        logprob = lambda cache: round(float(needle.answer_logprobs(cache).sum()), 2)  # noqa: E731
        restored, only = [], []
        for index in range(len(needle.full.layers)):
            # shallow copies share the other layers; the log-probability reads a deep copy of the mix
            mixed = copy.copy(small)
            mixed.layers = [needle.full.layers[i] if i == index else layer for i, layer in enumerate(small.layers)]
            restored.append(logprob(mixed))
            mixed = copy.copy(needle.full)
            mixed.layers = [small.layers[i] if i == index else layer for i, layer in enumerate(needle.full.layers)]
            only.append(logprob(mixed))
        yield {**needle.row(), "ratio": ratio, **compact_args, "full": logprob(needle.full), "compact": logprob(small),
               "physical": small.physical_lengths(), "restored": restored, "only": only}


def tokens(cases, ratios=(1, 5, 10, 20)):
    for needle in cases:
        for ratio in ratios:
            cache = needle.compacted(ratio)
            logprobs = needle.answer_logprobs(cache)
            yield {**needle.row(), "ratio": ratio, "sum": round(float(logprobs.sum()), 2), "first": round(float(logprobs[0]), 2),
                   "rest": [round(float(x), 2) for x in logprobs[1:]],
                   "first_top": needle.answer(copy.deepcopy(cache), max_new_tokens=1)}


def copy_scores(cases, model, every: int = 4, top: int = 14):
    """Per (layer, KV head): the largest mean attention one of its query heads gives, in the repeat pass, to
    the original of the token its query reads (echo) and to the token after it (induction)."""
    from sparsemem.modeling.compaction import LayerAttention

    scaling = model.model.layers[0].self_attn.scaling
    for needle in cases:
        references = needle.reference_queries(("repeat",))
        n = needle.document.shape[1]
        index = torch.arange(0, n - 1, every)  # repeat query j reads the copy of context token j
        rows = []
        for layer_index, layer in enumerate(needle.full.layers):
            attention = LayerAttention.measure(layer, references[layer_index][0][..., index, :].to(layer.keys.device), scaling)
            for head, phi in enumerate(attention.phi):
                phi = phi[0].view(-1, index.numel(), phi.shape[-1])[..., :n].cpu()  # [query heads of the group, queries, context]
                picked = torch.arange(index.numel())
                echo, induction = phi[:, picked, index].mean(-1).max(), phi[:, picked, index + 1].mean(-1).max()
                rows.append([layer_index, head, round(float(echo), 3), round(float(induction), 3)])
        rows.sort(key=lambda row: -max(row[2], row[3]))
        yield {**needle.row(), "layer_head_echo_induction": rows[:top]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=json.dumps(SIX_CASES), help="JSON list of [haystack seed, depth]")
    parser.add_argument("--wording", default="pass-key", help="needle wording: pass-key or secret-number")
    parser.add_argument("--length", type=int, default=3000, help="haystack tokens")
    parser.add_argument("--text", default=None, help="a text file instead of Python's reference documentation")
    modes = parser.add_subparsers(dest="mode", required=True)
    answers_parser = modes.add_parser("answers", help="answers after compaction with each spec")
    answers_parser.add_argument("specs", help="JSON list of specs")
    restore_parser = modes.add_parser("restore", help="answer log-probability with one layer restored / compacted alone")
    restore_parser.add_argument("--ratio", type=float, default=10.0)
    restore_parser.add_argument("--compact", default="{}", help="JSON object: method, press, other compact() arguments")
    tokens_parser = modes.add_parser("tokens", help="log-probability of each answer token per ratio")
    tokens_parser.add_argument("--ratios", type=float, nargs="+", default=[1, 5, 10, 20])
    modes.add_parser("copy-scores", help="the heads that copy the context in the repeat pass")
    args = parser.parse_args(argv)
    pairs = parse_json(args.cases, "--cases", list)
    if not all(isinstance(pair, list) and len(pair) == 2 for pair in pairs):
        raise SystemExit(f"--cases: expected a JSON list of [seed, depth] pairs, got {args.cases!r}")
    specs = parse_json(args.specs, "specs", list) if args.mode == "answers" else None
    compact_args = parse_json(args.compact, "--compact", dict) if args.mode == "restore" else None
    model, tokenizer = load_default_model()
    corpus = default_corpus(args.text)
    cases = (NeedleCase(model, tokenizer, corpus, seed, depth, args.wording, args.length) for seed, depth in pairs)
    if args.mode == "answers":
        rows = answers(cases, specs)
    elif args.mode == "restore":
        rows = restore(cases, args.ratio, compact_args)
    elif args.mode == "tokens":
        rows = tokens(cases, args.ratios)
    else:
        rows = copy_scores(cases, model)
    for row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
