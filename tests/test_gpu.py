"""The CUDA fast paths against the reference path on the same GPU inputs (bf16 tolerance)."""

from types import SimpleNamespace

import pytest
import torch

import sparsemem
from sparsemem.modeling.attention import AttentionStats, MemoryView, sparsemem_attention_forward
from sparsemem.modeling.slots import SlotTier
from sparsemem.modeling.scorer import PooledKeyScorer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

B, H, HKV, D = 2, 8, 2, 64
OPTIONS = dict(
    block_size=128, query_block_size=128, sink_tokens=16, local_tokens=200, top_k_blocks=2, block_fraction=0.25,
    query_chunk_size=256, scorer="hybrid",
)


def relative_error(out, ref):
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def module(backend):
    config = SimpleNamespace(**OPTIONS, attention_backend=backend)
    return SimpleNamespace(config=config, scorer=PooledKeyScorer("hybrid"), sparsemem_stats=AttentionStats())


def slots_for(total, seed=0, per_head=40):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    position = torch.randint(0, total, (per_head,), device="cuda", generator=gen)
    block = torch.div(position, OPTIONS["block_size"], rounding_mode="floor")
    return SlotTier.from_heads(
        torch.randn(B, HKV, per_head, D, device="cuda", generator=gen, dtype=torch.bfloat16),
        torch.randn(B, HKV, per_head, D, device="cuda", generator=gen, dtype=torch.bfloat16),
        torch.randn(B, HKV, per_head, device="cuda", generator=gen),
        block,
        position,
    )


@pytest.mark.parametrize("total, num_queries", [(2048, 2048), (2500, 700)])
@pytest.mark.parametrize("with_slots", [False, True])
def test_flex_prefill_equals_reference(total, num_queries, with_slots):
    torch.manual_seed(total)
    q = torch.randn(B, H, num_queries, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, HKV, total, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, HKV, total, D, device="cuda", dtype=torch.bfloat16)
    slots = slots_for(total) if with_slots else None
    positions = torch.arange(total, device="cuda")
    view = MemoryView(positions[total - num_queries :], positions, slots, None)
    outs, stats = {}, {}
    for backend in ("flex", "reference"):
        mod = module(backend)
        outs[backend], _ = sparsemem_attention_forward(mod, q, k, v, None, scaling=D**-0.5, sparsemem=view)
        stats[backend] = float(mod.sparsemem_stats.attended["prefill"]) / float(mod.sparsemem_stats.dense["prefill"])
    assert torch.isfinite(outs["flex"]).all()
    assert relative_error(outs["flex"], outs["reference"]) < 1e-2
    assert stats["flex"] == pytest.approx(stats["reference"], rel=1e-9)
    assert stats["flex"] < 0.75  # blocks were really skipped


SCORERS = [{"scorer": "hybrid"}, {"scorer": "subminmax", "scorer_sub_block": 16}]


@pytest.mark.parametrize("scorer", SCORERS, ids=lambda s: s["scorer"])
def test_model_prefill_and_decode_equal_reference(scorer):
    from conftest import make_base_model

    base = make_base_model("llama", max_position_embeddings=4096).to("cuda", torch.bfloat16)
    ids = torch.randint(3, 256, (1, 1500), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    logits = {}
    for backend in ("auto", "reference"):
        model = sparsemem.convert(base, **{**OPTIONS, **scorer}, attention_backend=backend)
        with torch.no_grad():
            cache = sparsemem.SparseMemCache(model.config)
            first = model(ids[:, :1300], past_key_values=cache).logits
            second = model(ids[:, 1300:1499], past_key_values=cache).logits  # a second, unaligned chunk
            step = model(ids[:, 1499:], past_key_values=cache).logits  # one decode step
        logits[backend] = torch.cat([first, second, step], dim=1)
    assert relative_error(logits["auto"], logits["reference"]) < 2e-2


@pytest.mark.parametrize("total", [3000, 4096])
@pytest.mark.parametrize("with_slots", [False, True])
def test_block_decode_equals_reference(total, with_slots):
    from sparsemem.modeling.block_decode import BlockSummaryCache, block_decode_attention

    torch.manual_seed(total)
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, HKV, total, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, HKV, total, D, device="cuda", dtype=torch.bfloat16)
    slots = slots_for(total) if with_slots else None
    positions = torch.arange(total, device="cuda")
    mod = module("reference")
    ref, _ = sparsemem_attention_forward(mod, q, k, v, None, scaling=D**-0.5, sparsemem=MemoryView(positions[-1:], positions, slots))
    options = {**OPTIONS}
    summaries = BlockSummaryCache(OPTIONS["block_size"])
    summaries.update(k[:, :, : total - 300])
    out, attended = block_decode_attention(q, k, v, D**-0.5, mod.scorer, options, summaries, slots)
    gathered, _ = block_decode_attention(q, k, v, D**-0.5, mod.scorer, options, None, slots, use_triton=False)
    assert torch.isfinite(out).all()
    assert relative_error(out, ref) < 1e-2
    assert relative_error(out, gathered) < 1e-2
    assert float(attended) == float(mod.sparsemem_stats.attended["decode"])


@pytest.mark.parametrize("scorer", [{"scorer": "minmax"}, *SCORERS], ids=lambda s: s["scorer"])
def test_offloaded_block_store_decodes_like_the_gpu_cache(scorer):
    """offload_blocks=True: K/V in pinned host memory, read in place by the decode kernel; same tokens."""
    from conftest import make_base_model

    base = make_base_model("llama", max_position_embeddings=4096).to("cuda", torch.bfloat16)
    model = sparsemem.convert(base, **{**OPTIONS, **scorer}, attention_backend="auto")
    ids = torch.randint(3, 256, (2, 1300), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    runs = {}
    for offload in (False, True):
        cache = sparsemem.SparseMemCache(model.config, offload_blocks=offload)
        with torch.no_grad():
            out = model.generate(ids, past_key_values=cache, max_new_tokens=16, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        runs[offload] = (out.sequences, torch.stack(out.logits, 1))
        keys = cache.layers[0].keys
        assert (keys.device.type == "cpu" and keys.is_pinned()) if offload else keys.is_cuda
    assert torch.equal(runs[True][0], runs[False][0])
    assert relative_error(runs[True][1], runs[False][1]) < 1e-3


def test_on_policy_compaction_on_the_gpu_matches_the_cpu():
    """compact(on_policy=True) on a CUDA cache (its queries, positions and subsamples cross devices)."""
    import copy

    from conftest import ByteTokenizer, prefilled

    model, ids, full = prefilled("llama", 260, 240, top_k_blocks=None, block_size=8, sink_tokens=4, local_tokens=16)
    options = dict(queries=("repeat",), tokenizer=ByteTokenizer(), budgets="uniform", max_queries=64, on_policy=True)
    cpu = sparsemem.compact(model, copy.deepcopy(full), ratio=6, input_ids=ids[:, :240], **options)
    model, ids = model.to("cuda"), ids.cuda()
    cache = sparsemem.SparseMemCache(model.config)
    with torch.no_grad():
        model(ids[:, :240], past_key_values=cache)
    gpu = sparsemem.compact(model, cache, ratio=6, input_ids=ids[:, :240], **options)
    for a, b in zip(cpu.layers, gpu.layers):
        # the same entries kept; values are least-squares solutions, equal where the fit determines them,
        # so what must agree is what the model reads from them
        assert torch.equal(b.slots.position.cpu(), a.slots.position) and torch.equal(b.slots.head.cpu(), a.slots.head)
    with torch.no_grad():
        on_gpu = model(ids[:, 240:], past_key_values=gpu).logits.float().cpu()
        on_cpu = model.cpu()(ids[:, 240:].cpu(), past_key_values=cpu).logits.float()
        dense = model(ids.cpu()).logits[:, 240:].float()
    error = float((on_gpu - on_cpu).norm() / on_cpu.norm())
    assert error < 1e-3 < float((on_cpu - dense).norm() / dense.norm())  # agree far closer than compaction's own error
