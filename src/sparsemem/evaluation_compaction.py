"""`sparsemem eval compaction`: compaction methods side by side at several ratios on real documents.

For each (method, ratio): compact a copy of the full cache of the document, then measure on a real
continuation (teacher-forced) the mean next-token KL to the full cache and the perplexity, and, on
pass-key documents compacted the same way, whether the question asked after compaction is answered.
Also the physical KV bytes and the seconds compaction took.
"""

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cache_compaction import compact
from .head_budgets import budget_policy
from .query_sources import capture_reference_queries, query_sources_for, resolve_query_sources
from .modeling.attention_matching_press import AttentionMatchingPress
from .modeling.presses import make_press
from .corpus import needle_question, passkey_case, token_window
from .atomic import write_report, write_text
from .plots import plot_online
from .machine import synchronize

logger = logging.getLogger(__name__)

DEFAULT_METHODS = ("am", "am-no-beta", "am-no-refit", "streaming-llm", "h2o", "snapkv", "kvzip", "random")
ONLINE_METHODS = ("am", "streaming-llm", "h2o", "kvzip")


@dataclass
class CompactionResult:
    method: str
    ratio: float
    kl: float
    perplexity: float
    bytes: int
    bytes_ratio: float
    seconds: float
    needle_accuracy: float | None
    # one {"seed", "depth", "key", "answer"} per needle case, so a reader sees which ones were lost
    needle_answers: list | None = None
    # the reference-query sources the method fitted or ranked with (None: the full cache, or a report written
    # before rows named them)
    queries: list | None = None


def _prefill(model, ids):
    from .modeling.cache import SparseMemCache

    cache = SparseMemCache(model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    return cache


@torch.no_grad()
def _continuation_logprobs(model, cache, continuation):
    logits = model(continuation, past_key_values=cache).logits.float()
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def evaluate_compaction(
    model, tokenizer, corpus, methods=DEFAULT_METHODS, ratios=(2, 5, 10, 20, 50, 100), length=3000,
    continuation=512, needle_depths=(0.25, 0.5, 0.75), queries=("repeat",), budgets=None, documents=1,
    progress: Path | None = None, on_policy: bool = False, needle_wording: str = "pass-key",
) -> tuple[list[CompactionResult], dict]:
    """KL and perplexity are means over `documents` consecutive windows of the corpus (from token 20000);
    needle accuracy is over `documents` x `needle_depths` pass-key prompts (one haystack seed per document).
    `progress`: a JSON-lines file that gets the settings, then each result as soon as it is measured, so
    an interrupted run keeps what it measured (`merge_reports` reads it). `on_policy`: the Attention
    Matching presses fit each layer on-policy (`compact(on_policy=True)`; its pass is timed).
    `needle_wording`: "pass-key" or "secret-number" (see `corpus.NEEDLE_WORDINGS`). `budgets`: the head-budget
    policy (or its name) of every `compact` call; the default, `GlobalBudgets()`, keeps retrieval heads whole
    with the Attention Matching presses only (`whole_span_share="auto"`), so the baselines are measured as
    published."""
    if not isinstance(documents, int) or documents < 1:
        raise ValueError(f"`documents` must be a positive integer, got {documents!r}")
    policy = budget_policy(budgets)
    device = model.device
    question = tokenizer(needle_question(needle_wording), add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    docs, needles = [], []
    for number in range(documents):
        offset = 20000 + number * (length + continuation)
        ids = torch.tensor([token_window(tokenizer, corpus, length + continuation, offset=offset)], device=device)
        context, cont = ids[:, :length], ids[:, length:]
        full = _prefill(model, context)
        reference = _continuation_logprobs(model, copy.deepcopy(full), cont)
        docs.append((context, cont, full, reference))
        for depth in needle_depths:
            case = passkey_case(tokenizer, corpus, length + question.shape[1], depth, seed=number, wording=needle_wording)
            doc = torch.tensor([case.input_ids[: -question.shape[1]]], device=device)
            needles.append((case, doc, _prefill(model, doc)))
    full_bytes = docs[0][2].memory_bytes()["total"]
    full_ppl = math.exp(sum(_nll(reference, cont) for _, cont, _, reference in docs) / documents)
    full_answers = [_answer(model, tokenizer, copy.deepcopy(cache), question, case, index // len(needle_depths))
                    for index, (case, _, cache) in enumerate(needles)]
    full_needle = _accuracy(full_answers)

    query_cache: dict = {}

    def reference_queries(sources, doc, key):
        # only the presses' own sources: compact() runs with one recent share, so no split is judged
        if (sources, key) not in query_cache:
            query_cache[(sources, key)] = capture_reference_queries(model, doc, sources, tokenizer)
        return query_cache[(sources, key)]

    meta = {"context_tokens": length, "continuation_tokens": continuation, "documents": documents,
            "needle_depths": list(needle_depths), "needle_cases": len(needles), "needle_wording": needle_wording, "am_queries": [source.label for source in resolve_query_sources(queries)],
            **policy.record_fields(), "on_policy": on_policy, "full_cache_bytes": full_bytes}
    results = [CompactionResult("full", 1.0, 0.0, full_ppl, full_bytes, 1.0, 0.0, full_needle, full_answers or None)]
    if progress is not None:
        Path(progress).parent.mkdir(parents=True, exist_ok=True)
        write_text(Path(progress), json.dumps({"meta": meta}) + "\n" + json.dumps(asdict(results[0])) + "\n")
    for method in tqdm(methods, desc="methods"):
        # the press's own sources where it declares them (KVzip's repeat pass), as `compact` would use
        sources = query_sources_for(method, default=queries)
        # only Attention Matching fits slots to queries; the eviction baselines just rank entries
        fitted = on_policy and isinstance(make_press(method), AttentionMatchingPress)
        for ratio in ratios:
            kl = nll = seconds = 0.0
            for number, (context, cont, full, reference) in enumerate(docs):
                cache = copy.deepcopy(full)
                queries_for_doc = reference_queries(sources, context, f"doc{number}")  # captured once, not timed
                start = time.perf_counter()
                compact(model, cache, ratio, method=method, queries=sources, budgets=policy,
                        reference_queries=queries_for_doc, on_policy=fitted, input_ids=context, tokenizer=tokenizer)
                synchronize(device)
                seconds += (time.perf_counter() - start) / documents
                size = cache.memory_bytes()["total"]  # the documents are the same length
                logprobs = _continuation_logprobs(model, cache, cont)
                kl += (reference.exp() * (reference - logprobs)).sum(-1).mean().item() / documents
                nll += _nll(logprobs, cont) / documents
            answers = []
            for index, (case, doc, needle_full) in enumerate(needles):
                needle_cache = copy.deepcopy(needle_full)
                compact(model, needle_cache, ratio, method=method, queries=sources, budgets=policy,
                        reference_queries=reference_queries(sources, doc, f"needle{index}"), on_policy=fitted,
                        input_ids=doc, tokenizer=tokenizer)
                answers.append(_answer(model, tokenizer, needle_cache, question, case, index // len(needle_depths)))
            results.append(CompactionResult(method, ratio, kl, math.exp(nll), size, full_bytes / size, seconds,
                                            _accuracy(answers), answers or None, [source.label for source in sources]))
            if progress is not None:
                with Path(progress).open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(asdict(results[-1])) + "\n")
            logger.info("%s x%s: KL %.4f ppl %.3f bytes x%.2f %.2fs", method, ratio, kl, math.exp(nll), full_bytes / size, seconds)
    return results, meta


def _nll(logprobs, continuation) -> float:
    return torch.nn.functional.nll_loss(logprobs[0, :-1], continuation[0, 1:]).item()


def _accuracy(answers: list[dict]) -> float | None:
    # no needle depths: no cases, and the accuracy is None rather than a 0% never measured
    return sum(a["key"] in a["answer"] for a in answers) / len(answers) if answers else None


def _answer(model, tokenizer, cache, question, case, seed: int) -> dict:
    # the question is read after compaction, as when a saved compacted document is reused
    out = model.generate(question, past_key_values=cache, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, question.shape[1]:], skip_special_tokens=True)
    return {"seed": seed, "depth": case.depth, "key": case.passkey, "answer": text}


def write_compaction_report(results: list[CompactionResult], meta: dict, output_dir: Path) -> list[Path]:
    return write_report(output_dir, "compaction", {"meta": meta, "results": [asdict(r) for r in results]},
                        render_compaction_markdown(results, meta), lambda path: plot_compaction(results, path))


def render_compaction_markdown(results, meta) -> str:
    lines = ["# sparsemem eval compaction", ""] + [f"- {k}: {v}" for k, v in meta.items()] + [""]
    ratios = sorted({r.ratio for r in results if r.method != "full"})
    methods = list(dict.fromkeys(r.method for r in results if r.method != "full"))
    by = {(r.method, r.ratio): r for r in results}
    full = by[("full", 1.0)]
    sources = {r.method: r.queries for r in results if r.queries is not None}
    if sources:
        lines += ["Reference queries: " + "; ".join(f"{m}: {', '.join(q)}" for m, q in sources.items()), ""]
    tables = [
        ("Mean next-token KL to the full cache (lower is better)", lambda r: f"{r.kl:.4f}"),
        (f"Continuation perplexity (full cache: {full.perplexity:.3f})", lambda r: f"{r.perplexity:.3f}"),
        ("Physical KV bytes, full / compacted", lambda r: f"{r.bytes_ratio:.2f}x"),
        ("Compaction seconds", lambda r: f"{r.seconds:.2f}"),
    ]
    if full.needle_accuracy is not None:
        tables.insert(2, (f"Needle accuracy (full cache: {full.needle_accuracy:.0%})", lambda r: f"{r.needle_accuracy:.0%}"))
    for title, cell in tables:
        lines += [f"## {title}", "", "| method | " + " | ".join(f"{x:g}x" for x in ratios) + " |", "|---|" + "---|" * len(ratios)]
        for method in methods:
            lines.append(f"| {method} | " + " | ".join(cell(by[(method, x)]) if (method, x) in by else "-" for x in ratios) + " |")
        lines.append("")
    missed = [(r, a) for r in results for a in r.needle_answers or () if a["key"] not in a["answer"]]
    if missed:
        lines += ["## Needles missed", "", "| method | ratio | seed | depth | key | answer |", "|---|---|---|---|---|---|"]
        for r, a in missed:
            answer = repr(a["answer"].strip()).replace("|", "\\|")  # a pipe would split the cell
            lines.append(f"| {r.method} | {r.ratio:g}x | {a['seed']} | {a['depth']:g} | {a['key']} | {answer} |")
        lines.append("")
    return "\n".join(lines)


def plot_compaction(results, path: Path) -> Path | None:
    from .plots import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r.method for r in results if r.method != "full"):
        rows = sorted((r for r in results if r.method == method), key=lambda r: r.ratio)
        style = "-" if method.startswith("am") else "--"
        axes[0].plot([r.ratio for r in rows], [max(r.kl, 1e-5) for r in rows], style, marker="o", label=method)
        axes[1].plot([r.ratio for r in rows], [math.nan if r.needle_accuracy is None else r.needle_accuracy for r in rows],
                     style, marker="o", label=method)
    axes[0].set(xscale="log", yscale="log", xlabel="compaction ratio", ylabel="next-token KL to full cache")
    axes[1].set(xscale="log", xlabel="compaction ratio", ylabel="needle accuracy", ylim=(-0.05, 1.05))
    axes[0].legend(fontsize=8)
    return save_figure(plt, fig, path)


def merge_reports(parts: list[str], output_dir: str) -> list[Path]:
    """Merge `compaction.json` files of runs that each measured some methods (same document and model);
    a folder without one contributes the rows of its `progress.jsonl` (an interrupted run)."""
    results, meta = [], None
    for part in parts:
        finished = Path(part) / "compaction.json"
        if finished.is_file():
            payload = json.loads(finished.read_text())
        else:
            lines = [json.loads(line) for line in (Path(part) / "progress.jsonl").read_text().splitlines() if line.strip()]
            payload = {"meta": lines[0]["meta"], "results": lines[1:]}
        meta = meta or payload["meta"]
        for row in payload["results"]:
            if row["method"] == "full" and any(r.method == "full" for r in results):
                continue
            results.append(CompactionResult(**row))
    meta = {**meta, "command": meta.get("command", "").split(" --methods")[0] + " (one process per method, merged)"}
    return write_compaction_report(results, meta, Path(output_dir))


@dataclass
class OnlineResult:
    method: str
    max_kv_tokens: int
    kl: float
    perplexity: float
    peak_physical: int
    compactions: int
    seconds: float


@torch.no_grad()
def evaluate_online(
    model, tokenizer, corpus, methods=ONLINE_METHODS, budgets=(256, 512), context=1024, steps=512, make_online=None,
) -> tuple[list[OnlineResult], dict]:
    """Decode a real text token by token (teacher-forced) under a physical budget `max_kv_tokens`; mean
    next-token KL and perplexity against the unbounded cache, and the largest physical size any layer
    reached after a forward pass. `make_online(budget, method)`: the `OnlineCompaction` to run (default: its
    defaults, with the model's sinks kept exact)."""
    from .modeling.cache import SparseMemCache
    from .modeling.online_compaction import OnlineCompaction

    ids = torch.tensor([token_window(tokenizer, corpus, context + steps, offset=20000)], device=model.device)
    targets = ids[0, context:]

    def run(online):
        cache = SparseMemCache(model.config, online=online)
        peak = 0
        logits = [model(ids[:, :context], past_key_values=cache).logits[:, -1:]]
        for index in tqdm(range(context, context + steps - 1), desc=f"decode ({online.method} @{online.max_kv_tokens})"
                          if online is not None else "decode (full cache)", leave=False):
            logits.append(model(ids[:, index : index + 1], past_key_values=cache).logits)
            if online is not None:
                peak = max(peak, max(OnlineCompaction.physical_size(layer) for layer in cache.layers))
        return torch.log_softmax(torch.cat(logits, dim=1).float(), dim=-1)[0], peak

    reference, _ = run(None)
    full_ppl = math.exp(torch.nn.functional.nll_loss(reference, targets).item())
    results = [OnlineResult("full", 0, 0.0, full_ppl, context + steps, 0, 0.0)]
    for method in tqdm(methods, desc="methods"):
        for budget in budgets:
            start = time.perf_counter()
            if make_online is None:
                online = OnlineCompaction(budget, keep_first=model.config.sink_tokens, method=method)
            else:
                online = make_online(budget, method)
            logprobs, peak = run(online)
            seconds = time.perf_counter() - start
            kl = (reference.exp() * (reference - logprobs)).sum(-1).mean().item()
            ppl = math.exp(torch.nn.functional.nll_loss(logprobs, targets).item())
            results.append(OnlineResult(method, budget, kl, ppl, peak, online.compactions, seconds))
            logger.info("online %s @%d: KL %.4f ppl %.3f peak %d", method, budget, kl, ppl, peak)
    return results, {"context_tokens": context, "decoded_tokens": steps}


def write_online_report(results: list[OnlineResult], meta: dict, output_dir: Path) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / "online.json", output_dir / "online.md"
    write_text(json_path, json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2))
    write_text(md_path, render_online_markdown(results, meta))
    plot = plot_online(results, output_dir / "online.png")
    return [json_path, md_path] + ([plot] if plot else [])


def render_online_markdown(results: list[OnlineResult], meta: dict) -> str:
    full = next(r for r in results if r.method == "full")
    lines = ["# sparsemem eval online", ""] + [f"- {k}: {v}" for k, v in meta.items()] + [""]
    lines += [
        f"Full cache: perplexity {full.perplexity:.3f}, {full.peak_physical} tokens at the end.",
        "",
        "| method | max_kv_tokens | KL to full | perplexity | peak physical | layer compactions | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted((r for r in results if r.method != "full"), key=lambda r: (r.max_kv_tokens, r.kl)):
        lines.append(
            f"| {r.method} | {r.max_kv_tokens} | {r.kl:.4f} | {r.perplexity:.3f} | {r.peak_physical} | {r.compactions} | {r.seconds:.1f} |"
        )
    return "\n".join(lines) + "\n"
