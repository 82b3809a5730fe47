"""`sparsemem eval ruler`: RULER-style synthetic long-context tasks, full cache against compaction.

The tasks follow the definitions of the RULER paper (Hsieh et al., 2024, "RULER: What's the Real Context
Size of Your Long-Context Language Models?"), built here on real text of the machine (the corpus of the
other suites) instead of a synthetic haystack:

- `niah_single`: one "special magic number" needle (a 7-digit value under a two-word key) hidden in the
  text; the question names the key.
- `niah_multikey`: four needles under different keys; one key is asked, the other three are distractors.
- `niah_multivalue`: four needles under the same key; every value must be recalled.
- `niah_multiquery`: four needles under different keys; all four keys are asked at once.
- `vt` (variable tracking): a chain `VAR A = 12345`, `VAR B = A`, ... (four hops) spread over the text;
  every variable that ends up holding the value must be named.
- `cwe` (common words extraction): a numbered list of words in which ten words appear many times and the
  others a few times each; the ten common ones must be named.
- `fwe` (frequent words extraction): words drawn with Zipf frequencies (exponent 2); the three most
  frequent must be named.

Every prompt is `context + question` with exactly (NIAH, VT) or at most (CWE, FWE) the target number of
tokens. The context is read once per sample; each compaction method compacts a copy of that cache at each
ratio, and the question is answered from it with greedy decoding (`sparsemem.ask`, the question asked
after compaction, as when a compacted document is reused). A sample's score is the fraction of the
expected strings found in the answer, case-insensitively (RULER's "all" string match).
"""

import copy
import json
import logging
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .atomic import write_report, write_text
from .corpus import Corpus, token_window

logger = logging.getLogger(__name__)

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
DEFAULT_METHODS = ("am", "kvzip", "streaming-llm")

# needles per NIAH task (RULER's defaults): keys written, values per key, keys asked
NIAH_SHAPES = {"niah_single": (1, 1, 1), "niah_multikey": (4, 1, 1), "niah_multivalue": (1, 4, 1), "niah_multiquery": (4, 1, 4)}
VT_HOPS = 4
CWE_COMMON, CWE_COMMON_REPEATS, CWE_RARE_REPEATS = 10, 30, 3
FWE_TOP, FWE_ALPHA = 3, 2.0
# greedy tokens per answer: enough for the expected strings with their separators
MAX_NEW_TOKENS = {"niah_single": 24, "niah_multikey": 24, "niah_multivalue": 64, "niah_multiquery": 64, "vt": 40,
                  "cwe": 80, "fwe": 24}

NIAH_INTRO = ("Special magic numbers are hidden in the long text below. Memorize them: questions about them "
              "follow the text.\n\n")
NIAH_NEEDLE = "\nOne of the special magic numbers for {key} is: {value}.\n"
VT_INTRO = ("Variable assignments are hidden in the long text below. Memorize them: a question about them "
            "follows the text.\n\n")
VT_NEEDLE = "\nVAR {name} = {value}.\n"
CWE_INTRO = "Below is a numbered list of words. Some words appear more often than others; memorize which.\n\n"
FWE_INTRO = "Below is a long text of words. Some words appear more often than others; memorize which.\n\n"


@dataclass
class RulerSample:
    task: str
    length: int  # target tokens of context + question
    index: int
    context: list[int]  # token ids read (and compacted) before the question
    question: str  # asked after the context, ends with the start of the answer
    expected: list[str]
    max_new_tokens: int

    @property
    def tokens(self) -> int:
        return len(self.context)


@dataclass
class RulerResult:
    task: str
    length: int
    index: int
    method: str
    ratio: float
    score: float
    answer: str
    expected: list[str]
    prompt_tokens: int
    kv_bytes: int
    seconds: float


def score_answer(answer: str, expected: list[str]) -> float:
    """RULER's "all" match: the fraction of the expected strings that appear in the answer (any case)."""
    if not expected:
        raise ValueError("a sample needs at least one expected string")
    text = answer.lower()
    return sum(e.lower() in text for e in expected) / len(expected)


def corpus_words(corpus: Corpus, minimum: int = 4, maximum: int = 10) -> list[str]:
    """Distinct lower-case alphabetic words of the corpus (sorted, so a seed picks the same ones)."""
    words = sorted(set(re.findall(rf"\b[a-z]{{{minimum},{maximum}}}\b", corpus.text)))
    if len(words) < 200:
        raise ValueError(f"corpus {corpus.source!r} has only {len(words)} distinct words; the RULER tasks need 200")
    return words


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _line_starts(tokenizer, hay: list[int]) -> list[int]:
    """Positions right after a token holding a newline: needles go there rather than inside a word."""
    return [i + 1 for i, token in enumerate(hay) if "\n" in tokenizer.decode([token])]


def _splice(tokenizer, hay: list[int], needles: list[list[int]], depths: list[float]) -> list[int]:
    """`hay` with each needle inserted at its relative depth (moved to the nearest line start, if any)."""
    starts = _line_starts(tokenizer, hay)
    cuts = []
    for depth in depths:
        cut = int(round(depth * len(hay)))
        if starts:
            cut = min(starts, key=lambda s: abs(s - cut))
        cuts.append(min(cut, len(hay)))
    out, previous = [], 0
    for cut, needle in sorted(zip(cuts, needles), key=lambda pair: pair[0]):
        out += hay[previous:cut] + needle
        previous = cut
    return out + hay[previous:]


def _haystack_prompt(tokenizer, corpus, length, rng, intro: str, needles: list[str], question: str) -> list[int]:
    """Token ids of intro + real text with the needles at random depths, so that with the question the
    prompt has exactly `length` tokens. The needles keep their order through the text."""
    intro_ids, question_ids = _encode(tokenizer, intro), _encode(tokenizer, question)
    needle_ids = [_encode(tokenizer, n) for n in needles]
    budget = length - len(intro_ids) - len(question_ids) - sum(map(len, needle_ids))
    if budget < 32:
        raise ValueError(f"--lengths: {length} tokens is too short for this task's prompt")
    # start the text at a line start rather than inside a word
    hay = token_window(tokenizer, corpus, budget + 64, offset=rng.randint(0, 10**6))
    first = next(iter(_line_starts(tokenizer, hay[:64])), 0)
    hay = hay[first : first + budget]
    depths = sorted(rng.uniform(0.0, 1.0) for _ in needles)
    return intro_ids + _splice(tokenizer, hay, needle_ids, depths)


def _number(rng, digits: int, taken: set) -> str:
    while True:
        value = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
        if value not in taken:
            taken.add(value)
            return value


def make_niah(task, tokenizer, corpus, length, rng, words) -> tuple[list[int], str, list[str]]:
    keys_written, values_per_key, keys_asked = NIAH_SHAPES[task]
    keys = []
    while len(keys) < keys_written:
        key = "-".join(rng.sample(words, 2))
        if key not in keys:
            keys.append(key)
    taken: set = set()
    values = {key: [_number(rng, 7, taken) for _ in range(values_per_key)] for key in keys}
    needles = [NIAH_NEEDLE.format(key=key, value=value) for key in keys for value in values[key]]
    rng.shuffle(needles)
    asked = rng.sample(keys, keys_asked)
    if keys_asked == 1 and values_per_key == 1:
        question = (f"\n\nWhat is the special magic number for {asked[0]} mentioned in the text above? "
                    f"The special magic number for {asked[0]} mentioned in the text above is")
    else:
        names = asked[0] if keys_asked == 1 else ", ".join(asked[:-1]) + " and " + asked[-1]
        question = (f"\n\nWhat are all the special magic numbers for {names} mentioned in the text above? "
                    f"The special magic numbers for {names} mentioned in the text above are")
    expected = [value for key in asked for value in values[key]]
    return _haystack_prompt(tokenizer, corpus, length, rng, NIAH_INTRO, needles, question), question, expected


def make_vt(tokenizer, corpus, length, rng, hops: int = VT_HOPS) -> tuple[list[int], str, list[str]]:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    value = _number(rng, 5, set())
    # the chain in order: the value first, then each variable copies the previous one
    needles = [VT_NEEDLE.format(name=names[0], value=value)]
    needles += [VT_NEEDLE.format(name=names[i], value=names[i - 1]) for i in range(1, len(names))]
    question = (f"\n\nQuestion: which variables are assigned the value {value}, directly or through other "
                f"variables, in the text above? Answer: the variables assigned the value {value} are:")
    return _haystack_prompt(tokenizer, corpus, length, rng, VT_INTRO, needles, question), question, names


def _fit(tokenizer, length: int, question: str, build, low: int, high: int) -> list[int]:
    """The longest `build(n)` (token ids, growing with n) that fits `length` tokens with the question,
    by bisection over n in [low, high]."""
    room = length - len(_encode(tokenizer, question))
    if len(build(low)) > room:
        raise ValueError(f"--lengths: {length} tokens is too short for this task's prompt")
    while low < high:
        middle = (low + high + 1) // 2
        if len(build(middle)) <= room:
            low = middle
        else:
            high = middle - 1
    return build(low)


def make_cwe(tokenizer, length, rng, words) -> tuple[list[int], str, list[str]]:
    chosen = rng.sample(words, len(words))
    common, rare_pool = chosen[:CWE_COMMON], chosen[CWE_COMMON:]
    question = (f"\n\nQuestion: which {CWE_COMMON} words appear most often in the list above? Answer: the "
                f"{CWE_COMMON} words that appear most often in the list above are:")
    order_seed = rng.random()

    def build(rare: int) -> list[int]:
        # fewer repeats of the common words when the list is short, still more than any rare word's
        repeats = max(CWE_RARE_REPEATS + 1, min(CWE_COMMON_REPEATS, rare // 4))
        entries = common * repeats + rare_pool[:rare] * CWE_RARE_REPEATS
        random.Random(order_seed).shuffle(entries)
        text = CWE_INTRO + "".join(f"{i}. {word}\n" for i, word in enumerate(entries, 1))
        return _encode(tokenizer, text)

    ids = _fit(tokenizer, length, question, build, 0, len(rare_pool))
    return ids, question, common


def zipf_counts(total: int, vocabulary: int, alpha: float = FWE_ALPHA) -> list[int]:
    """Word counts in proportion to rank^-alpha, about `total` words in all; words that would get none are dropped."""
    norm = sum(rank**-alpha for rank in range(1, vocabulary + 1))
    counts = [int(total * rank**-alpha / norm) for rank in range(1, vocabulary + 1)]
    return [c for c in counts if c > 0]


def make_fwe(tokenizer, length, rng, words) -> tuple[list[int], str, list[str]]:
    chosen = rng.sample(words, min(len(words), 400))
    question = (f"\n\nQuestion: which {FWE_TOP} words appear most often in the text above? Answer: the "
                f"{FWE_TOP} words that appear most often in the text above are:")
    order_seed = rng.random()

    def build(total: int) -> list[int]:
        counts = zipf_counts(total, len(chosen))
        entries = [word for word, count in zip(chosen, counts) for _ in range(count)]
        random.Random(order_seed).shuffle(entries)
        lines = [" ".join(entries[i : i + 16]) for i in range(0, len(entries), 16)]
        return _encode(tokenizer, FWE_INTRO + "\n".join(lines))

    # at least 40 words, so the top ranks have distinct counts (1/1, 1/4, 1/9, 1/16 of the first)
    ids = _fit(tokenizer, length, question, build, 40, 4 * length)
    return ids, question, chosen[:FWE_TOP]


def make_sample(task: str, tokenizer, corpus: Corpus, length: int, index: int, seed: int = 0,
                words: list[str] | None = None) -> RulerSample:
    """Sample `index` of `task` at `length` tokens; the same (task, length, index, seed) gives the same sample."""
    if task not in TASKS:
        raise ValueError(f"--tasks: unknown RULER task {task!r}; choose from {list(TASKS)}")
    rng = random.Random(f"ruler-{task}-{length}-{index}-{seed}")
    words = words if words is not None else corpus_words(corpus)
    if task.startswith("niah"):
        context, question, expected = make_niah(task, tokenizer, corpus, length, rng, words)
    elif task == "vt":
        context, question, expected = make_vt(tokenizer, corpus, length, rng)
    elif task == "cwe":
        context, question, expected = make_cwe(tokenizer, length, rng, words)
    else:
        context, question, expected = make_fwe(tokenizer, length, rng, words)
    return RulerSample(task, length, index, context, question, expected, MAX_NEW_TOKENS[task])


def make_samples(tokenizer, corpus, tasks, lengths, samples: int, seed: int = 0) -> list[RulerSample]:
    words = corpus_words(corpus)
    return [make_sample(task, tokenizer, corpus, length, index, seed, words)
            for task in tasks for length in lengths for index in range(samples)]


# settings a resumed run must share with the results it keeps
RESUME_KEYS = ("model", "corpus", "seed", "am_queries", "dtype", "options")


def read_progress(path: Path, meta: dict) -> list[RulerResult]:
    """The results of an earlier run's `progress.jsonl`, after checking that it was measured with the
    same `RESUME_KEYS` settings as `meta`."""
    lines = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines or "meta" not in lines[0]:
        raise ValueError(f"--resume: {path} does not start with a run's settings")
    earlier = lines[0]["meta"]
    differ = [key for key in RESUME_KEYS if earlier.get(key) != meta.get(key)]
    if differ:
        raise ValueError(f"--resume: {path} was measured with other settings ({', '.join(differ)}); "
                         "use another --output or drop --resume")
    return [RulerResult(**row) for row in lines[1:]]


@torch.no_grad()
def evaluate_ruler(model, tokenizer, samples: list[RulerSample], methods=DEFAULT_METHODS, ratios=(5, 10),
                   queries=("repeat",), progress: Path | None = None, meta: dict | None = None,
                   done: list[RulerResult] = ()) -> list[RulerResult]:
    """Answer every sample from the full cache and from each (method, ratio) compaction of it.

    The context is read once per sample (`prefill`, whose context queries serve the methods that rank by
    them); each method compacts a copy of that cache; the reference queries of a repeat pass are captured
    once per sample and shared by the methods that use them. `progress`: a JSON-lines file that gets
    `meta`, then each result as soon as it is measured. `done`: results measured before (`read_progress`);
    those of these samples and configurations are kept (when their expected answers match) and not
    measured again; all of them stay in `progress`."""
    from .cache_compaction import compact, prefill
    from .query_sources import ContextQueries, capture_reference_queries, query_sources_for
    from .questions import ask

    window = getattr(model.config, "max_position_embeddings", None)
    for sample in samples:
        if window is not None and sample.length > window:
            raise ValueError(f"--lengths: {sample.length} tokens exceed the model's window ({window})")
    configs = [(method, float(ratio)) for method in methods for ratio in ratios] + [("full", 1.0)]
    wanted = {(s.task, s.length, s.index, m, r): s.expected for s in samples for m, r in configs}
    kept = {}
    for r in done:
        key = (r.task, r.length, r.index, r.method, r.ratio)
        if wanted.get(key) == r.expected:
            kept[key] = r
    if progress is not None:
        Path(progress).parent.mkdir(parents=True, exist_ok=True)
        # every earlier result stays in the file, also those of samples not asked for this time
        write_text(Path(progress), "".join(json.dumps(row) + "\n" for row in
                                           [{"meta": meta or {}}] + [asdict(r) for r in done]))
    results = []
    bar = tqdm(total=len(samples) * len(configs), desc="ruler (sample x method)")
    for sample in samples:
        todo = [(m, r) for m, r in configs if (sample.task, sample.length, sample.index, m, r) not in kept]
        for method, ratio in configs:
            if (method, ratio) not in todo:
                results.append(kept[(sample.task, sample.length, sample.index, method, ratio)])
                bar.update()
        if not todo:
            continue
        ids = torch.tensor([sample.context], device=model.device)
        full, context_queries = prefill(model, ids)
        captured = {(ContextQueries(),): context_queries}
        for method, ratio in todo:
            bar.set_postfix_str(f"{sample.task} {sample.length} #{sample.index} {method} {ratio:g}x")
            start = time.perf_counter()
            if method == "full":
                cache = full  # ask() leaves it as it was
            else:
                sources = query_sources_for(method, default=queries)  # as `compact` resolves them
                if sources not in captured:
                    captured[sources] = capture_reference_queries(model, ids, sources, tokenizer)
                cache = copy.deepcopy(full)
                compact(model, cache, ratio, method=method, queries=sources, reference_queries=captured[sources],
                        input_ids=ids, tokenizer=tokenizer)
            answer = ask(model, tokenizer, cache, sample.question, max_new_tokens=sample.max_new_tokens,
                         do_sample=False)
            result = RulerResult(sample.task, sample.length, sample.index, method, ratio,
                                 score_answer(answer, sample.expected), answer, sample.expected,
                                 sample.tokens + len(_encode(tokenizer, sample.question)),
                                 cache.memory_bytes()["total"], time.perf_counter() - start)
            results.append(result)
            if progress is not None:
                with Path(progress).open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(asdict(result)) + "\n")
            logger.info("%s %d #%d %s %gx: %.2f %r", sample.task, sample.length, sample.index, method, ratio,
                        result.score, answer)
            bar.update()
            del cache
    bar.close()
    return results


def merge_reports(parts: list[str], output_dir: str) -> list[Path]:
    """One report from the `progress.jsonl` of several runs (e.g. one per group of tasks, run side by side,
    or interrupted): their settings must agree wherever both recorded them, and a result measured twice
    is kept once. Tasks or configurations a run did not reach show as missing in the tables."""
    results, meta, commands = {}, None, []
    for part in parts:
        path = Path(part) / "progress.jsonl" if Path(part).is_dir() else Path(part)
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines or "meta" not in lines[0]:
            raise ValueError(f"{path} does not start with a run's settings")
        settings = lines[0]["meta"]
        if meta is None:
            meta = dict(settings)
        differ = [key for key in RESUME_KEYS if key in meta and key in settings and meta[key] != settings[key]]
        if differ:
            raise ValueError(f"{path} was measured with other settings than {parts[0]} ({', '.join(differ)})")
        commands.append(settings.get("command", "?"))
        for row in lines[1:]:
            result = RulerResult(**row)
            results.setdefault((result.task, result.length, result.index, result.method, result.ratio), result)
    merged = list(results.values())
    meta.update({"tasks": list(dict.fromkeys(r.task for r in merged)), "command": " + ".join(commands) + " (merged)"})
    return write_ruler_report(merged, meta, Path(output_dir))


def config_label(method: str, ratio: float) -> str:
    return "full" if method == "full" else f"{method} {ratio:g}x"


def summarize(results: list[RulerResult]) -> dict:
    """{"task/length": {config: mean score}}, plus "mean/length" over the tasks, scores in percent."""
    table: dict = {}
    for task in dict.fromkeys(r.task for r in results):
        for length in sorted({r.length for r in results if r.task == task}):
            rows = [r for r in results if r.task == task and r.length == length]
            table[f"{task}/{length}"] = _means(rows)
    for length in sorted({r.length for r in results}):
        tasks = [key for key in table if key.endswith(f"/{length}") and not key.startswith("mean/")]
        labels = dict.fromkeys(label for key in tasks for label in table[key])
        table[f"mean/{length}"] = {label: sum(table[key][label] for key in tasks) / len(tasks) for label in labels
                                   if all(label in table[key] for key in tasks)}
    return table


def _means(rows: list[RulerResult]) -> dict:
    out = {}
    for label in dict.fromkeys(config_label(r.method, r.ratio) for r in rows):
        chosen = [r.score for r in rows if config_label(r.method, r.ratio) == label]
        out[label] = 100.0 * sum(chosen) / len(chosen)
    return out


def write_ruler_report(results: list[RulerResult], meta: dict, output_dir: Path) -> list[Path]:
    summary = summarize(results)
    return write_report(output_dir, "ruler", {"meta": meta, "summary": summary, "results": [asdict(r) for r in results]},
                        render_ruler_markdown(results, meta), lambda path: plot_ruler(summary, path))


def render_ruler_markdown(results: list[RulerResult], meta: dict) -> str:
    summary = summarize(results)
    labels = list(dict.fromkeys(["full"] + [config_label(r.method, r.ratio) for r in results]))
    labels = [label for label in labels if any(label in row for row in summary.values())]
    lines = ["# sparsemem eval ruler", ""] + [f"- {k}: {v}" for k, v in meta.items()] + [""]
    lines += ["Score: mean share of the expected strings found in the answer, in percent.", ""]
    lines += ["| task | length | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for key, row in summary.items():
        task, length = key.rsplit("/", 1)
        name = f"**{task}**" if task == "mean" else task
        lines.append(f"| {name} | {length} | " + " | ".join(f"{row[l]:.1f}" if l in row else "-" for l in labels) + " |")
    lines += ["", "## KV bytes, full / compacted (mean over samples)", "", "| config | ratio of bytes | seconds per sample (compaction, the sample's repeat pass where this configuration was the first to need it, answer) |", "|---|---|---|"]
    for label in labels:
        chosen = [r for r in results if config_label(r.method, r.ratio) == label]
        full = {(r.task, r.length, r.index): r.kv_bytes for r in results if r.method == "full"}
        ratios = [full[(r.task, r.length, r.index)] / r.kv_bytes for r in chosen if (r.task, r.length, r.index) in full]
        shown = f"{sum(ratios) / len(ratios):.2f}x" if ratios else "-"
        lines.append(f"| {label} | {shown} | {sum(r.seconds for r in chosen) / len(chosen):.1f} |")
    lines += ["", "## Answers (first sample of each task and length)", "", "| task | length | config | expected | answer |",
              "|---|---|---|---|---|"]
    for r in results:
        if r.index == 0:
            answer = repr(r.answer.strip()[:120]).replace("|", "\\|")
            lines.append(f"| {r.task} | {r.length} | {config_label(r.method, r.ratio)} | {', '.join(r.expected)} | {answer} |")
    return "\n".join(lines) + "\n"


def plot_ruler(summary: dict, path: Path) -> Path | None:
    """Left: mean score over the tasks, per length (one length: a bar per configuration); right: per task
    and length. One colour per configuration in both."""
    from .plots import pyplot, save_figure

    plt = pyplot()
    if plt is None:
        return None
    means = {int(k.split("/")[1]): row for k, row in summary.items() if k.startswith("mean/")}
    tasks = [k for k in summary if not k.startswith("mean/")]
    labels = sorted(dict.fromkeys(label for row in summary.values() for label in row), key=lambda l: l != "full")
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [1, 2.4]})
    if len(means) == 1:
        (length, row), = means.items()
        shown = [l for l in labels if l in row]
        axes[0].bar(range(len(shown)), [row[l] for l in shown], color=[colours[l] for l in shown])
        axes[0].set_xticks(range(len(shown)), shown, rotation=35, ha="right", fontsize=8)
        axes[0].set(ylabel=f"mean score over the tasks (%), {length} tokens", ylim=(0, 103))
    else:
        for label in labels:
            lengths = sorted(n for n in means if label in means[n])
            style = ":" if label == "full" else ("-" if label.startswith("am") else "--")
            axes[0].plot(lengths, [means[n][label] for n in lengths], style, marker="o", color=colours[label], label=label)
        axes[0].set(xlabel="prompt tokens", ylabel="mean score over the tasks (%)", ylim=(-3, 103))
        axes[0].legend(fontsize=8)
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        axes[1].bar([t + i * width for t in range(len(tasks))], [summary[k].get(label, float("nan")) for k in tasks],
                    width, color=colours[label], label=label)
    axes[1].set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], [k.replace("/", "\n") for k in tasks],
                       rotation=20, fontsize=8)
    axes[1].set(ylabel="score (%)", ylim=(0, 103))
    axes[1].legend(fontsize=7, ncol=len(labels), loc="upper center", bbox_to_anchor=(0.5, 1.13))
    return save_figure(plt, fig, path)


# lm-eval (EleutherAI's harness) --------------------------------------------------------------------------

LM_EVAL_GROUP = "sparsemem_ruler"


def lm_eval_process_results(doc: dict, results: list[str]) -> dict:
    """lm-eval `process_results` of the exported tasks: the RULER "all" string match of the first answer."""
    return {"score": score_answer(results[0], doc["outputs"])}


def export_lm_eval(samples: list[RulerSample], tokenizer, directory: Path) -> list[Path]:
    """A local lm-eval task folder (`--include_path DIR`): one JSONL and one YAML per task and length
    (`ruler_<task>_<length>`), a group `sparsemem_ruler` over them, and the metric module the YAMLs name.
    The prompt is the sample's context decoded to text followed by the question; lm-eval tokenizes it again."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written, names = [], []
    for task in dict.fromkeys(s.task for s in samples):
        for length in sorted({s.length for s in samples if s.task == task}):
            chosen = [s for s in samples if s.task == task and s.length == length]
            name = f"ruler_{task}_{length}"
            names.append(name)
            rows = [{"index": s.index, "input": tokenizer.decode(s.context) + s.question, "outputs": s.expected,
                     "length": s.length} for s in chosen]
            data = directory / f"{name}.jsonl"
            write_text(data, "".join(json.dumps(row) + "\n" for row in rows))
            # data_files is resolved from the working directory, so the path is absolute
            config = "\n".join([
                f"task: {name}",
                "dataset_path: json",
                "dataset_kwargs:",
                "  data_files:",
                f"    test: {json.dumps(str(data.resolve()))}",
                "test_split: test",
                "output_type: generate_until",
                'doc_to_text: "{{input}}"',
                'doc_to_target: "{{outputs[0]}}"',
                "generation_kwargs:",
                f"  max_gen_toks: {chosen[0].max_new_tokens}",
                "  do_sample: false",
                "  until: []",
                "process_results: !function ruler_metric.process_results",
                "metric_list:",
                "  - metric: score",
                "    aggregation: mean",
                "    higher_is_better: true",
                "metadata:",
                "  version: 1.0",
                "",
            ])
            written += [data, directory / f"{name}.yaml"]
            write_text(written[-1], config)
    metric = directory / "ruler_metric.py"
    write_text(metric, '"""Score of the sparsemem RULER tasks (written by `sparsemem eval ruler --export-lm-eval`)."""\n\n'
                       "from sparsemem.evaluation_ruler import lm_eval_process_results as process_results  # noqa: F401\n")
    group = directory / f"{LM_EVAL_GROUP}.yaml"
    write_text(group, "\n".join([f"group: {LM_EVAL_GROUP}", "task:"] + [f"  - {n}" for n in names] + [
        "aggregate_metric_list:", "  - metric: score", "    aggregation: mean", "    weight_by_size: false",
        "metadata:", "  version: 1.0", ""]))
    return written + [metric, group]
