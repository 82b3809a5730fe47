"""What the experiments share: the model they run, the evaluation's documents and needle cases, and how a
compacted cache is measured (next-token KL on a continuation, answers and answer log-probabilities).

Everything goes through sparsemem's public API (`sparsemem.convert`, `sparsemem.prefill`,
`sparsemem.compact`, `sparsemem.query_sources.capture_reference_queries`, the head-budget policies of
`sparsemem.head_budgets`, the presses of `sparsemem.modeling.compaction`), so an experiment breaks loudly,
in CI, when that API changes.
"""

import copy
import dataclasses
import json
import math
import time

import torch

import sparsemem
from sparsemem.head_budgets import budget_policy
from sparsemem.query_sources import capture_reference_queries
from sparsemem.corpus import load_corpus, needle_question, passkey_case, token_window
from sparsemem.modeling.presses import make_press

# the needle cases of `sparsemem eval compaction --documents 2`: (haystack seed, depth)
SIX_CASES = [(seed, depth) for seed in (0, 1) for depth in (0.25, 0.5, 0.75)]


def load_default_model():
    """SmolLM2-135M-Instruct (`sparsemem.default_model`) in fp32 as a dense-equivalent sparsemem model:
    compaction, not block selection, is what these experiments measure. Returns (model, tokenizer)."""
    from sparsemem.default_model import load_model

    _, tokenizer, base = load_model(None, "cpu", "float32")
    return sparsemem.convert(base, top_k_blocks=None, block_fraction=None), tokenizer


def build_press(method: str = "am", options: dict | None = None):
    """The press `method` names (`make_press`), with its dataclass fields in `options` changed."""
    press = make_press(method)
    if not options:
        return press
    if not dataclasses.is_dataclass(press):
        raise ValueError(f"press {method!r} has no options to set, got {sorted(options)}")
    known = {field.name for field in dataclasses.fields(press)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"press {method!r} has no option(s) {unknown}; it has {sorted(known)}")
    return dataclasses.replace(press, **options)


def online_compaction(config: dict, budget: int, sinks: int):
    """`sparsemem.OnlineCompaction` for a configuration: `method` (a press name), `online` (its fields) and `press`
    (fields of the press it sets up, its guard included, changed)."""
    unknown = set(config) - {"method", "online", "press"}
    if unknown:
        raise ValueError(f"unknown configuration keys {sorted(unknown)}; expected method, online, press")
    return sparsemem.OnlineCompaction(budget, keep_first=sinks, method=config.get("method", "am"),
                                      press_options=config.get("press"), **config.get("online", {}))


def head_budgets(spec=None):
    """The head-budget policy of a JSON config's "budgets": a name ("uniform", ...), an object naming the
    policy and its options ({"policy": "global", "whole_span_share": null}), or None (the default)."""
    if isinstance(spec, dict):
        options = dict(spec)
        return budget_policy(options.pop("policy", None), **options)
    return budget_policy(spec)


def parse_json(text: str, what: str, kind: type):
    """A JSON command-line argument of the given type, or an error naming the argument."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise SystemExit(f"{what}: not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, kind):
        raise SystemExit(f"{what}: expected a JSON {kind.__name__}, got {text!r}")
    return value


@torch.no_grad()
def continuation_logprobs(model, cache, continuation: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [1, n, vocab] of the next token at every continuation position, read through `cache`
    (which grows by the continuation)."""
    return torch.log_softmax(model(continuation, past_key_values=cache).logits.float(), dim=-1)


def mean_kl(reference: torch.Tensor, logprobs: torch.Tensor) -> float:
    """Mean over positions of KL(reference || compacted), both log-probabilities."""
    kl = (reference.exp() * (reference - logprobs)).sum(-1).mean().item()
    if not math.isfinite(kl):
        raise FloatingPointError(f"next-token KL is not finite ({kl})")
    return kl


class Document:
    """The evaluation's document (`sparsemem eval compaction`): `length` context tokens of the corpus from
    token `offset`, then `continuation` tokens on which a compacted cache is measured against the full one.
    Reference queries are captured once per set of sources, always with the context's own (they judge the
    recent/slot split when `compact` is given several `recent_shares`)."""

    def __init__(self, model, tokenizer, corpus, length: int = 3000, continuation: int = 512, offset: int = 20000):
        self.model, self.tokenizer = model, tokenizer
        ids = torch.tensor([token_window(tokenizer, corpus, length + continuation, offset=offset)], device=model.device)
        self.context, self.continuation = ids[:, :length], ids[:, length:]
        self.full, _ = sparsemem.prefill(model, self.context)
        self.reference = continuation_logprobs(model, copy.deepcopy(self.full), self.continuation)
        self._captured = {}

    def reference_queries(self, sources) -> dict:
        key = tuple(dict.fromkeys(("context", *sources)))
        if key not in self._captured:
            self._captured[key] = capture_reference_queries(self.model, self.context, key, self.tokenizer)
        return self._captured[key]

    def measure(self, ratio: float, queries=("repeat",), budgets=None, **compact_args) -> dict:
        """Compact a copy of the full cache with `sparsemem.compact(**compact_args)` (`budgets`: see
        `head_budgets`); the continuation's mean next-token KL to the full cache, the seconds `compact`
        took and the physical bytes ratio (unrounded)."""
        cache = copy.deepcopy(self.full)
        policy = head_budgets(budgets)
        start = time.perf_counter()
        sparsemem.compact(self.model, cache, ratio, queries=list(queries), reference_queries=self.reference_queries(tuple(queries)),
                          input_ids=self.context, tokenizer=self.tokenizer, budgets=policy, **compact_args)
        seconds = time.perf_counter() - start
        size = self.full.memory_bytes()["total"] / cache.memory_bytes()["total"]  # before the continuation is appended
        kl = mean_kl(self.reference, continuation_logprobs(self.model, cache, self.continuation))
        return {"ratio": ratio, "kl": kl, "sec": seconds, "bytes": size}


class NeedleCase:
    """One needle prompt of the evaluation's kind: a `length`-token haystack of the corpus with a 5-digit
    number at `depth`, its full cache, and the question asked after compaction."""

    def __init__(self, model, tokenizer, corpus, seed: int, depth: float, wording: str = "pass-key", length: int = 3000):
        self.model, self.tokenizer = model, tokenizer
        self.question = tokenizer(needle_question(wording), add_special_tokens=False)["input_ids"]
        self.case = passkey_case(tokenizer, corpus, length + len(self.question), depth, seed=seed, wording=wording)
        self.seed, self.depth, self.key = seed, depth, self.case.passkey
        self.document = torch.tensor([self.case.input_ids[: -len(self.question)]], device=model.device)
        self.full, _ = sparsemem.prefill(model, self.document)
        # what the answer should read: the space, the digits and the full stop
        self.answer_ids = tokenizer(" " + self.key + ".", add_special_tokens=False)["input_ids"]
        self._captured = {}

    def compacted(self, ratio: float, method="am", queries=("repeat",), budgets=None, **compact_args):
        """A compacted copy of the full cache (`budgets`: see `head_budgets`)."""
        cache = copy.deepcopy(self.full)
        if ratio == 1:
            return cache
        references = self.reference_queries(tuple(queries))
        return sparsemem.compact(self.model, cache, ratio, method=method, queries=list(queries), reference_queries=references,
                                 input_ids=self.document, tokenizer=self.tokenizer, budgets=head_budgets(budgets), **compact_args)

    def reference_queries(self, sources) -> dict:
        if sources not in self._captured:
            self._captured[sources] = capture_reference_queries(self.model, self.document, sources, self.tokenizer)
        return self._captured[sources]

    @torch.no_grad()
    def answer(self, cache, max_new_tokens: int = 8) -> str:
        """The greedy answer to the question read after `cache` (which is consumed)."""
        length = cache.get_seq_length()
        question = torch.tensor([self.question], device=self.model.device)
        # placeholders stand for the cached positions: generate only needs their count
        ids = torch.cat([torch.zeros(1, length, dtype=torch.long, device=question.device), question], dim=1)
        out = self.model.generate(ids, past_key_values=cache, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    @torch.no_grad()
    def answer_logprobs(self, cache) -> torch.Tensor:
        """Teacher-forced log-probability of each answer token after the question, read through a copy of `cache`."""
        length = cache.get_seq_length()
        ids = torch.tensor([self.question + self.answer_ids], device=self.model.device)
        positions = torch.arange(length, length + ids.shape[1], device=ids.device)[None]
        logits = self.model(ids, past_key_values=copy.deepcopy(cache), position_ids=positions).logits.float()
        logprobs = logits[0, len(self.question) - 1 : -1].log_softmax(-1)
        return logprobs.gather(-1, torch.tensor(self.answer_ids, device=ids.device)[:, None])[:, 0]

    def row(self) -> dict:
        return {"seed": self.seed, "depth": self.depth, "key": self.key}


def default_corpus(path: str | None = None):
    """The haystack and document text: a file, or Python's reference documentation (as the evaluation)."""
    return load_corpus([path] if path else None)
