"""RoPE positions of cached entries: the position policy and moving keys by re-rotation.

RoPE composes: a key rotated at position p and rotated again by delta is the key rotated at p + delta.
So the cache can give the entries it holds new positions without the unrotated keys, with one rotation
by the frequencies of the model's own rotary embedding (scaled RoPE such as llama3, linear or YaRN
included; their `attention_scaling` multiplies cos/sin once, when a key is made, and a shift must only
rotate).

Policies (option `positions`):
- "logical": every token keeps the position it had in the full sequence (exact inside the trained window;
  beyond it RoPE distances run past what the model was trained on).
- "cache": every held entry takes its rank in the cache's time order; new tokens continue right after the
  last held entry, so distances never exceed what the cache holds.
- "auto": logical while the sequence fits the model's trained context, cache positions from then on.
"""

import torch
from transformers.models.llama.modeling_llama import rotate_half

POSITION_POLICIES = ("logical", "cache", "auto")
# RoPE variants whose frequencies depend on the sequence length: a shift by delta is no rotation there
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def check_policy(policy) -> str:
    if policy not in POSITION_POLICIES:
        raise ValueError(f"`positions` must be one of {POSITION_POLICIES}, got {policy!r}")
    return policy


def rope_parameters(config) -> dict:
    """The rope settings of a transformers config (`rope_parameters` in 5.x, `rope_scaling` before)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(params)


def trained_context(config) -> int | None:
    """Positions the model was trained on: the scaling's original length when RoPE is scaled, else
    `max_position_embeddings`."""
    params = rope_parameters(config)
    original = params.get("original_max_position_embeddings")
    if original and params.get("rope_type", "default") not in ("default", None):
        return int(original)
    length = getattr(config, "max_position_embeddings", None)
    return None if length is None else int(length)


def check_rope_shiftable(config) -> None:
    rope_type = rope_parameters(config).get("rope_type", "default")
    if any(kind in str(rope_type) for kind in _LENGTH_DEPENDENT_ROPE):
        raise ValueError(
            f"positions='cache' re-rotates cached keys, which needs a RoPE whose frequencies do not depend on the "
            f"sequence length; rope_type={rope_type!r} does. Use positions='logical'"
        )


def shift_keys(rotary, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Move `keys` [..., n, D] (rotated at some positions) by `delta` positions ([n], or any shape that
    broadcasts against keys' leading dims followed by n), with the frequencies of the model's rotary
    embedding `rotary` (scaled RoPE included). The angles are computed in fp64 and the rotation in fp32, so
    a shift adds no rounding of its own beyond the result's dtype; returned in keys' dtype."""
    inv_freq = rotary.inv_freq.to(device=keys.device, dtype=torch.float64)
    angles = delta.to(device=keys.device, dtype=torch.float64)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().float(), angles.sin().float()
    x = keys.float()
    return (x * cos + rotate_half(x) * sin).to(keys.dtype)
