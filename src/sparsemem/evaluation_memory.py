"""`sparsemem eval memory`: a memory bank against BM25 retrieval-augmented generation on real code.

Haystack: the Python sources of the standard library, then of the installed packages (each in sorted path
order, identical files once), up to N tokens. Two kinds of questions with checkable answers:
- needles: the compaction eval's secret-number sentence with a different 5-digit number at each of
  `needles` evenly spaced depths (inserted at a line break); each case asks for its own number while the
  chunks holding the other cases' needles are hidden from every retriever, so each case has one needle;
- code questions, generated from the haystack's own AST: the default value (an int, float or string
  literal) of a named parameter of a function whose name occurs once in the haystack, in a named module.
Rows, all at the same prompt budget (`top_k` x `chunk_tokens` tokens of memory before the question):
the bank at full resolution, compacted (`ratio`) and holding token ids that a question's chunks are read
again from (`rereads`), with shared and per-layer selection; BM25 (`bm25s`)
over the same token chunks, the retrieved text read in document order; the full cache (every token
read, needle-free except the case's own) where the haystack fits the window. Also: ingest tokens/s,
time to first token, bytes per tier (disk / host / device).

For the bank, routing and reading are told apart: `routing_recall` is the share of needle cases whose
needle chunk was among the chunks read (per-layer selection: averaged over the layers; `code_routing_recall`
the same for the chunks from a code question's `def` to its default value), and
`forced_needle_accuracy` the needle accuracy when the needle's chunks are forced into the selection
(`include`), so a miss shows whether the router or the reading lost the needle.
"""

import ast
import logging
import math
import random
import re
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .atomic import write_report
from .corpus import needle_wording
from .machine import synchronize
from .modeling.modeling_sparsemem import CACHE_ARGUMENT
from .modeling.rope import trained_context

logger = logging.getLogger(__name__)

_DEFINITION = re.compile(r"^\s*(?:async\s+)?def\s+(\w+)\s*\(", re.MULTILINE)


@dataclass
class Document:
    name: str  # module name
    text: str
    ids: list[int]
    cut: bool = False  # the haystack kept only the start of the file


@dataclass
class Question:
    kind: str  # "needle" or "code"
    prompt: str
    accepted: list[str]  # an answer is right when it starts with one of these (after leading spaces)
    document: int  # haystack document holding the answer
    exclude_span: tuple[int, int] | None = None  # token span of a needle inside its document
    info: dict = field(default_factory=dict)


@dataclass
class MemoryRow:
    method: str
    tokens: int
    needle_accuracy: float | None
    code_accuracy: float | None
    seconds_to_first_token: float
    routing_seconds: float | None = None  # of the time to first token, scoring every chunk (bank rows)
    routing_recall: float | None = None  # needle cases whose needle chunk was read (bank rows)
    code_routing_recall: float | None = None  # code questions whose answer's chunk was read (bank rows)
    forced_needle_accuracy: float | None = None  # needle accuracy with the needle's chunks forced in (bank rows)
    ingest_tokens_per_second: float | None = None
    bytes: dict | None = None
    peak_device_bytes: int | None = None
    answers: list = field(default_factory=list)


def python_sources() -> list[tuple[str, Path]]:
    """(module name, path) of the standard library's sources, then the installed packages', sorted."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    out, seen = [], set()
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.py")):
            relative = path.relative_to(root)
            if root == roots[0] and relative.parts[0] == "site-packages":
                continue  # the packages come second, from their own root
            module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            out.append((module, path))
    return out


def build_haystack(tokenizer, tokens: int, max_file_bytes: int = 400_000, batch: int = 256) -> list[Document]:
    """Whole source files in `python_sources` order until `tokens` tokens (the last one cut to fit);
    tokenized `batch` files per call (a fast tokenizer spreads a batch over the cores)."""
    docs, total, seen, pending = [], 0, set(), []

    def flush():
        nonlocal total
        encoded = tokenizer([text for _, text in pending], add_special_tokens=False)["input_ids"]
        for (module, text), ids in zip(pending, encoded):
            if total >= tokens:
                break
            cut = len(ids) > tokens - total
            ids = list(ids[: tokens - total])
            docs.append(Document(module, text, ids, cut))
            total += len(ids)
        pending.clear()

    for module, path in python_sources():
        try:
            if path.stat().st_size > max_file_bytes:
                continue
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(text.strip()) < 200 or text in seen:
            continue
        seen.add(text)
        pending.append((module, text))
        if len(pending) == batch:
            flush()
            if total >= tokens:
                return docs
    flush()
    if total < tokens:
        raise ValueError(f"the installed Python sources hold only {total} tokens, fewer than the {tokens} asked for")
    return docs


def insert_needles(tokenizer, docs: list[Document], count: int, seed: int = 0) -> tuple[list[Document], list[Question]]:
    """Copies of `docs` with `count` needles at evenly spaced depths, and their questions."""
    needle_text, question_text = needle_wording("secret-number")
    total = sum(len(d.ids) for d in docs)
    starts, acc = [], 0
    for d in docs:
        starts.append(acc)
        acc += len(d.ids)
    if count > len(docs):
        raise ValueError(f"{count} needles need as many documents; the haystack has {len(docs)}: more tokens or fewer needles")
    rng = random.Random(seed)
    keys = rng.sample(range(10000, 100000), count)
    docs = list(docs)
    used, questions = set(), []
    for number, key in enumerate(keys):
        depth = number / max(count - 1, 1)
        target = min(int(depth * total), total - 1)
        index = max(i for i, s in enumerate(starts) if s <= target)
        within = (target - starts[index]) / max(len(docs[index].ids), 1)
        while index in used:  # one needle per document: the next free one, at its middle
            index, within = (index + 1) % len(docs), 0.5
        used.add(index)
        doc = docs[index]
        kept = len(tokenizer.decode(doc.ids)) if doc.cut else len(doc.text)  # a cut document: inside its kept part
        cut = doc.text.rfind("\n", 0, int(within * kept)) + 1  # the line break before the depth (0: none)
        needle = needle_text.format(key=key)
        text = doc.text[:cut] + needle + doc.text[cut:]
        encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        lo, hi = len(encode(doc.text[:cut])), len(encode(doc.text[:cut] + needle))
        ids = encode(text)[: len(doc.ids) + hi - lo]  # a cut last document stays cut
        docs[index] = Document(doc.name, text, ids, doc.cut)
        questions.append(Question("needle", question_text, [str(key)], index, (max(lo - 2, 0), hi + 2),
                                  {"depth": depth, "key": key, "document": doc.name}))
    return docs, questions


def code_questions(docs: list[Document], count: int, seed: int = 0) -> list[Question]:
    """Default values of named parameters of functions whose name is defined once in the haystack."""
    definitions: dict[str, int] = {}
    for doc in docs:  # every definition in the haystack, cut documents included (a regex: fast at 10M tokens)
        for name in _DEFINITION.findall(doc.text):
            definitions[name] = definitions.get(name, 0) + 1
    rng = random.Random(seed)
    order = [i for i in range(len(docs)) if not docs[i].cut]  # a cut document's answer may lie in the part left out
    rng.shuffle(order)
    candidates = []
    for index in order:
        if len(candidates) >= 20 * count:  # enough to sample from: the other documents need no parse
            break
        doc = docs[index]
        try:
            tree = ast.parse(doc.text)
        except (SyntaxError, ValueError):
            continue
        for node in tree.body:
            functions = [(node.name, node)] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else []
            if isinstance(node, ast.ClassDef):
                functions = [(f"{node.name}.{f.name}", f) for f in node.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
            for qualname, function in functions:
                if function.name.startswith("__"):
                    continue
                args = function.args
                positional = args.posonlyargs + args.args
                pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
                pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
                for arg, default in pairs:
                    if not isinstance(default, ast.Constant) or isinstance(default.value, bool) or default.value is None:
                        continue
                    if not isinstance(default.value, (int, float, str)):
                        continue
                    segment = ast.get_source_segment(doc.text, default)
                    if segment is None or "\n" in segment or len(segment) > 24 or segment in ("''", '""'):
                        continue
                    if definitions.get(function.name, 0) == 1:
                        candidates.append((index, doc.name, qualname, function.name, arg.arg, segment))
    candidates = [c for c in candidates if definitions.get(c[3]) == 1]
    chosen = sorted(rng.sample(candidates, min(count, len(candidates))))
    questions = []
    for index, module, qualname, _, param, segment in chosen:
        accepted = [segment]
        if segment[:1] in "'\"":
            other = "'" if segment[0] == '"' else '"'
            accepted.append(other + segment[1:-1] + other)
        prompt = (f"\n\nQuestion: in the Python module {module}, what is the default value of the parameter {param} "
                  f"of {qualname}?\nAnswer: {param}=")
        questions.append(Question("code", prompt, accepted, index, None, {"module": module, "function": qualname, "parameter": param}))
    return questions


def answer_span(tokenizer, doc: Document, question: Question) -> tuple[int, int]:
    """Token span in `doc` of a code question's answer, from its function's `def` to the default value (two
    tokens of slack each side, as a needle's span): the chunks a reader must see to answer."""
    name = question.info["function"].rsplit(".", 1)[-1]
    start = re.search(rf"^[ \t]*(?:async\s+)?def\s+{re.escape(name)}\s*\(", doc.text, re.MULTILINE)
    if start is None:
        raise ValueError(f"no definition of {name} in {doc.name}")
    parameter = doc.text.find(question.info["parameter"], start.end())
    end = doc.text.find(question.accepted[0], parameter) + len(question.accepted[0])
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return max(len(encode(doc.text[: start.start()])) - 2, 0), min(len(encode(doc.text[:end])) + 2, len(doc.ids))


def is_correct(question: Question, answer: str) -> bool:
    text = answer.lstrip()
    if question.kind == "needle":
        return question.accepted[0] in answer
    return any(text.startswith(a) for a in question.accepted)


def chunks_overlapping(bank, document: int, span: tuple[int, int]) -> list[int]:
    """Global ids of `bank`'s chunks that hold any token of the token `span` of document number `document`."""
    piece_tokens = bank.options.piece_tokens
    pieces = (bank.piece_global_document == document).nonzero()[:, 0]
    found = []
    for piece in pieces.tolist():
        offset = int(bank.piece_table[piece, 3]) * piece_tokens
        chunks = (bank.chunk_global_piece == piece).nonzero()[:, 0]
        start = bank.chunk_table[chunks, 1] + offset
        end = start + bank.chunk_table[chunks, 2]
        found += chunks[(start < span[1]) & (end > span[0])].tolist()
    return found


class BM25Retriever:
    """BM25 (`bm25s`) over the haystack cut into chunks of `chunk_tokens` tokens per document."""

    def __init__(self, tokenizer, docs: list[Document], chunk_tokens: int):
        try:
            import bm25s
        except ImportError:
            raise ImportError("the BM25 baseline needs `bm25s`: pip install 'sparsemem[memory]'") from None
        self.bm25s = bm25s
        self.spans = [(d, s) for d, doc in enumerate(docs) for s in range(0, len(doc.ids), chunk_tokens)]
        self.first_span = {}  # a document's spans are consecutive
        for index, (d, _) in enumerate(self.spans):
            self.first_span.setdefault(d, index)
        self.ids = [docs[d].ids[s : s + chunk_tokens] for d, s in self.spans]
        texts = [tokenizer.decode(ids) for ids in self.ids]
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
        self.chunk_tokens = chunk_tokens

    def prompt(self, question: str, top_k: int, exclude: list[tuple[int, tuple[int, int]]]) -> list[int]:
        """Token ids of the top chunks (document order), hidden spans excluded."""
        hidden = {self.first_span[doc] + i for doc, (lo, hi) in exclude
                  for i in range(lo // self.chunk_tokens, (hi - 1) // self.chunk_tokens + 1)
                  if self.first_span[doc] + i < len(self.spans) and self.spans[self.first_span[doc] + i][0] == doc}
        k = min(top_k + len(hidden), len(self.spans))
        # numpy top-k: with jax installed, bm25s' automatic choice would reserve most of the GPU's memory
        results, _ = self.retriever.retrieve(self.bm25s.tokenize([question], stopwords="en", show_progress=False), k=k,
                                             show_progress=False, backend_selection="numpy")
        chosen = sorted([int(i) for i in results[0] if int(i) not in hidden][:top_k])
        return [t for i in chosen for t in self.ids[i]]


def _generate(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> tuple[str, float]:
    """(answer, seconds to the first token) of a plain prompt read in full."""
    ids = torch.tensor([prompt_ids], device=model.device)
    start = time.perf_counter()
    with torch.no_grad():
        first = model(ids, use_cache=True)
        cache = getattr(first, CACHE_ARGUMENT)  # the output names its cache as forward's argument does
        token = first.logits[:, -1:].argmax(-1)
        synchronize(model.device)
        seconds = time.perf_counter() - start
        out = [int(token)]
        for _ in range(max_new_tokens - 1):
            if out[-1] == tokenizer.eos_token_id:
                break
            step = model(token, **{CACHE_ARGUMENT: cache}, use_cache=True)
            cache = getattr(step, CACHE_ARGUMENT)
            token = step.logits[:, -1:].argmax(-1)
            out.append(int(token))
    return tokenizer.decode(out, skip_special_tokens=True), seconds


def _tokens_for(question: Question) -> int:
    return 8 if question.kind == "needle" else 12


def _summarise(method, tokens, answers, **extra) -> MemoryRow:
    def accuracy(kind):
        rows = [a for a in answers if a["kind"] == kind]
        return sum(a["correct"] for a in rows) / len(rows) if rows else None

    def mean(key):
        values = [a[key] for a in answers if a.get(key) is not None]
        return sum(values) / len(values) if values else None

    ttft = sum(a["seconds_to_first_token"] for a in answers) / max(len(answers), 1)
    row = MemoryRow(method, tokens, accuracy("needle"), accuracy("code"), ttft, routing_seconds=mean("routing_seconds"),
                    routing_recall=mean("routed"), code_routing_recall=mean("code_routed"),
                    forced_needle_accuracy=mean("correct_when_forced"), answers=answers, **extra)
    logger.info("%s @%d tokens: needles %s (routed %s, forced %s), code %s (routed %s), ttft %.3fs", method, tokens,
                row.needle_accuracy, row.routing_recall, row.forced_needle_accuracy, row.code_accuracy, row.code_routing_recall, ttft)
    return row


@torch.no_grad()
def evaluate_memory(model, tokenizer, sizes=(50_000,), ratio: float = 8.0, full_resolution_max_tokens: int = 2_000_000,
                    needles: int = 20, code_count: int = 100, chunk_tokens: int = 64, top_k: int = 32,
                    selections=("shared", "per-layer"), bm25: bool = True, workdir: Path = Path("reports/eval/banks"),
                    keep_banks: bool = False, batch_tokens: int = 32768, piece_tokens: int | None = None,
                    routing_layers: list[int] | None = None, routing_pool: str = "max", query_tokens: int | None = None,
                    min_relative_score: float = 0.5, whole_span_share="auto", rereads=("joint",),
                    progress=None) -> tuple[list[MemoryRow], dict]:
    """Rows per haystack size (see the module docstring). Banks are built in `workdir` and removed after
    their rows unless `keep_banks`. `rereads`: one bank of token ids (store="tokens") per value, "joint"
    (reread="joint") or its `reread_context` with reread="separate" (an integer; None: the whole piece); an
    empty list: none. `routing_layers`, `routing_pool`,
    `whole_span_share` (the compacted bank's): see `memory_bank.BankOptions`;
    `query_tokens`, `min_relative_score`: see `memory_recall.RecallOptions`. `progress(rows, meta)` is called after every row with the rows so far."""
    from .memory_bank import MemoryBank

    for value in rereads:
        if value not in ("joint", None) and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"`rereads` must hold 'joint', integers >= 0 or None (the whole piece), got {value!r}")
    context = trained_context(model.config)
    rows: list[MemoryRow] = []
    meta = {"sizes": list(sizes), "ratio": ratio, "full_resolution_max_tokens": full_resolution_max_tokens,
            "needles": needles, "code_questions": code_count, "chunk_tokens": chunk_tokens, "top_k": top_k,
            "prompt_budget_tokens": top_k * chunk_tokens, "selections": list(selections), "trained_context": context,
            "routing_pool": routing_pool, "query_tokens": "all" if query_tokens is None else query_tokens,
            "min_relative_score": min_relative_score, "whole_span_share": whole_span_share,
            "rereads": ["piece" if c is None else c for c in rereads],
            "haystack": "Python sources: standard library, then installed packages (sorted paths)"}
    device = model.device
    for size in sizes:
        plain = build_haystack(tokenizer, size)
        docs, needle_qs = insert_needles(tokenizer, plain, needles)
        questions = needle_qs + code_questions(plain, code_count)
        meta[f"questions@{size}"] = {"needles": len(needle_qs), "code": len(questions) - len(needle_qs), "documents": len(docs)}
        hidden = [(q.document, q.exclude_span) for q in needle_qs]
        code_spans = {id(q): answer_span(tokenizer, docs[q.document], q) for q in questions if q.kind == "code"}

        def others(question):
            return [h for q, h in zip(needle_qs, hidden) if q is not question]

        # (label, folder name, bank options) of every bank measured at this size
        variants = [("full", "full", {})] if size <= full_resolution_max_tokens else []
        if ratio:
            variants.append((f"AM {ratio:g}x", f"am{ratio:g}", {"ratio": ratio, "whole_span_share": whole_span_share}))
        for reread in rereads:
            if reread == "joint":
                variants.append(("tokens, joint", "tokens-joint", {"store": "tokens", "reread": "joint"}))
                continue
            name = "piece" if reread is None else str(reread)
            variants.append((f"tokens, separate {name}", f"tokens-{name}",
                             {"store": "tokens", "reread": "separate", "reread_context": reread}))
        for label, folder_name, options in variants:
            folder = Path(workdir) / f"bank-{size}-{folder_name}"
            if folder.exists():
                shutil.rmtree(folder)
            bank = MemoryBank.create(folder, model, tokenizer, chunk_tokens=chunk_tokens, batch_tokens=batch_tokens,
                                     piece_tokens=piece_tokens, routing_layers=routing_layers, routing_pool=routing_pool,
                                     **{"whole_span_share": None, **options})
            meta["routing_layers"] = bank.options.routing_layers
            synchronize(device)
            stats = bank.add([d.ids for d in docs], progress=logger.isEnabledFor(logging.INFO))
            if len(bank.documents) != len(docs):
                raise RuntimeError(f"the bank holds {len(bank.documents)} documents, the haystack {len(docs)}")
            for selection in selections:
                opened = bank if selection == bank.recall.selection else MemoryBank.open(folder, model, tokenizer, verify=False, selection=selection)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                answers = []
                for question in questions:
                    exclude = [c for d, span in others(question) for c in chunks_overlapping(opened, d, span)]
                    asked = dict(max_new_tokens=_tokens_for(question), top_k=top_k, exclude=exclude, query_tokens=query_tokens,
                                 min_relative_score=min_relative_score)
                    result = opened.ask(question.prompt, **asked)
                    row = {"kind": question.kind, **question.info, "answer": result["answer"],
                           "correct": is_correct(question, result["answer"]),
                           "seconds_to_first_token": result["seconds_to_first_token"],
                           "routing_seconds": result["routing_seconds"]}
                    if question.kind == "code":
                        target = set(chunks_overlapping(opened, question.document, code_spans[id(question)]))
                        row["code_routed"] = sum(bool(target & set(chunks)) for chunks in result["chunks"]) / len(result["chunks"])
                    if question.kind == "needle":
                        target = set(chunks_overlapping(opened, question.document, question.exclude_span))
                        read = [set(chunks) for chunks in result["chunks"]]
                        row["routed"] = sum(bool(target & chunks) for chunks in read) / len(read)
                        forced = opened.ask(question.prompt, **asked, include=sorted(target))["answer"]
                        row.update(needle_chunks=sorted(target), answer_when_forced=forced,
                                   correct_when_forced=is_correct(question, forced))
                    answers.append(row)
                name = f"bank {label} ({selection})"
                rows.append(_summarise(name, size, answers, ingest_tokens_per_second=stats["tokens_per_second"],
                                       bytes=opened.info()["bytes"],
                                       peak_device_bytes=torch.cuda.max_memory_allocated() if device.type == "cuda" else None))
                if progress:
                    progress(rows, meta)
                del opened
            del bank
            if not keep_banks:
                shutil.rmtree(folder, ignore_errors=True)
        if bm25:
            retriever = BM25Retriever(tokenizer, docs, chunk_tokens)
            answers = []
            for question in questions:
                ids = tokenizer(question.prompt, add_special_tokens=False)["input_ids"]
                memory = retriever.prompt(question.prompt, top_k, others(question))
                text, seconds = _generate(model, tokenizer, memory + ids, _tokens_for(question))
                answers.append({"kind": question.kind, **question.info, "answer": text, "correct": is_correct(question, text),
                                "seconds_to_first_token": seconds})
            rows.append(_summarise("BM25 RAG", size, answers))
            if progress:
                progress(rows, meta)
        if context is None or size + 200 <= context:
            answers = []
            for question in questions:
                # every document as in the haystack, but those holding other cases' needles without them
                other_needles = {q.document for q in needle_qs if q is not question}
                ids = [t for i, d in enumerate(docs) for t in (plain[i].ids if i in other_needles else d.ids)]
                ids += tokenizer(question.prompt, add_special_tokens=False)["input_ids"]
                text, seconds = _generate(model, tokenizer, ids, _tokens_for(question))
                answers.append({"kind": question.kind, **question.info, "answer": text, "correct": is_correct(question, text),
                                "seconds_to_first_token": seconds})
            rows.append(_summarise("full cache", size, answers))
            if progress:
                progress(rows, meta)
    return rows, meta


def write_memory_report(rows: list[MemoryRow], meta: dict, output: Path) -> list[Path]:
    return write_report(output, "memory", {"meta": meta, "results": [asdict(r) for r in rows]},
                        render_memory_markdown(rows, meta), lambda path: plot_memory(rows, path))


def _fmt(value, pattern="{:.0%}"):
    return "-" if value is None else pattern.format(value)


def _gib(n):
    return "-" if n is None else f"{n / 2**30:.3f}"


def render_memory_markdown(rows: list[MemoryRow], meta: dict) -> str:
    lines = ["# sparsemem eval memory", ""] + [f"- {k}: {v}" for k, v in meta.items()] + [""]
    lines += ["| method | haystack tokens | needles | routing recall | needles, chunk forced | code questions | "
              "code routing recall | time to first token (s) | ingest tokens/s | disk GiB | host GiB | device GiB (routing) | "
              "peak device GiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r.bytes or {}
        lines.append(f"| {r.method} | {r.tokens} | {_fmt(r.needle_accuracy)} | {_fmt(r.routing_recall)} | "
                     f"{_fmt(r.forced_needle_accuracy)} | {_fmt(r.code_accuracy)} | {_fmt(r.code_routing_recall)} | "
                     f"{r.seconds_to_first_token:.3f} | {_fmt(r.ingest_tokens_per_second, '{:.0f}')} | {_gib(b.get('disk'))} | "
                     f"{_gib(b.get('host'))} | {_gib(b.get('device'))} | {_gib(r.peak_device_bytes)} |")
    lines += _projection(rows, PROJECTED_TOKENS)
    missed = [(r, a) for r in rows for a in r.answers if a["kind"] == "needle" and not a["correct"]]
    if missed:
        lines += ["", "## Needles missed", "", "| method | tokens | depth | key | needle chunk routed | answer | answer, chunk forced |",
                  "|---|---|---|---|---|---|---|"]
        for r, a in missed:
            routed = _fmt(a.get("routed"))
            forced = repr(a["answer_when_forced"].strip()) if "answer_when_forced" in a else "-"
            lines.append(f"| {r.method} | {r.tokens} | {a['depth']:.2f} | {a['key']} | {routed} | {a['answer'].strip()!r} | "
                         f"{forced} |".replace("\n", " "))
    return "\n".join(lines) + "\n"


PROJECTED_TOKENS = 100_000_000


def _projection(rows: list[MemoryRow], tokens: int) -> list[str]:
    """Markdown lines: each bank measured at its largest haystack, scaled to `tokens`. Bytes per tier grow
    with the tokens (per-token costs as measured); of the time to the first token only routing grows (its
    matmul and top-k run over every routing key); reading the chosen chunks and the question do not."""
    largest: dict[str, MemoryRow] = {}
    for row in rows:
        if row.bytes and row.routing_seconds is not None and (row.method not in largest or row.tokens > largest[row.method].tokens):
            largest[row.method] = row
    if not largest:
        return []
    lines = ["", f"## Projected to {tokens:,} tokens", "",
             "Bytes scale per token from the largest haystack measured; the time to the first token keeps its reading "
             "part and scales its routing part with the tokens.", "",
             "| bank | measured at | disk GiB | host GiB | device GiB (routing) | routing s | time to first token (s) |",
             "|---|---|---|---|---|---|---|"]
    for method, row in largest.items():
        scale = tokens / row.tokens
        tiers = {tier: row.bytes.get(tier, 0) * scale for tier in ("disk", "host", "device")}
        ttft = row.seconds_to_first_token + row.routing_seconds * (scale - 1)
        lines.append(f"| {method} | {row.tokens} | {_gib(tiers['disk'])} | {_gib(tiers['host'])} | {_gib(tiers['device'])} | "
                     f"{row.routing_seconds * scale:.3f} | {ttft:.3f} |")
    return lines


def plot_memory(rows: list[MemoryRow], path: Path):
    from .plots import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r.method for r in rows):
        chosen = sorted((r for r in rows if r.method == method), key=lambda r: r.tokens)
        for axis, field_name in zip(axes, ("needle_accuracy", "code_accuracy")):
            values = [math.nan if getattr(r, field_name) is None else getattr(r, field_name) for r in chosen]
            axis.plot([r.tokens for r in chosen], values, marker="o", label=method)
    axes[0].set(xscale="log", xlabel="haystack tokens", ylabel="needle accuracy", ylim=(-0.05, 1.05))
    axes[1].set(xscale="log", xlabel="haystack tokens", ylabel="code-question accuracy", ylim=(-0.05, 1.05))
    axes[0].legend(fontsize=7)
    return save_figure(plt, fig, path)


def command_line() -> str:
    return "sparsemem " + " ".join(sys.argv[1:])
