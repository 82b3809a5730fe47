"""The registry of compaction presses: every method name `compact`, online compaction and the CLI accept.

The press contract and the per-layer step live in compaction.py; each press or family of presses in its own
module. This registry imports them all, so none of them needs to know the others.
"""

from .compaction import Press
from .attention_matching_press import AttentionMatchingPress
from .baseline_presses import H2OPress, KVzipPress, RandomPress, SnapKVPress, StreamingLLMPress
from .consolidation import LearnedConsolidationPress

PRESSES = {
    "am": AttentionMatchingPress,
    "am-omp": lambda: AttentionMatchingPress(key_selection="omp"),
    "am-peak": lambda: AttentionMatchingPress(key_selection="peak"),
    "am-no-beta": lambda: AttentionMatchingPress(fit_bias=False),
    "am-no-refit": lambda: AttentionMatchingPress(refit_values=False),
    "am-recent": lambda: AttentionMatchingPress(key_selection="recent"),
    "am-learned": LearnedConsolidationPress,
    "streaming-llm": StreamingLLMPress,
    "h2o": H2OPress,
    "snapkv": SnapKVPress,
    "kvzip": KVzipPress,
    "random": RandomPress,
}


def make_press(method) -> Press:
    """The press a method name stands for (a press instance passes through)."""
    if isinstance(method, Press):
        return method
    if method not in PRESSES:
        raise ValueError(f"unknown compaction method {method!r}; choose one of {sorted(PRESSES)}")
    return PRESSES[method]()
