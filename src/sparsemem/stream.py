"""Constant-memory streaming: feed an arbitrarily long real-text stream through a model whose cache is
compacted online to a fixed physical budget, and record memory and next-token loss along the way.

The stream is the Python standard library's `.py` sources in sorted path order (or the user's text
files), tokenized one file (or one ~256K-character piece) at a time and cycled when it runs out. Each
chunk goes through the decoder with a `SparseMemCache` under `OnlineCompaction`: after the chunk's
attention, every layer that reached `max_kv_tokens` physical entries per KV head is compacted into slots
(existing slots folded in), so the cache never holds more than the budget between chunks and at most
`target x budget + chunk` entries while a chunk is attended. RoPE positions follow the model's
`positions` option: with "auto" (the default) they are logical inside the model's trained context and
cache positions beyond it (every held entry at its rank in time order), so the model never sees a
distance longer than what the cache holds; with "logical" they run far past the trained context.

The chunk's loss is teacher-forced on the chunk itself (each token predicted from everything before it,
through the compacted cache), computed from the final hidden states in pieces so that the peak memory is
not dominated by the [chunk, vocab] logits.
"""

import logging
import os
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .machine import device_name, model_label
from .modeling.attention_matching_press import AttentionMatchingPress
from .modeling.modeling_sparsemem import CACHE_ARGUMENT

logger = logging.getLogger(__name__)

PIECE_CHARS = 1 << 18  # characters tokenized per call for long files
LOSS_PIECE = 512  # hidden states turned into logits per step of the chunked loss


def stdlib_sources() -> tuple[Path, list[Path]]:
    """The standard library folder and its `.py` files in sorted path order (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if p.is_file() and not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
    )
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library folder {root}")
    return root, files


def _pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in pieces of about `size` characters, cut after a newline where there is one."""
    start = 0
    while start < len(text):
        stop = min(len(text), start + size)
        if stop < len(text):
            newline = text.rfind("\n", start, stop)
            if newline > start:
                stop = newline + 1
        yield text[start:stop]
        start = stop


class TokenStream:
    """Token ids of real text, produced lazily file by file; cycles when the text runs out.

    `files`: text files read in order (default: the standard library's `.py` sources). Files are joined
    by a blank line. `cycles` counts how often the stream started again from the first file.
    """

    def __init__(self, tokenizer, files: list[str | Path] | None = None):
        self.tokenizer = tokenizer
        if files:
            self.files = [Path(f) for f in files]
            missing = [str(f) for f in self.files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"stream text file(s) not found: {', '.join(missing)}")
            self.source = ", ".join(str(f) for f in self.files)
        else:
            root, self.files = stdlib_sources()
            self.source = f"Python standard library .py sources under {root} ({len(self.files)} files, sorted paths)"
        self.cycles = 0
        self.files_read = 0
        self.tokens_per_cycle: int | None = None
        self._produced = 0
        self._buffer: list[int] = []
        self._iterator = self._ids()

    def _ids(self) -> Iterator[list[int]]:
        while True:
            produced = 0
            for path in self.files:
                text = path.read_text(encoding="utf-8", errors="replace") + "\n\n"
                for piece in _pieces(text):
                    ids = self.tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"]
                    produced += len(ids)
                    yield ids
                self.files_read += 1
            if produced == 0:
                raise ValueError(f"the stream text ({self.source}) holds no tokens")
            if self.tokens_per_cycle is None:
                self.tokens_per_cycle = produced
            self.cycles += 1
            logger.warning("stream text ran out after %d tokens: starting again from its beginning (cycle %d)", produced, self.cycles)

    def take(self, count: int) -> list[int]:
        while len(self._buffer) < count:
            self._buffer.extend(next(self._iterator))
        out, self._buffer = self._buffer[:count], self._buffer[count:]
        self._produced += count
        return out


# needles recalled under constant memory: a named secret number, asked for at the end of the stream
PASSKEY_NAMES = ("the blue folder", "the red folder", "the green folder", "the black folder", "the white folder")
PASSKEY_NEEDLE = "\n\nThe secret number of {name} is {key}. Remember it. {key} is the secret number of {name}.\n\n"
PASSKEY_QUESTION = "\n\nWhat is the secret number of {name}? The secret number of {name} is"


class NeedleStream:
    """A token stream with needles spliced in at given stream positions: `inserts` maps a position (tokens
    produced before the needle) to the needle's token ids."""

    def __init__(self, source, inserts: dict[int, list[int]]):
        self.source = source
        self.inserts = dict(sorted(inserts.items()))
        self.produced = 0

    def take(self, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            due = [p for p in self.inserts if self.produced <= p < self.produced + count - len(out)]
            if not due:
                piece = self.source.take(count - len(out))
            elif due[0] > self.produced:
                piece = self.source.take(due[0] - self.produced)
            else:
                piece = self.inserts.pop(due[0])[: count - len(out)]
            out += piece
            self.produced += len(piece)
        return out

    def __getattr__(self, name):  # the wrapped stream's bookkeeping (cycles, files read, ...)
        return getattr(self.source, name)


def passkey_cases(tokenizer, tokens: int, distances: list[int], seed: int = 0) -> list[dict]:
    """One named secret number per distance, its needle ending `distance` tokens before the stream's end."""
    import random

    if len(distances) > len(PASSKEY_NAMES):
        raise ValueError(f"at most {len(PASSKEY_NAMES)} pass-key distances, got {len(distances)}")
    rng = random.Random(seed)
    cases = []
    for name, distance in zip(PASSKEY_NAMES, distances):
        if not 0 < distance < tokens:
            raise ValueError(f"pass-key distance {distance} must lie in (0, stream tokens={tokens})")
        key = str(rng.randint(10000, 99999))
        needle = tokenizer(PASSKEY_NEEDLE.format(name=name, key=key), add_special_tokens=False)["input_ids"]
        question = tokenizer(PASSKEY_QUESTION.format(name=name), add_special_tokens=False)["input_ids"]
        cases.append(dict(name=name, key=key, distance=distance, start=tokens - distance - len(needle),
                          needle=needle, question=question))
    return cases


@torch.inference_mode()
def ask_passkeys(model, tokenizer, cache, cases: list[dict], new_tokens: int = 8) -> list[dict]:
    """Greedy answers to each case's question, each from its own copy of the (compacted) cache; the budget
    is not enforced while asking."""
    import copy

    results = []
    for case in cases:
        asked = copy.deepcopy(cache)
        asked.online = None
        ids = torch.tensor([case["question"]], device=model.device)
        answer = []
        for _ in range(new_tokens):
            logits = model(input_ids=ids, **{CACHE_ARGUMENT: asked}, use_cache=True, logits_to_keep=1).logits
            ids = logits[:, -1].argmax(-1, keepdim=True)
            answer.append(int(ids))
        text = tokenizer.decode(answer)
        digits = "".join(ch for ch in text.strip().split(".")[0] if ch.isdigit())
        results.append(dict(name=case["name"], distance=case["distance"], key=case["key"], answer=text,
                            correct=digits == case["key"]))
        del asked
    return results


@dataclass
class StreamRun:
    """One method's stream: settings, a record per chunk, and a summary."""

    method: str
    budget: int
    chunk: int
    records: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    stopped: str | None = None  # why the stream ended before the requested tokens, if it did


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def chunk_loss(model, hidden: torch.Tensor, targets: torch.Tensor, piece: int = LOSS_PIECE) -> torch.Tensor:
    """Summed next-token cross-entropy of `hidden` [1, T, H] against `targets` [1, T], in fp32, `piece`
    positions of logits at a time."""
    head = model.get_output_embeddings()
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[1], piece):
        logits = head(hidden[:, start : start + piece]).float()
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets[:, start : start + piece].flatten(), reduction="sum"
        )
    return total


def _layer_sizes(cache) -> tuple[int, int, int]:
    """(largest physical entries per KV head incl. slots, largest full-resolution length, largest slots per head)."""
    from .modeling.online_compaction import OnlineCompaction

    physical = full = slots = 0
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        physical = max(physical, OnlineCompaction.physical_size(layer))
        full = max(full, layer.physical_length)
        if layer.slots is not None and len(layer.slots):
            slots = max(slots, int(torch.bincount(layer.slots.head).max()))
    return physical, full, slots


@torch.inference_mode()
def stream(
    model,
    tokenizer,
    tokens: int,
    chunk: int = 4096,
    budget: int = 4096,
    method: str = "am",
    text_files: list[str] | None = None,
    time_limit: float | None = None,
    on_chunk=None,
    progress: bool = True,
    source: "TokenStream | None" = None,
    baseline: bool = True,
    passkeys: list[int] | None = None,
    online=None,
) -> tuple[StreamRun, TokenStream]:
    """Stream `tokens` tokens through `model` (a sparsemem model) in chunks of `chunk`, with every layer's
    cache compacted online to `budget` entries per KV head by `method`.

    Records after every chunk: tokens so far, the largest physical size of a layer (entries per KV
    head, slots included), the cache's bytes (tiers; and every tensor it keeps alive), on CUDA the peak
    allocated memory during the chunk and the allocated memory after it, the chunk's mean next-token
    loss, wall seconds, and compactions. `on_chunk(run)` is called after each record (for saving).
    `time_limit` (seconds) ends the stream early, which `run.stopped` says. `source`: a `TokenStream` to
    read instead of one over `text_files`. `baseline` also records `loss_no_memory`: the same targets
    predicted from the chunk alone (no cache, positions from 0), the reference a memory should beat.
    `passkeys`: distances (tokens before the stream's end) at which a named secret number is hidden in the
    stream; at the end each is asked for from the compacted cache (`run.summary["passkeys"]`). `online`: an
    `OnlineCompaction` to use instead of the default one for `budget` and `method` (which it must match).
    """
    from tqdm.auto import tqdm

    from .modeling.cache import SparseMemCache
    from .modeling.online_compaction import OnlineCompaction

    if tokens < 2 or chunk < 1:
        raise ValueError(f"stream needs tokens >= 2 and chunk >= 1, got tokens={tokens}, chunk={chunk}")
    device = model.device
    cuda = device.type == "cuda"
    if online is None:
        online = OnlineCompaction(budget, keep_first=model.config.sink_tokens, method=method)
    elif online.max_kv_tokens != budget or online.method != method:
        raise ValueError(f"`online` compacts to {online.max_kv_tokens} with {online.method!r}; the stream was asked for "
                         f"budget={budget}, method={method!r}")
    cache = SparseMemCache(model.config, online=online)
    source = source if source is not None else TokenStream(tokenizer, text_files)
    cases = passkey_cases(tokenizer, tokens, list(passkeys)) if passkeys else []
    if cases:
        # the stream's first token is the carry below: needle positions count from the second
        source = NeedleStream(source, {case["start"] - 1: case["needle"] for case in cases})
    run = StreamRun(method, budget, chunk)
    compacted_to = {
        "sinks": online.keep_first, "recent": online.keep_last, "slots_per_head": online.slots_per_head,
        "after_compaction": online.keep_first + online.keep_last + online.slots_per_head,
        # eviction presses keep span entries as they are; only a fitting press makes slots of its own
        "fitted": isinstance(online.press, AttentionMatchingPress),
    }
    carry = source.take(1)
    fed = 0
    started = time.perf_counter()
    bar = tqdm(total=tokens, unit="tok", desc=f"stream {method}", disable=not progress, smoothing=0.1)
    while fed < tokens:
        if time_limit is not None and time.perf_counter() - started >= time_limit:
            run.stopped = f"time limit of {time_limit:.0f} s reached after {fed} tokens"
            logger.warning("stream %s: %s", method, run.stopped)
            break
        size = min(chunk, tokens - fed)
        ids = carry + source.take(size)
        carry = ids[-1:]
        batch = torch.tensor([ids], device=device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        compactions, compaction_seconds, layout_seconds = online.compactions, online.seconds, cache.layout_seconds
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        hidden = model.model(input_ids=inputs, **{CACHE_ARGUMENT: cache}, use_cache=True).last_hidden_state
        loss = chunk_loss(model, hidden, targets)
        del hidden
        loss = float(loss) / size  # reads the result back: the chunk is done
        seconds = time.perf_counter() - start
        fed += size
        physical, full, slots = _layer_sizes(cache)
        tiers = cache.memory_bytes()
        record = dict(
            tokens=fed, chunk_tokens=size, logical_length=cache.get_seq_length(), physical_max=physical,
            full_resolution_max=full, slots_per_head_max=slots, cache_bytes=tiers["total"],
            cache_tier_bytes={k: v for k, v in tiers.items() if k != "total"}, cache_storage_bytes=cache.storage_bytes(),
            loss=loss, seconds=seconds, compactions=online.compactions, chunk_compactions=online.compactions - compactions,
            compaction_seconds=online.seconds - compaction_seconds, rss_bytes=_rss_bytes(),
            layout_seconds=cache.layout_seconds - layout_seconds, rope_offset=cache.rope_offset,
        )
        # what is left of the chunk's seconds: the forward pass (attention included) and the loss
        record["forward_seconds"] = seconds - record["compaction_seconds"] - record["layout_seconds"]
        if baseline:
            alone = model.model(input_ids=inputs, use_cache=False).last_hidden_state
            record["loss_no_memory"] = float(chunk_loss(model, alone, targets)) / size
            del alone
        if cuda:
            record.update(
                cuda_peak_allocated=torch.cuda.max_memory_allocated(device),
                cuda_allocated=torch.cuda.memory_allocated(device),
                cuda_reserved=torch.cuda.memory_reserved(device),
            )
        run.records.append(record)
        bar.update(size)
        bar.set_postfix(loss=f"{loss:.2f}", phys=physical, s=f"{seconds:.1f}")
        logger.debug("stream %s: %s", method, record)
        run.summary = {"compacted_to": compacted_to, **summarize(run, model.config, source)}
        if on_chunk is not None:
            on_chunk(run)
    bar.close()
    run.summary = {"compacted_to": compacted_to, **summarize(run, model.config, source)}
    if cases and fed >= tokens:
        run.summary["passkeys"] = ask_passkeys(model, tokenizer, cache, cases)
        logger.info("stream %s pass keys: %s", method, [(r["distance"], r["correct"]) for r in run.summary["passkeys"]])
        if on_chunk is not None:
            on_chunk(run)
    return run, source


def summarize(run: StreamRun, config, source: TokenStream) -> dict:
    """Totals, rates, the spread of memory from the first compaction on, and the loss inside and beyond
    the model's trained context."""
    records = run.records
    if not records:
        return {"tokens": 0, "chunks": 0, "stopped": run.stopped}
    trained = getattr(config, "max_position_embeddings", None)
    first = next((i for i, r in enumerate(records) if r["compactions"] > 0), None)
    steady = records[first:] if first is not None else []

    def spread(key):
        values = [r[key] for r in steady if r.get(key) is not None]
        if not values:
            return None
        return {"min": min(values), "max": max(values), "first": values[0], "last": values[-1],
                "relative_spread": (max(values) - min(values)) / max(values) if max(values) else 0.0}

    def mean_loss(select, key="loss"):
        chosen = [r for r in records if select(r) and r.get(key) is not None]
        count = sum(r["chunk_tokens"] for r in chosen)
        return sum(r[key] * r["chunk_tokens"] for r in chosen) / count if count else None

    within = mean_loss(lambda r: trained is None or r["tokens"] <= trained)
    beyond = mean_loss(lambda r: trained is not None and r["tokens"] - r["chunk_tokens"] >= trained)
    seconds = sum(r["seconds"] for r in records)
    compactions = records[-1]["compactions"]
    compaction_seconds = sum(r["compaction_seconds"] for r in records)
    layout_seconds = sum(r.get("layout_seconds", 0.0) for r in records)
    summary = dict(
        tokens=records[-1]["tokens"], chunks=len(records), seconds=seconds, tokens_per_second=records[-1]["tokens"] / seconds,
        median_chunk_seconds=sorted(r["seconds"] for r in records)[len(records) // 2],
        compactions=compactions, compaction_seconds=compaction_seconds,
        # where the time goes: compaction, re-rotation of held keys to cache positions, the rest (forward + loss)
        layout_seconds=layout_seconds, forward_seconds=seconds - compaction_seconds - layout_seconds,
        seconds_per_compaction=compaction_seconds / compactions if compactions else None,
        first_compaction_chunk=first,
        physical_max=max(r["physical_max"] for r in records),
        budget_respected=all(r["physical_max"] <= run.budget for r in records),
        steady_cache_bytes=spread("cache_bytes"), steady_cache_storage_bytes=spread("cache_storage_bytes"),
        steady_cuda_peak_allocated=spread("cuda_peak_allocated"), steady_cuda_allocated=spread("cuda_allocated"),
        trained_context=trained,
        # the window: the model's trained context; "beyond" counts the chunks that start past it
        loss_within_window=within, loss_beyond_window=beyond,
        loss_within_trained_context=within, loss_beyond_trained_context=beyond,
        loss_last_10_percent=mean_loss(lambda r: r["tokens"] > 0.9 * records[-1]["tokens"]),
        loss_no_memory=mean_loss(lambda r: True, "loss_no_memory"),
        loss_no_memory_last_10_percent=mean_loss(lambda r: r["tokens"] > 0.9 * records[-1]["tokens"], "loss_no_memory"),
        no_memory_loss_within_window=mean_loss(lambda r: trained is None or r["tokens"] <= trained, "loss_no_memory"),
        no_memory_loss_beyond_window=mean_loss(
            lambda r: trained is not None and r["tokens"] - r["chunk_tokens"] >= trained, "loss_no_memory"),
        text_cycles=source.cycles, text_tokens_per_cycle=source.tokens_per_cycle, text_files_read=source.files_read,
        stopped=run.stopped,
    )
    return summary


def load_stream_model(args):
    """The model, tokenizer and report metadata of the bench's `stream` section."""
    from . import convert
    from .default_model import load_model

    path, tokenizer, base = load_model(args.model, args.device, args.dtype)
    # every held entry is attended exactly: the compaction into slots is the only approximation
    positions = getattr(args, "positions", "auto")
    model = convert(base, top_k_blocks=None, block_fraction=None, positions=positions)
    meta = dict(positions=positions, 
        model=model_label(args.model, path), device=device_name(model), dtype=args.dtype, tokens=args.stream_tokens,
        chunk=args.stream_chunk, budget=args.stream_budget, methods=list(args.stream_methods),
        trained_context=getattr(model.config, "max_position_embeddings", None), sink_tokens=model.config.sink_tokens,
        time_limit=args.stream_time_limit,
    )
    return model, tokenizer, meta


def _fmt(value, pattern: str = "{:.3f}") -> str:
    return "-" if value is None else pattern.format(value)


def render_stream_markdown(runs: list[dict], meta: dict) -> list[str]:
    gib = 2**30
    trained = meta.get("trained_context")
    lines = [
        f"## Constant-memory stream: {meta['model']} on {meta['device']}", "",
        f"Real text: {meta.get('text', '?')}. {meta['chunk']}-token chunks through the model; each layer's cache "
        f"is compacted online whenever it reaches {meta['budget']} entries per KV head (sinks + recent tokens kept "
        "exact, the rest folded into slots together with the existing slots). Every held entry is attended "
        "exactly; the slots are the only approximation. Loss: mean next-token cross-entropy of each chunk, "
        "teacher-forced on the chunk itself through the compacted cache; \"no memory\": the same targets predicted "
        "from the chunk alone (no cache, positions from 0), the reference a memory should beat.", "",
    ]
    if trained and meta.get("positions", "logical") != "logical":
        lines += [f"RoPE positions: `{meta['positions']}`. Past the model's trained context of {trained} tokens every held "
                  "entry takes its rank in the cache's time order (keys re-rotated when entries leave), so every distance "
                  "the model sees stays within the budget.", ""]
    elif trained:
        lines += [f"**Positions stay logical and run far past the model's trained context of {trained} tokens.** The loss "
                  f"beyond {trained} tokens is measured outside the model's trained position range (RoPE extrapolation: the "
                  "query's distance to the sinks, and to slots and recent tokens, grows with the stream), on top of the "
                  "compaction; it measures the memory mechanism there, not the model's quality. At positions near 10^6, "
                  "fp32 RoPE angles also carry rounding of up to ~0.06 rad in the fastest dimensions.", ""]
    lines += ["| method | tokens | chunks | seconds | tok/s | compactions | s per compaction | largest layer (entries/head) "
              "| cache MiB (steady) | peak GPU GiB per chunk (steady min-max) | loss ≤ trained ctx | loss beyond | loss last 10% "
              "| no memory: all / last 10% |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        s = run["summary"]
        if not s.get("chunks"):
            continue
        cache, peak = s.get("steady_cache_storage_bytes"), s.get("steady_cuda_peak_allocated")
        cache_text = "-" if cache is None else "{:.1f}-{:.1f}".format(cache["min"] / 2**20, cache["max"] / 2**20)
        peak_text = "-" if peak is None else "{:.3f}-{:.3f}".format(peak["min"] / gib, peak["max"] / gib)
        per_compaction = _fmt(s["seconds_per_compaction"], "{:.4f}")
        lines.append(
            f"| {run['method']} | {s['tokens']} | {s['chunks']} | {s['seconds']:.1f} | {s['tokens_per_second']:.0f} | "
            f"{s['compactions']} | {per_compaction} | {s['physical_max']} (budget {run['budget']}) | {cache_text} | {peak_text} | "
            f"{_fmt(s['loss_within_trained_context'])} | {_fmt(s['loss_beyond_trained_context'])} | {_fmt(s['loss_last_10_percent'])} | "
            f"{_fmt(s.get('loss_no_memory'))} / {_fmt(s.get('loss_no_memory_last_10_percent'))} |"
        )
    lines.append("")
    for run in runs:
        s = run["summary"]
        if not s.get("chunks"):
            continue
        c = s.get("compacted_to", {})
        older = "fitted slots" if c.get("fitted", True) else "older entries it chose, as they are,"
        notes = [f"- {run['method']}: after a compaction a layer holds {c.get('sinks')} sinks + {c.get('recent')} recent tokens "
                 f"+ {c.get('slots_per_head')} {older} per KV head; while a chunk is attended it holds up to "
                 f"{c.get('after_compaction', 0) + run['chunk']} entries per head (the chunk included)."]
        if s.get("steady_cuda_peak_allocated"):
            p = s["steady_cuda_peak_allocated"]
            notes.append(f"  Per-chunk peak GPU memory from the first compaction on: first {p['first'] / gib:.3f} GiB, last "
                         f"{p['last'] / gib:.3f} GiB, spread {p['relative_spread']:.1%}.")
        if s.get("steady_cache_storage_bytes"):
            b = s["steady_cache_storage_bytes"]
            notes.append(f"  Cache tensors kept alive (buffers, slots, reference queries) from the first compaction on: "
                         f"{b['min'] / 2**20:.1f}-{b['max'] / 2**20:.1f} MiB (spread {b['relative_spread']:.1%}).")
        if s.get("passkeys"):
            found = ", ".join(f"{r['distance']:,} tokens before the end: {'✓' if r['correct'] else '✗'} ({r['answer'].strip()!r}, key {r['key']})"
                              for r in s["passkeys"])
            notes.append(f"  Pass keys asked at the end: {found}.")
        if s.get("text_cycles"):
            notes.append(f"  The text ran out and was cycled {s['text_cycles']} time(s) ({s['text_tokens_per_cycle']} tokens per cycle).")
        if s.get("stopped"):
            notes.append(f"  Stopped early: {s['stopped']}.")
        lines += notes
    lines += ["", "![stream](stream.png)", ""]
    return lines


def plot_stream(runs: list[dict], meta: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no stream plot (pip install matplotlib)")
        return None
    cuda = any("cuda_peak_allocated" in r for run in runs for r in run["records"])
    fig, (mem, loss) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
    rss_axis = None if cuda else mem.twinx()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, run in enumerate(runs):
        color = colors[index % len(colors)]
        records = run["records"]
        x = [r["tokens"] for r in records]
        label = f"{run['method']} (budget {run['budget']}, chunk {run['chunk']})"
        if cuda:
            mem.plot(x, [r["cuda_peak_allocated"] / 2**30 for r in records], color=color, label=f"{label}: peak allocated in chunk")
            mem.plot(x, [r["cuda_allocated"] / 2**30 for r in records], color=color, linestyle=":",
                     label=f"{label}: allocated after chunk")
        else:
            mem.plot(x, [r["cache_storage_bytes"] / 2**20 for r in records], color=color, label=f"{label}: cache tensors")
            if all(r.get("rss_bytes") for r in records):
                rss_axis.plot(x, [r["rss_bytes"] / 2**20 for r in records], color=color, linestyle=":", label=f"{run['method']}: process RSS")
        losses = [r["loss"] for r in records]
        window = max(1, len(losses) // 50)
        smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
        if window > 1:
            loss.plot(x, losses, color=color, alpha=0.25, linewidth=0.8)
        loss.plot(x, smooth, color=color, label=run["method"] + (f" (mean of {window} chunks)" if window > 1 else ""))
        alone = [r.get("loss_no_memory") for r in records]
        if index == 0 and all(value is not None for value in alone):  # the same text for every method
            alone = [sum(alone[max(0, i - window + 1) : i + 1]) / len(alone[max(0, i - window + 1) : i + 1]) for i in range(len(alone))]
            loss.plot(x, alone, color="black", linestyle=":", label="no memory (chunk alone)")
    mem.set_ylabel("GiB (CUDA allocator)" if cuda else "cache tensors, MiB")
    mem.set_ylim(bottom=0, top=max(mem.get_ylim()[1], 1e-3) * 1.15)
    mem.set_title(f"stream through {meta['model'].split(' ')[0]} ({meta['device']})", fontsize=9)
    mem.legend(fontsize=7, loc="lower right")
    if rss_axis is not None and rss_axis.lines:
        rss_axis.set_ylabel("process RSS, MiB (dotted)")
        rss_axis.set_ylim(bottom=0, top=rss_axis.get_ylim()[1] * 1.15)
    trained = meta.get("trained_context")
    last = max((r["tokens"] for run in runs for r in run["records"]), default=0)
    if trained and last > trained:
        loss.axvline(trained, color="grey", linestyle="--", linewidth=1)
        loss.text(trained, loss.get_ylim()[1], f" trained context {trained}: beyond it positions are out of range",
                  fontsize=7, va="top", color="grey")
    loss.set_xlabel("tokens streamed")
    loss.set_ylabel("chunk next-token loss (nats)")
    loss.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
