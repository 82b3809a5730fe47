"""`block_mass`: each query takes blocks best first until the learned scorer's mass estimate reaches the
threshold, so its density follows the input."""

import dataclasses

import pytest
import torch
from conftest import fast_and_reference_on_the_gpu, make_base_model, perturb_learned_modules, whole_and_stepwise_logits
from test_calibration import OPTIONS

import sparsemem
from sparsemem.modeling.selection import select_blocks


def _reference(scores, candidates, mass, top_k, fraction, coverage):
    """Row by row: the shortest best-first prefix of the candidates whose mass reaches `coverage`."""
    selected = torch.zeros_like(candidates)
    for row in range(scores.shape[0]):
        ids = [int(i) for i in candidates[row].nonzero()[:, 0]]
        ids.sort(key=lambda i: -float(scores[row, i]))
        total, count = 0.0, 0
        for i in ids:
            if total >= coverage:
                break
            total, count = total + float(mass[row, i]), count + 1
        count = max(count, top_k)
        if fraction is not None:
            count = min(count, max(top_k, -(-len(ids) * fraction // 1)))
        selected[row, ids[: int(min(count, len(ids)))]] = True
    return selected


@pytest.mark.parametrize("coverage, fraction", [(0.5, None), (0.9, None), (0.9, 0.25), (1.0, None)])
def test_coverage_selection_matches_the_row_by_row_rule(coverage, fraction):
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 20, generator=generator, dtype=torch.float64).float()
    candidates = torch.rand(64, 20, generator=generator) < 0.8
    sharpness = torch.rand(64, 1, generator=generator) * 3  # flat rows to peaked ones
    logits = (scores * sharpness + 0.3 * torch.randn(64, 20, generator=generator)).masked_fill(~candidates, float("-inf"))
    mass = torch.softmax(logits, -1).nan_to_num(0.0)  # peaked rows need few blocks, flat ones many
    got = select_blocks(scores, candidates, 2, fraction, mass, coverage)
    want = _reference(scores, candidates, mass, 2, fraction, coverage)
    assert torch.equal(got, want)
    counts = got.sum(-1)
    assert bool((counts >= torch.clamp(candidates.sum(-1), max=2)).all()) and len(set(counts.tolist())) > 3


def test_block_mass_prefill_equals_decode_and_adapts_density():
    base = make_base_model("llama")
    options = {**OPTIONS, "block_fraction": None, "scorer": "learned", "scorer_dim": 8}
    model = perturb_learned_modules(sparsemem.convert(base, block_mass=0.6, **options))
    ids = torch.randint(3, 256, (1, 112), generator=torch.Generator().manual_seed(5))
    whole, stepwise = whole_and_stepwise_logits(model, ids, 64)
    torch.testing.assert_close(stepwise, whole, rtol=1e-4, atol=1e-4)

    # a threshold no block fails to reach is exactly the fixed top-k; a higher one attends more
    fixed = perturb_learned_modules(sparsemem.convert(base, **options))
    tiny = perturb_learned_modules(sparsemem.convert(base, block_mass=1e-9, **options))
    densities = {}
    with torch.no_grad():
        torch.testing.assert_close(tiny(ids).logits, fixed(ids).logits, rtol=0, atol=0)
        for share in (0.3, 0.6, 0.95):
            adaptive = perturb_learned_modules(sparsemem.convert(base, block_mass=share, **options))
            adaptive.reset_sparsemem_stats()
            adaptive(ids)
            densities[share] = adaptive.sparsemem_stats()["density"]
        fixed.reset_sparsemem_stats()
        fixed(ids)
    assert fixed.sparsemem_stats()["density"] <= densities[0.3] < densities[0.6] < densities[0.95] < 1.0


def test_block_mass_options_are_checked():
    base = make_base_model("llama")
    with pytest.raises(ValueError, match="block_mass.*learned"):
        sparsemem.convert(base, block_mass=0.9, scorer="minmax")
    for bad in (0, 1.5, True, "0.9"):
        with pytest.raises(ValueError, match="block_mass"):
            sparsemem.convert(base, block_mass=bad, scorer="learned")


@pytest.mark.parametrize("with_slots", [False, True])
@pytest.mark.parametrize("device, use_triton", [
    ("cpu", False),
    pytest.param("cuda", False, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
    pytest.param("cuda", True, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
])
def test_block_mass_decode_fast_path_equals_reference(with_slots, device, use_triton):
    """The decode fast path gives each KV head its own count: the index is padded past the cache."""
    from test_block_sparse import B, D, H, HKV, fast_options, module, random_slots

    from sparsemem.modeling.attention import MemoryView, sparsemem_attention_forward
    from sparsemem.modeling.block_decode import block_decode_attention
    from sparsemem.modeling.learned_scorer import LearnedBlockScorer

    torch.manual_seed(3)
    total = 400
    mod = module(top_k_blocks=1, block_fraction=None, block_mass=0.7, scorer="learned")
    mod.scorer = LearnedBlockScorer(HKV, D, dim=8, union=None)
    with torch.no_grad():
        for p in mod.scorer.parameters():
            p.add_(torch.randn_like(p) * 0.5)
        mod.scorer.inverse_temperature.copy_(torch.tensor([0.3, 3.0]))  # one flat head, one peaked
    mod.scorer.to(device)
    k, v = (torch.randn(B, HKV, total, D, device=device) for _ in range(2))
    q = torch.randn(B, H, 1, D, device=device)
    slots = random_slots(total, mod.config.block_size) if with_slots else None
    if slots is not None:
        slots = type(slots)(**{f.name: getattr(slots, f.name).to(device) for f in dataclasses.fields(slots)})
    positions = torch.arange(total, device=device)
    ref, _ = sparsemem_attention_forward(mod, q, k, v, None, scaling=D**-0.5, sparsemem=MemoryView(positions[-1:], positions, slots))
    options = {**fast_options(mod), "block_mass": 0.7}
    out, attended = block_decode_attention(q, k, v, D**-0.5, mod.scorer, options, None, slots, use_triton=use_triton)
    # the kernel's dot products round like TF32
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-3 if use_triton else 2e-5)
    assert float(attended) == float(mod.sparsemem_stats.attended["decode"])
    # the heads really chose different numbers of blocks (else the padding was never exercised)
    from sparsemem.modeling.scorer import summarize_contiguous_blocks
    from sparsemem.modeling.selection import coverage_counts

    nb = -(-total // mod.config.block_size)
    summaries = summarize_contiguous_blocks(k, mod.config.block_size, nb)
    last = (total - 1 - mod.config.local_tokens) // mod.config.block_size
    ids = torch.arange(nb, device=device)
    candidates = ((ids >= 0) & (ids <= last)).view(1, 1, 1, -1)
    scores, mass = mod.scorer.scores_and_mass(q.view(B, HKV, H // HKV, 1, D), summaries, candidates)
    count, _ = coverage_counts(scores.masked_fill(~candidates, float("-inf")), candidates.expand_as(scores), 1, None, mass, 0.7)
    assert len(set(count.flatten().tolist())) > 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_block_mass_fast_paths_equal_reference_on_the_gpu():
    """Block-sparse prefill (per query block) and the decode kernel with `block_mass`, against the reference."""
    base = make_base_model("llama", max_position_embeddings=4096).to("cuda", torch.bfloat16)
    options = dict(block_size=128, query_block_size=128, sink_tokens=16, local_tokens=200, top_k_blocks=1,
                   block_fraction=None, block_mass=0.8, scorer="learned", scorer_dim=8, query_chunk_size=256)
    ids = torch.randint(3, 256, (1, 1500), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    results = fast_and_reference_on_the_gpu(base, options, ids, 1300)
    logits, density = {k: v[0] for k, v in results.items()}, {k: v[1] for k, v in results.items()}
    error = float((logits["auto"] - logits["reference"]).norm() / logits["reference"].norm())
    assert error < 2e-2
    assert density["auto"] == pytest.approx(density["reference"], rel=2e-2) and density["auto"] < 0.9
