"""Visibility and anchor masks over logical token positions.

Small pure functions in the spirit of FlexAttention's `mask_mod`: each takes query positions [Q] and
key positions [N] (logical indices in the original sequence, which stay valid after the physical cache
shrinks) and returns a boolean [Q, N] mask; they compose with `&` and `|`.
"""

import torch


def causal_mask(query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    return key_positions[None, :] <= query_positions[:, None]


def sliding_window_mask(
    query_positions: torch.Tensor, key_positions: torch.Tensor, sliding_window: int | None
) -> torch.Tensor | None:
    """Keys inside the window of `sliding_window` tokens ending at the query (transformers' convention)."""
    if sliding_window is None:
        return None
    return key_positions[None, :] > query_positions[:, None] - sliding_window


def sink_mask(key_positions: torch.Tensor, sink_tokens: int) -> torch.Tensor:
    return key_positions < sink_tokens


def local_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, local_tokens: int) -> torch.Tensor:
    """The `local_tokens` newest positions up to and including the query itself."""
    return key_positions[None, :] > query_positions[:, None] - local_tokens


def anchor_mask(
    query_positions: torch.Tensor, key_positions: torch.Tensor, sink_tokens: int, local_tokens: int
) -> torch.Tensor:
    """Keys that are always attended at full resolution: attention sinks and the recent window."""
    return sink_mask(key_positions, sink_tokens)[None, :] | local_mask(query_positions, key_positions, local_tokens)


def blocks_touching_anchors(
    query_positions: torch.Tensor,
    num_blocks: int,
    block_size: int,
    sink_tokens: int,
    local_tokens: int,
    block_first: torch.Tensor | None = None,
) -> torch.Tensor:
    """[Q, num_blocks]: blocks with at least one position that is an anchor of the query.

    Computed from block boundaries alone, so it also holds for blocks whose tokens were evicted.
    Slots standing for such a block are never counted for that query: part of the block is already
    attended exactly as anchors, and counting its slots too would count those tokens twice.
    `block_first` [num_blocks]: first logical position of each block when the blocks are numbered
    other than from position 0 (default: block i starts at i * block_size).
    """
    if block_first is None:
        first = torch.arange(num_blocks, device=query_positions.device) * block_size
    else:
        first = block_first.to(query_positions.device)
    last = first + block_size - 1
    touches_sink = (first < sink_tokens)[None, :]
    touches_local = last[None, :] > query_positions[:, None] - local_tokens
    return touches_sink | touches_local
