"""Checks of the command line's values that need no model: run before anything is loaded or written, so a
typo fails at once with the option named, not after the model work (and without a half-started report)."""

import argparse
import math

from .modeling.configuration_sparsemem import SparseMemOptions


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _at_least(args, name: str, minimum: float, kind=int) -> None:
    values = getattr(args, name, None)
    if values is None:
        return
    for value in values if isinstance(values, list) else [values]:
        if not isinstance(value, kind) or value < minimum:
            raise ValueError(f"{_flag(name)} must be {'an integer' if kind is int else 'a number'} >= {minimum}, got {value!r}")


def _fractions(args, name: str) -> None:
    values = getattr(args, name, None)
    for value in (values if isinstance(values, list) else [values]) if values is not None else []:
        if not 0 <= value <= 1:
            raise ValueError(f"{_flag(name)} must be a relative depth in [0, 1], got {value!r}")


def _sparsemem_options(args) -> None:
    given = {name: getattr(args, name) for name in SparseMemOptions.__dataclass_fields__ if hasattr(args, name)}
    probe = SparseMemOptions(**given)
    probe.num_attention_heads = probe.num_key_value_heads = None  # the model's; checked when it loads
    try:
        probe.validate_sparsemem_options()
    except ValueError as error:
        message = str(error)
        for name in given:  # name the option as it is spelled on the command line
            message = message.replace(f"`{name}`", _flag(name))
        raise ValueError(message) from None


def check_arguments(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first command-line option whose value cannot work."""
    _sparsemem_options(args)
    for name in ("length", "context_tokens", "continuation_tokens", "documents", "decode_tokens", "max_windows", "samples"):
        _at_least(args, name, 1)
    _at_least(args, "ppl_length", 0)
    _at_least(args, "budgets", 1)
    _at_least(args, "lengths", 1)
    for ratio in getattr(args, "ratios", None) or []:
        if not (math.isfinite(ratio) and ratio >= 1):
            raise ValueError(f"--ratios must be finite numbers >= 1, got {ratio!r}")
    for name in ("depth", "depths", "needle_depths"):
        _fractions(args, name)
    if hasattr(args, "head_budgets"):
        head_budgets(args)
    for share in getattr(args, "block_masses", None) or []:
        if share is None or not 0 < share <= 1:
            raise ValueError(f"--block-mass must be a share in (0, 1], got {share!r}")
    if getattr(args, "command", None) == "eval":
        _eval_choices(args)
    _memory_values(args)


def head_budgets(args):
    """The head-budget policy --head-budgets names, with --whole-span-share where given ('auto', the default,
    leaves the policy its own "auto"), made by the library's one resolver (`head_budgets.budget_policy`)."""
    from .head_budgets import budget_policy

    options = {} if args.whole_span_share == "auto" else {"whole_span_share": args.whole_span_share}
    try:
        return budget_policy(args.head_budgets, **options)
    except ValueError as error:
        message = str(error).replace("`whole_span_share`", "--whole-span-share")
        raise ValueError(f"--head-budgets {args.head_budgets}: {message}") from None


def _memory_values(args) -> None:
    for name in ("tokens", "top_k", "chunk_tokens", "batch_tokens", "piece_tokens", "max_new_tokens", "refresh_every"):
        _at_least(args, name, 1)
    for name in ("needles", "code_questions"):
        _at_least(args, name, 0)
    ratio = getattr(args, "ratio", None)
    if ratio is not None and not (ratio == 0 and getattr(args, "suite", None) == "memory") and not (math.isfinite(ratio) and ratio > 1):
        raise ValueError(f"--ratio must be a finite number > 1{' (or 0: no compacted bank)' if getattr(args, 'suite', None) == 'memory' else ''}, got {ratio!r}")


def _eval_choices(args) -> None:
    from .query_sources import QUERY_SOURCES
    from .modeling.presses import PRESSES

    known = sorted(PRESSES)
    for method in getattr(args, "methods", None) or []:
        if method not in known:
            raise ValueError(f"--methods: unknown compaction method {method!r}; choose from {known}")
    for source in getattr(args, "queries", None) or []:
        if source not in QUERY_SOURCES:
            raise ValueError(f"--queries: unknown query source {source!r}; choose from {list(QUERY_SOURCES)}")
