"""The Triton decode kernels against the gather path, run by Triton's interpreter on CPU tensors.

Runs wherever triton is installed (CUDA builds of torch ship it), GPU or not; skipped elsewhere. The interpreter
is chosen when triton is imported, so the comparison runs in a fresh process.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest



def _old_interpreter_with_new_numpy() -> bool:
    """Triton's interpreter before 3.8 turns one-element arrays into loop bounds with int(), which numpy 2.4
    refuses (the kernels themselves are unaffected)."""
    from importlib.metadata import version

    def release(name):
        return tuple(int(part) for part in version(name).split(".")[:2])

    return release("triton") < (3, 8) and release("numpy") >= (2, 4)


pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is not None and _old_interpreter_with_new_numpy(),
                       reason="Triton < 3.8's interpreter cannot run these kernels with numpy >= 2.4"),
]

SCRIPT = textwrap.dedent(
    """
    import math

    import torch
    from sparsemem.modeling import block_decode
    from sparsemem.modeling.block_decode import BlockSummaryCache, block_decode_attention
    from sparsemem.modeling.scorer import PooledKeyScorer
    from sparsemem.modeling.static_cache import StaticSparseMemLayer
    from sparsemem.modeling.static_decode import selection_width, static_decode_attention

    torch.manual_seed(0)
    B, H, HKV, D, BS = 2, 8, 2, 16, 16
    scorer = PooledKeyScorer("minmax")
    settings = [
        dict(block_size=BS, sink_tokens=16, local_tokens=32, top_k_blocks=2, block_fraction=None),
        dict(block_size=BS, sink_tokens=0, local_tokens=20, top_k_blocks=1, block_fraction=0.3),
        dict(block_size=BS, sink_tokens=5, local_tokens=40, top_k_blocks=3, block_fraction=None),
        # blocks narrower than a tensor-core tile (SmolLM2's default 8): products summed without tl.dot
        dict(block_size=8, sink_tokens=16, local_tokens=64, top_k_blocks=4, block_fraction=0.2),
    ]
    for options in settings:
        BS = options["block_size"]
        # eager decode: the kernel (use_triton=True) against gathered keys, at lengths inside and past blocks
        for total in (20, 100, 173):
            q, k, v = torch.randn(B, H, 1, D), torch.randn(B, HKV, total, D), torch.randn(B, HKV, total, D)
            runs = [block_decode_attention(q, k, v, D**-0.5, scorer, options, BlockSummaryCache(BS), use_triton=use)
                    for use in (False, True)]
            assert (runs[0][0] - runs[1][0]).abs().max() < 1e-5 and int(runs[0][1]) == int(runs[1][1])
        # static decode: two layers fed the same tokens, one refreshed and attended by the kernels (length on the
        # device), one by torch ops
        k, v = torch.randn(B, HKV, 150, D), torch.randn(B, HKV, 150, D)
        layers = [StaticSparseMemLayer(300, BS) for _ in range(2)]
        for layer in layers:
            layer.update(k, v)
        width = selection_width(300, options)
        for step in range(30):
            new_k, new_v = torch.randn(B, HKV, 1, D), torch.randn(B, HKV, 1, D)
            layers[0].update(new_k, new_v)
            kernel = layers[1]
            kernel.keys.index_copy_(2, kernel.length, new_k)
            kernel.values.index_copy_(2, kernel.length, new_v)
            kernel.length.add_(1)
            kernel.seen += 1
            block_decode._tail_summary(kernel.keys, kernel.key_min, kernel.key_max, kernel.key_sum, BS, length=kernel.length)
            for a, b in ((layers[0].key_min, kernel.key_min), (layers[0].key_max, kernel.key_max), (layers[0].key_sum, kernel.key_sum)):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # blocks not yet written: +-inf in both
            q = torch.randn(B, H, 1, D)
            out_torch, n_torch = static_decode_attention(q, layers[0], D**-0.5, scorer, options, width, use_triton=False)
            out_kernel, n_kernel = static_decode_attention(q, kernel, D**-0.5, scorer, options, width, use_triton=True)
            assert (out_torch - out_kernel).abs().max() < 1e-5, (out_torch - out_kernel).abs().max()
            assert int(n_torch) == int(n_kernel)
    # every launch shape (tiles read per step, steps per program) gives the default launch's result, which the
    # gather path checked above; uneven splits and tiles past the last one are masked
    from sparsemem.modeling.block_decode import DecodeLaunch, selected_tiles_attention
    for BS in (8, 16, 32):
        total = 211
        q, k, v = torch.randn(B, HKV, H // HKV, D), torch.randn(B, HKV, total, D), torch.randn(B, HKV, total, D)
        picks = torch.randperm((total - 16 - 24) // BS)[:7] + 16 // BS
        index = picks.expand(B, HKV, len(picks)).contiguous()
        runs = [selected_tiles_attention(q, k, v, index, 16, 24, D**-0.5, BS, torch.float32, launch=DecodeLaunch(keys, steps))
                for keys, steps in ((128, 8), (16, 1), (64, 3), (32, 2))]
        for out, lse, count in runs[1:]:
            assert (out - runs[0][0]).abs().max() < 1e-5 and (lse - runs[0][1]).abs().max() < 1e-5
            assert int(count) == int(runs[0][2])
    # block selection in one launch: the same blocks as the top-k and budget of the torch path (best first), for top-k and
    # fraction budgets, few candidates (-inf elsewhere), and ties (which blocks win a tie may differ, not how many)
    from sparsemem.modeling.block_decode import _select_blocks_triton
    from sparsemem.modeling.static_decode import _chosen_blocks
    for top_k, fraction, width in ((3, None, 3), (2, 0.3, 12), (1, 0.125, 30)):
        for finite in (0, 2, 17, 37):
            scores = torch.randn(2, 3, 37)
            scores[..., finite:] = float("-inf")
            for tie in (False, True):
                if tie:
                    scores = torch.where(scores > float("-inf"), scores.mul(2).round(), scores)
                options = dict(top_k_blocks=top_k, block_fraction=fraction)
                index, chosen = _chosen_blocks(scores, options, width)
                kernel = _select_blocks_triton(scores, width, top_k, fraction)
                rows = zip(index.flatten(0, 1), chosen.flatten(0, 1), kernel.flatten(0, 1), scores.flatten(0, 1))
                for row_torch, keep, row_kernel, row_scores in rows:
                    picked = row_kernel[row_kernel < 37]
                    assert (row_kernel[len(picked):] == 37).all() and bool((row_scores[picked].diff() <= 0).all())  # best first
                    expected = row_torch[keep]
                    if tie:  # the torch path's pairwise ranks take every block tied at the cut; the kernel the budget
                        count = int((row_scores > float("-inf")).sum())
                        budget = top_k if fraction is None else max(top_k, math.ceil(count * fraction))
                        assert len(picked) == min(budget, width, count) <= len(expected)
                        left = torch.ones(37, dtype=torch.bool)
                        left[picked] = False
                        if len(picked) and bool(left.any()):  # nothing left out scores above what was taken
                            assert row_scores[left].max() <= row_scores[picked].min()
                    else:
                        assert set(picked.tolist()) == set(expected.tolist()), (picked, expected)
    print("kernels agree")
    """
)


def test_decode_kernels_equal_the_gather_path_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kernels agree" in result.stdout
