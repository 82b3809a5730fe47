"""Query blocks: aligned groups of query positions that share one block selection.

Block-sparse kernels compute attention in tiles of (query block x key block), so a tile can skip a key
block only if every query of the tile skips it. With `query_block_size` set, the queries at logical
positions [i*Q, (i+1)*Q) form query block i; its selection is scored from the mean of its queries (those
present in the forward call) and is offered every block that is a candidate for at least one of them.
"""

import torch


def pool_query_blocks(query: torch.Tensor, first_position: int, query_block_size: int) -> torch.Tensor:
    """Mean query of each query block: `query` [..., Q, D] at positions first_position.. -> [..., nQb, D].

    Pads to whole blocks and reduces with a reshape, so the result is deterministic and identical for
    every caller that pools the same queries.
    """
    *lead, num_queries, dim = query.shape
    front = first_position % query_block_size
    total = front + num_queries
    back = -total % query_block_size
    if front or back:
        query = torch.nn.functional.pad(query, (0, 0, front, back))
    blocks = query.reshape(*lead, (total + back) // query_block_size, query_block_size, dim).sum(-2, dtype=torch.float32)
    counts = torch.full((blocks.shape[-2],), float(query_block_size), device=query.device)
    counts[0] -= front
    counts[-1] -= back
    return blocks / counts[:, None]


def query_block_index(query_positions: torch.Tensor, query_block_size: int) -> torch.Tensor:
    """Index of each query's block, counted from the block of the first query: [Q]."""
    blocks = torch.div(query_positions, query_block_size, rounding_mode="floor")
    return blocks - blocks[0]


def aligned_chunks(first_position: int, num_queries: int, chunk: int, query_block_size: int | None) -> list[tuple[int, int]]:
    """(start, end) ranges of at most max(chunk, query block) queries; with query blocks, every range
    holds whole query blocks so a block's selection is made from all of its queries."""
    if query_block_size is None:
        return [(start, min(start + chunk, num_queries)) for start in range(0, num_queries, chunk)]
    per_chunk = max(1, chunk // query_block_size) * query_block_size
    ranges, start = [], 0
    # the first range ends at a block boundary of logical positions
    end = per_chunk - first_position % query_block_size
    while start < num_queries:
        ranges.append((start, min(end, num_queries)))
        start, end = end, end + per_chunk
    return ranges
