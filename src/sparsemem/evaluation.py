"""Side-by-side evaluation of dense and sparsemem attention: long-text perplexity and pass-key retrieval."""

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .atomic import write_text
from .corpus import Corpus, passkey_case, token_window
from .plots import plot_retrieval

logger = logging.getLogger(__name__)


@dataclass
class PasskeyResult:
    length: int
    depth: float
    passkey: str
    answer: str
    correct: bool
    density: float | None = None


@dataclass
class ModelReport:
    name: str
    perplexity: float | None = None
    perplexity_tokens: int = 0
    perplexity_density: float | None = None
    passkey: list[PasskeyResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passkey_accuracy(self) -> float | None:
        return sum(r.correct for r in self.passkey) / len(self.passkey) if self.passkey else None


def _density(model) -> float | None:
    stats = getattr(model, "sparsemem_stats", None)
    return stats()["density"] if stats else None


def _reset(model) -> None:
    if hasattr(model, "reset_sparsemem_stats"):
        model.reset_sparsemem_stats()


@torch.no_grad()
def perplexity(model, input_ids: list[int]) -> float:
    ids = torch.tensor([input_ids], device=model.device)
    out = model(ids, use_cache=False)
    logits = out.logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="mean")
    if not torch.isfinite(nll):
        raise FloatingPointError("non-finite loss in perplexity evaluation")
    return math.exp(nll.item())


@torch.no_grad()
def answer_passkey(model, tokenizer, case, max_new_tokens: int = 8) -> str:
    ids = torch.tensor([case.input_ids], device=model.device)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def evaluate_model(name, model, tokenizer, corpus: Corpus, lengths, depths, ppl_length: int | None) -> ModelReport:
    report = ModelReport(name)
    start = time.perf_counter()
    if ppl_length:
        _reset(model)
        ids = token_window(tokenizer, corpus, ppl_length, offset=0)
        report.perplexity = perplexity(model, ids)
        report.perplexity_tokens = ppl_length
        report.perplexity_density = _density(model)
    cases = [passkey_case(tokenizer, corpus, length, depth) for length in lengths for depth in depths]
    for case in tqdm(cases, desc=f"pass key ({name})", leave=False):
        _reset(model)
        answer = answer_passkey(model, tokenizer, case)
        report.passkey.append(
            PasskeyResult(case.length, case.depth, case.passkey, answer, case.passkey in answer, _density(model))
        )
    report.seconds = time.perf_counter() - start
    return report


def write_reports(reports: list[ModelReport], meta: dict, output_dir: Path) -> tuple[Path, Path]:
    """Write `eval.json`, `eval.md` and `eval.png` (with the `plot` extra) atomically into `output_dir`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "meta": meta,
        "models": [{**asdict(r), "passkey_accuracy": r.passkey_accuracy} for r in reports],
    }
    json_path, md_path = output_dir / "eval.json", output_dir / "eval.md"
    write_text(json_path, json.dumps(payload, indent=2))
    write_text(md_path, render_markdown(reports, meta))
    plot_retrieval(reports, output_dir / "eval.png")
    return json_path, md_path


def render_markdown(reports: list[ModelReport], meta: dict) -> str:
    lines = [f"# sparsemem eval: {meta.get('model')}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k != "model"]
    lines += ["", "| model | perplexity | ppl density | pass-key accuracy | seconds |", "|---|---|---|---|---|"]
    for r in reports:
        ppl = f"{r.perplexity:.3f}" if r.perplexity else "-"
        density = f"{r.perplexity_density:.1%}" if r.perplexity_density else "dense"
        acc = f"{r.passkey_accuracy:.0%}" if r.passkey_accuracy is not None else "-"
        lines.append(f"| {r.name} | {ppl} ({r.perplexity_tokens} tok) | {density} | {acc} | {r.seconds:.0f} |")
    if reports and reports[0].passkey:
        cases = sorted({(p.length, p.depth) for p in reports[0].passkey})
        lines += ["", "Pass key per case (✓ correct / ✗ wrong, density in brackets for sparse):", ""]
        lines.append("| length | depth | " + " | ".join(r.name for r in reports) + " |")
        lines.append("|---|---|" + "---|" * len(reports))
        for length, depth in cases:
            cells = []
            for r in reports:
                hit = next(p for p in r.passkey if (p.length, p.depth) == (length, depth))
                mark = "✓" if hit.correct else f"✗ `{hit.answer.strip()[:16]}`"
                cells.append(mark + (f" ({hit.density:.1%})" if hit.density else ""))
            lines.append(f"| {length} | {depth:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
