"""Per-call settings of sparsemem attention modules, seen only by the thread (or asyncio task) that sets them.

`prefill`, `compact` and query capture need dense attention and a hook on the queries for one forward
pass. Switching the model's attention implementation or setting attributes on its modules would change
what every other thread running the same model computes; a context variable does not.
"""

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Callable

import torch

from .anchors import causal_mask, sliding_window_mask


@dataclass(frozen=True)
class CallSettings:
    modules: frozenset  # ids of the attention modules these settings apply to (one model's)
    attn_implementation: str | None = None  # e.g. "sdpa": dense attention instead of the config's
    query_recorder: Callable | None = None  # called as recorder(layer_idx, post-RoPE queries)


_SETTINGS: contextvars.ContextVar[CallSettings | None] = contextvars.ContextVar("sparsemem_call", default=None)


@torch.compiler.disable  # a context variable is not traceable: a compiled step breaks its graph here
def settings_for(module) -> CallSettings | None:
    settings = _SETTINGS.get()
    return settings if settings is not None and id(module) in settings.modules else None


@contextlib.contextmanager
def call_settings(model, **changes):
    """Within the block and in this thread only, the sparsemem attention modules of `model` use `changes`
    (`attn_implementation`, `query_recorder`) on top of the settings already in force for them."""
    modules = frozenset(id(m) for m in model.modules() if getattr(m, "is_sparsemem_attention", False))
    current = _SETTINGS.get()
    base = {} if current is None or current.modules != modules else {
        "attn_implementation": current.attn_implementation, "query_recorder": current.query_recorder
    }
    token = _SETTINGS.set(CallSettings(modules, **{**base, **changes}))
    try:
        yield
    finally:
        _SETTINGS.reset(token)


def dense_mask(attention_mask, query_positions, key_positions, sliding_window) -> torch.Tensor | None:
    """The [B, 1, Q, N] boolean mask a dense implementation needs where the model built sparsemem's [B, T]
    padding mask (or none): causal over logical positions, padding, sliding window. None where plain
    causal attention from position 0 is exact (SDPA then uses its causal kernel)."""
    whole = key_positions.shape[0] == query_positions.shape[0]
    window_cuts = sliding_window is not None and key_positions.shape[0] > sliding_window
    if attention_mask is None and whole and not window_cuts:
        return None
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask  # the caller's own mask
    visible = causal_mask(query_positions, key_positions)
    window = sliding_window_mask(query_positions, key_positions, sliding_window)
    if window is not None:
        visible = visible & window
    visible = visible[None, None]
    if attention_mask is not None:
        visible = visible & attention_mask.bool()[:, key_positions][:, None, None, :]
    # a query of padding sees no key: let it see itself, so its (unused) output stays finite
    return visible | (key_positions[None, :] == query_positions[:, None])[None, None]
