"""PNG plots of the evaluation suites (matplotlib, the `plot` extra), written atomically."""

import logging
import math
from pathlib import Path

logger = logging.getLogger(__name__)


def pyplot():
    """matplotlib's pyplot on the file-only backend, or None (with a warning) where the extra is missing."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed: no plot written (pip install 'sparsemem[plot]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig, path: Path) -> Path:
    """Save next to `path` and rename, so a reader never sees half a PNG."""
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_retrieval(reports, path: Path) -> Path | None:
    """Pass-key accuracy per prompt length and perplexity, one series per model."""
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for report in reports:
        lengths = sorted({r.length for r in report.passkey})
        accuracy = [sum(r.correct for r in report.passkey if r.length == n) / sum(r.length == n for r in report.passkey)
                    for n in lengths]
        axes[0].plot(lengths, accuracy, marker="o", label=report.name)
    names = [r.name for r in reports]
    axes[1].bar(names, [math.nan if r.perplexity is None else r.perplexity for r in reports])
    axes[0].set(xlabel="prompt tokens", ylabel="pass-key accuracy", ylim=(-0.05, 1.05))
    axes[1].set(ylabel="perplexity")
    axes[0].legend(fontsize=8)
    return save_figure(plt, fig, path)


def plot_online(results, path: Path) -> Path | None:
    """KL to the unbounded cache and perplexity against the budget, one series per press."""
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    full = next((r for r in results if r.method == "full"), None)
    for method in dict.fromkeys(r.method for r in results if r.method != "full"):
        rows = sorted((r for r in results if r.method == method), key=lambda r: r.max_kv_tokens)
        budgets = [r.max_kv_tokens for r in rows]
        axes[0].plot(budgets, [max(r.kl, 1e-5) for r in rows], marker="o", label=method)
        axes[1].plot(budgets, [r.perplexity for r in rows], marker="o", label=method)
    if full is not None:
        axes[1].axhline(full.perplexity, color="black", linestyle=":", label="full cache")
    axes[0].set(xscale="log", yscale="log", xlabel="max_kv_tokens", ylabel="next-token KL to full cache")
    axes[1].set(xscale="log", xlabel="max_kv_tokens", ylabel="perplexity")
    axes[1].legend(fontsize=8)
    return save_figure(plt, fig, path)


def plot_scorer(rows: list[dict], path: Path) -> Path | None:
    """Held-out gap to dense (nats) and density per context length, one series per scorer."""
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for model in dict.fromkeys(r["model"] for r in rows if r["model"] != "dense"):
        chosen = sorted((r for r in rows if r["model"] == model), key=lambda r: r["length"])
        lengths = [r["length"] for r in chosen]
        axes[0].plot(lengths, [r["nll_gap"] for r in chosen], marker="o", label=model)
        axes[1].plot(lengths, [r["density"] for r in chosen], marker="o", label=model)
    axes[0].set(xscale="log", xlabel="context tokens", ylabel="gap to dense (nats)")
    axes[1].set(xscale="log", xlabel="context tokens", ylabel="attention density")
    axes[0].legend(fontsize=8)
    return save_figure(plt, fig, path)
