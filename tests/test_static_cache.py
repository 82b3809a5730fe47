"""StaticSparseMemCache: the fixed-shape decode step equals the reference path, and is capturable."""

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import make_base_model
from sparsemem import SparseMemCache, StaticSparseMemCache, convert

SETTINGS = {
    "top-k": dict(block_size=8, top_k_blocks=2, sink_tokens=4, local_tokens=8),
    "fraction": dict(block_size=8, top_k_blocks=1, block_fraction=0.3, sink_tokens=4, local_tokens=8),
    "dense-equivalent": dict(block_size=8, top_k_blocks=None, sink_tokens=4, local_tokens=8),
    "hybrid, no sinks": dict(block_size=8, top_k_blocks=2, sink_tokens=0, local_tokens=16, scorer="hybrid"),
    "learned scorer": dict(block_size=8, top_k_blocks=2, sink_tokens=4, local_tokens=8, scorer="learned"),
    "sub-block scorer": dict(block_size=8, top_k_blocks=1, block_fraction=0.3, sink_tokens=4, local_tokens=8,
                             scorer="subminmax", scorer_sub_block=2),
}


def _model(family="llama", **options):
    return convert(make_base_model(family), **options).float().eval()


def _ids(batch=2, length=40, seed=0):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_static_decode_equals_the_reference_path(family, setting):
    """Prefill 40 tokens, then 30 greedy steps: same logits as SparseMemCache (the reference path on CPU) at
    every step, past several block boundaries and with the selection changing, and the same decode density."""
    model = _model(family, **SETTINGS[setting])
    ids = _ids()
    densities = []
    with torch.no_grad():
        for make_cache in (lambda: SparseMemCache(model.config), lambda: StaticSparseMemCache(model.config, max_cache_len=80)):
            model.reset_sparsemem_stats()
            cache, tokens, logits = make_cache(), ids, []
            for _ in range(31):
                step = model(input_ids=tokens, past_key_values=cache).logits[:, -1:]
                logits.append(step)
                tokens = step.argmax(-1)
            densities.append(model.sparsemem_stats()["decode_density"])
            if isinstance(cache, StaticSparseMemCache):
                static = torch.cat(logits, 1)
            else:
                reference = torch.cat(logits, 1)
    assert cache.get_seq_length() == 70
    torch.testing.assert_close(static, reference, rtol=0, atol=2e-5)
    assert densities[0] == pytest.approx(densities[1], rel=1e-12)
    if setting != "dense-equivalent":
        assert densities[1] < 0.9  # the steps were sparse


def test_generate_with_a_static_cache_matches_the_default_cache():
    model = _model(**SETTINGS["top-k"])
    ids = _ids()
    default = model.generate(ids, max_new_tokens=20, do_sample=False)
    static = model.generate(ids, max_new_tokens=20, do_sample=False, past_key_values=StaticSparseMemCache(model.config, max_cache_len=64))
    assert torch.equal(default, static)
    # transformers' switch for a fixed-shape cache gives the sparsemem one, sized for prompt + new tokens
    out = model.generate(ids, max_new_tokens=20, do_sample=False, cache_implementation="static", return_dict_in_generate=True)
    cache = out.get("cache", out.get("past_key_values"))
    assert torch.equal(default, out.sequences)
    assert isinstance(cache, StaticSparseMemCache) and cache.get_max_length() == 59  # the last token is never cached
    with pytest.raises(ValueError, match="cache_implementation='offloaded_static'"):
        model.generate(ids, max_new_tokens=2, cache_implementation="offloaded_static")


class _Recorder(TorchDispatchMode):
    """Every aten op of a call with its tensor shapes; host reads (`item`, `bool(tensor)`) show up as
    `_local_scalar_dense`."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = tuple(tuple(a.shape) for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor))
        self.ops.append((str(func), shapes))
        return func(*args, **(kwargs or {}))


def test_decode_steps_issue_the_same_ops_on_the_same_shapes_and_read_nothing_back():
    """What a CUDA graph replay needs: steps at lengths 42 and 57 (another block, another selection) run the
    identical op sequence on identical shapes, and no value goes back to the host."""
    model = _model(**SETTINGS["fraction"])
    cache = StaticSparseMemCache(model.config, max_cache_len=80)
    ids = _ids(length=40)
    recorded = []
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
        for step in range(17):
            if step in (1, 16):
                with _Recorder() as recorder:
                    model.model(input_ids=ids[:, step : step + 1], position_ids=cache.layers[0].length.view(1, 1).clone(),
                                past_key_values=cache, use_cache=True)
                recorded.append(recorder.ops)
            else:
                model(input_ids=ids[:, step : step + 1], past_key_values=cache)
    assert cache.get_seq_length() == 57
    assert recorded[0] == recorded[1]
    assert not [op for op, _ in recorded[0] if "_local_scalar_dense" in op]
    assert len(recorded[0]) > 100  # the whole forward was recorded


def test_static_cache_refuses_what_it_does_not_implement():
    model = _model(**SETTINGS["top-k"])
    with pytest.raises(ValueError, match="max_cache_len"):
        StaticSparseMemCache(model.config, max_cache_len=0)
    with pytest.raises(ValueError, match="trained context"):
        StaticSparseMemCache(model.config, max_cache_len=4096)  # the test models are trained on 1024 positions
    with pytest.raises(ValueError, match="block_slots"):
        StaticSparseMemCache(_model(**SETTINGS["top-k"], block_slots=4).config, max_cache_len=64)
    with pytest.raises(ValueError, match="sparsemem model"):
        StaticSparseMemCache(make_base_model("llama").config, max_cache_len=64)
    with pytest.raises(ValueError, match="compile=True .* cuda_graph=True"):
        StaticSparseMemCache(model.config, max_cache_len=64, cuda_graph=False, compile=True)
    cache = StaticSparseMemCache(model.config, max_cache_len=42)
    with torch.no_grad():
        model(input_ids=_ids(length=40), past_key_values=cache)
        model(input_ids=_ids(length=2)[:, :1], past_key_values=cache)
        model(input_ids=_ids(length=2)[:, :1], past_key_values=cache)
        with pytest.raises(ValueError, match="is full"):
            model(input_ids=_ids(length=2)[:, :1], past_key_values=cache)
        padded = torch.ones(2, 40, dtype=torch.long)
        padded[0, :3] = 0
        with pytest.raises(ValueError, match="padded batch"):
            model(input_ids=_ids(length=40), attention_mask=padded, past_key_values=StaticSparseMemCache(model.config, max_cache_len=64))
        windowed = _model("mistral", **SETTINGS["top-k"])
        with pytest.raises(ValueError, match="sliding window"):
            windowed(input_ids=_ids(length=40), past_key_values=StaticSparseMemCache(windowed.config, max_cache_len=64))


GPU_SETTINGS = {
    **{name: SETTINGS[name] for name in ("top-k", "fraction", "dense-equivalent")},
    # power-of-two blocks and head dim: the block-sparse decode kernel, length read on the device
    "kernel": dict(block_size=16, top_k_blocks=2, sink_tokens=16, local_tokens=32),
    "kernel, fraction": dict(block_size=16, top_k_blocks=1, block_fraction=0.25, sink_tokens=0, local_tokens=24),
    # blocks scored by their sub-blocks (torch), chosen and attended by the kernels
    "kernel, sub-blocks": dict(block_size=16, top_k_blocks=1, block_fraction=0.25, sink_tokens=16, local_tokens=32,
                               scorer="subminmax", scorer_sub_block=4),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("setting", GPU_SETTINGS)
def test_captured_decode_steps_equal_eager_steps_on_the_gpu(setting):
    """Replays of the captured step give the eager static steps' logits, which equal SparseMemCache's (the
    kernels' fp32 dots may run in TF32: 2e-3)."""
    model = _model(**GPU_SETTINGS[setting]).cuda()
    ids = _ids(length=141).cuda()  # 100 prefilled, then 41 steps fed from here (the same inputs for every cache)
    outputs = {}
    with torch.no_grad():
        for name, make_cache in {
            "reference": lambda: SparseMemCache(model.config),
            "eager": lambda: StaticSparseMemCache(model.config, max_cache_len=160, cuda_graph=False),
            "graph": lambda: StaticSparseMemCache(model.config, max_cache_len=160),
            "compiled graph": lambda: StaticSparseMemCache(model.config, max_cache_len=160, compile=True),
        }.items():
            cache, tokens, logits = make_cache(), ids[:, :100], []
            for step in range(41):
                logits.append(model(input_ids=tokens, past_key_values=cache).logits[:, -1:])
                tokens = ids[:, 100 + step : 101 + step]
            if name != "reference":
                assert (cache.graph is not None) == (name != "eager")
            outputs[name] = torch.cat(logits, 1)
    torch.testing.assert_close(outputs["graph"], outputs["eager"], rtol=0, atol=1e-5)
    # compiled norms and activations sum in another order
    torch.testing.assert_close(outputs["compiled graph"], outputs["eager"], rtol=0, atol=1e-4)
    torch.testing.assert_close(outputs["eager"], outputs["reference"], rtol=0, atol=2e-3)


@pytest.mark.slow
def test_the_compiled_decode_step_equals_the_eager_one():
    """What `StaticSparseMemCache(compile=True)` captures: the one-token forward through `torch.compile`, with the
    attention step left out of the compiled graphs (it launches its own kernels). On the CPU (no capture), the
    compiled steps give the eager steps' logits."""
    from sparsemem.modeling.decode_graph import compiling

    model = _model(**SETTINGS["fraction"])
    ids = _ids()
    outputs = []
    for compiled in (False, True):
        cache, logits = StaticSparseMemCache(model.config, max_cache_len=64, cuda_graph=False), []
        with torch.no_grad(), compiling(compiled):
            step = functools.partial(model.forward, past_key_values=cache)
            step = torch.compile(step, dynamic=False) if compiled else step
            tokens = model(input_ids=ids, past_key_values=cache).logits[:, -1:].argmax(-1)
            for _ in range(12):
                position = torch.full_like(tokens, cache.get_seq_length())
                logits.append(step(input_ids=tokens, position_ids=position, use_cache=True).logits)
                tokens = logits[-1].argmax(-1)
        outputs.append(torch.cat(logits, 1))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-5)


def test_a_wide_fraction_budget_ranks_by_sorting_with_the_same_result(monkeypatch):
    """Past PAIRWISE_RANKS chosen blocks the budget is cut by a sorted top-k: same logits as pairwise ranks."""
    import sparsemem.modeling.static_decode as static_decode

    model = _model(**SETTINGS["fraction"])
    ids = _ids(length=60)
    outputs = []
    with torch.no_grad():
        for limit in (256, 0):
            monkeypatch.setattr(static_decode, "PAIRWISE_RANKS", limit)
            cache = StaticSparseMemCache(model.config, max_cache_len=80)
            model(input_ids=ids[:, :40], past_key_values=cache)
            outputs.append(torch.cat([model(input_ids=ids[:, i : i + 1], past_key_values=cache).logits for i in range(40, 60)], 1))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-6)
