"""Online compaction: generation under a physical KV budget."""

import math

import pytest
import torch

import sparsemem
from sparsemem.modeling.online_compaction import OnlineCompaction

from conftest import make_base_model


def _decode(model, ids, cache, steps):
    """Greedy decode step by step; returns the tokens and each layer's physical size after every forward."""
    sizes, tokens = [], []
    with torch.no_grad():
        logits = model(ids, past_key_values=cache).logits[:, -1]
        sizes.append([OnlineCompaction.physical_size(layer) for layer in cache.layers])
        for _ in range(steps):
            token = logits.argmax(-1, keepdim=True)
            tokens.append(token)
            logits = model(token, past_key_values=cache).logits[:, -1]
            sizes.append([OnlineCompaction.physical_size(layer) for layer in cache.layers])
    return torch.cat(tokens, dim=1), torch.tensor(sizes)


def test_budget_is_never_exceeded(family):
    model = sparsemem.convert(make_base_model(family), top_k_blocks=None)
    ids = torch.randint(3, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    online = OnlineCompaction(40, keep_first=4)
    cache = sparsemem.SparseMemCache(model.config, online=online)
    tokens, sizes = _decode(model, ids, cache, steps=50)
    assert int(sizes.max()) <= 40
    assert cache.get_seq_length() == 30 + 50  # positions stay logical
    for layer in cache.layers:
        per_head = torch.bincount(layer.slots.head, minlength=layer.keys.shape[1])
        # existing slots are folded into each new compaction, so their number stays at the budget's share
        assert int(per_head.max()) <= online.slots_per_head
        assert bool(torch.isfinite(layer.slots.beta).all())
    assert tokens.shape == (1, 50)


def test_budget_holds_when_the_exact_newest_share_reaches_folded_slots():
    """At this budget AM's exact newest share of the slots (66) is larger than the tokens decoded between
    compactions (64), so it reaches into the slots folded in from the previous compaction, which all
    share one position: it must still keep exactly its share, not every tie."""
    model = sparsemem.convert(make_base_model("llama", max_position_embeddings=4096), top_k_blocks=None)
    ids = torch.randint(3, 256, (1, 300), generator=torch.Generator().manual_seed(3))
    online = OnlineCompaction(256, keep_first=16, method="am")
    cache = sparsemem.SparseMemCache(model.config, online=online)
    _, sizes = _decode(model, ids, cache, steps=140)
    assert int(sizes.max()) <= 256
    # the prefill's compaction, then one every 64 decoded tokens (256 - 192), per layer
    assert online.compactions == 3 * len(cache.layers)
    for layer in cache.layers:
        assert int(torch.bincount(layer.slots.head).max()) == online.slots_per_head


def test_budget_above_length_changes_nothing():
    model = sparsemem.convert(make_base_model("llama"), top_k_blocks=None)
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=40, min_new_tokens=40, do_sample=False)
    full = model.generate(ids, **kwargs)
    budgeted = model.generate(ids, max_kv_tokens=256, **kwargs)
    assert torch.equal(full, budgeted)


def test_generate_with_budget_matches_explicit_cache():
    model = sparsemem.convert(make_base_model("qwen3"), top_k_blocks=None)
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=60, min_new_tokens=60, do_sample=False)
    through_generate = model.generate(ids, max_kv_tokens=32, **kwargs)
    cache = sparsemem.SparseMemCache(model.config, max_kv_tokens=32)
    explicit = model.generate(ids, past_key_values=cache, **kwargs)
    assert torch.equal(through_generate, explicit)
    assert max(OnlineCompaction.physical_size(layer) for layer in cache.layers) <= 32
    assert all(layer.slots is not None for layer in cache.layers)


def test_online_am_preserves_attention_better_than_eviction():
    """On the layer itself: after a compaction, the attention output of the next queries over the
    compacted layer is closer to the full layer's with Attention Matching than with StreamingLLM."""
    from sparsemem.cache_compaction import _layer_output

    model = sparsemem.convert(make_base_model("llama"), top_k_blocks=None)
    ids = torch.randint(3, 256, (1, 120), generator=torch.Generator().manual_seed(3))
    errors = {}
    for method in ("am", "streaming-llm"):
        full = sparsemem.SparseMemCache(model.config)
        with torch.no_grad():
            model(ids[:, :100], past_key_values=full)
        layer = full.layers[1]
        online = OnlineCompaction(64, keep_first=4, method=method)
        online.observe(layer, _queries(model, ids[:, :100], 1), torch.arange(100))
        probe = _queries(model, ids, 1)[..., 100:, :]
        reference = _layer_output(layer, probe, model.model.layers[1].self_attn.scaling, model.config, 100)
        import copy

        trial = copy.deepcopy(layer)
        assert online.maybe_compact(trial, model.model.layers[1].self_attn.scaling)
        output = _layer_output(trial, probe, model.model.layers[1].self_attn.scaling, model.config, 100)
        errors[method] = (output - reference).pow(2).mean().item()
    assert errors["am"] < errors["streaming-llm"]


def _queries(model, ids, layer_idx):
    from sparsemem.query_sources import recording_queries

    with torch.no_grad(), recording_queries(model) as captured:
        model(ids, use_cache=False)
    return torch.cat(captured[layer_idx], dim=-2)


def test_invalid_budgets_are_refused():
    with pytest.raises(ValueError, match="max_kv_tokens"):
        OnlineCompaction(0)
    with pytest.raises(ValueError, match="max_kv_tokens"):
        OnlineCompaction(8, target=0.2)
    with pytest.raises(ValueError, match="target"):
        OnlineCompaction(64, target=1.5)
    with pytest.raises(ValueError, match="compaction method"):
        OnlineCompaction(64, method="nope")
    model = sparsemem.convert(make_base_model("llama"))
    ids = torch.randint(3, 256, (1, 8))
    with pytest.raises(ValueError, match="max_kv_tokens"):
        model.generate(ids, max_kv_tokens=32, past_key_values=sparsemem.SparseMemCache(model.config), max_new_tokens=2)


def test_stream_through_the_one_call_dense_path_equals_the_reference_path():
    """A stream under online compaction (entries evicted, slots with beta, cache positions past the window)
    gives the same logits through held_dense.py's single SDPA call (attention_backend="auto") as through
    the reference path."""
    ids = torch.randint(3, 256, (1, 160), generator=torch.Generator().manual_seed(5))

    def stream(backend):
        model = sparsemem.convert(make_base_model("llama", max_position_embeddings=64), top_k_blocks=None,
                                  attention_backend=backend)
        cache = sparsemem.SparseMemCache(model.config, online=OnlineCompaction(48, keep_first=4))
        with torch.no_grad():
            logits = torch.cat([model(ids[:, s : s + 16], past_key_values=cache).logits for s in range(0, 160, 16)], dim=1)
        return logits, model.sparsemem_stats(), cache

    reference, reference_stats, _ = stream("reference")
    fast, fast_stats, cache = stream("auto")
    assert cache.cache_positions and all(layer.slots is not None for layer in cache.layers)
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-4)
    assert fast_stats["prefill_density"] == pytest.approx(reference_stats["prefill_density"], rel=1e-6)


@pytest.mark.parametrize("method", ["am", "streaming-llm"])
@pytest.mark.parametrize("positions", ["logical", "cache"])
def test_layers_with_one_layout_compact_in_one_batch_as_head_by_head(monkeypatch, method, positions):
    """A stream's layers reach the budget together with the same layout: they are compacted as one batch
    built directly from the stacked layers. It must give the slots, positions and logits of the general
    head-by-head grouping."""
    from sparsemem.modeling import compaction

    model = sparsemem.convert(make_base_model("llama", max_position_embeddings=4096), top_k_blocks=None, positions=positions)
    ids = torch.randint(3, 256, (1, 400), generator=torch.Generator().manual_seed(5))
    calls = []
    uniform = compaction._compact_uniform

    def counted(*args):
        done = uniform(*args)
        calls.append(done)
        return done

    def run(batched: bool):
        monkeypatch.setattr(compaction, "_compact_uniform", counted if batched else (lambda *args: False))
        online = OnlineCompaction(96, keep_first=4, method=method)
        cache = sparsemem.SparseMemCache(model.config, online=online)
        logits = []
        with torch.no_grad():
            for start in range(0, 400, 50):
                logits.append(model(ids[:, start : start + 50], past_key_values=cache).logits)
        return torch.cat(logits, 1), cache, online.compactions

    expected, reference_cache, reference_count = run(batched=False)
    got, cache, count = run(batched=True)
    assert calls and all(calls)  # every compaction took the batched path
    assert count == reference_count > 0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    for layer, reference in zip(cache.layers, reference_cache.layers):
        assert torch.equal(layer.positions, reference.positions)
        assert torch.equal(layer.slots.head, reference.slots.head) and torch.equal(layer.slots.position, reference.slots.position)
        torch.testing.assert_close(layer.slots.beta, reference.slots.beta, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.slots.values, reference.slots.values, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.slots.keys, reference.slots.keys, atol=1e-5, rtol=1e-5)


def test_guarded_attention_matching_keeps_the_better_of_its_fit_and_the_newest_entries_on_held_out_queries():
    """`guard_every`: every n-th reference query is held out of the fit; per problem the press returns its
    fitted slots or the span's newest entries as they are (StreamingLLM), whichever reproduces the held-out
    queries' attention better."""
    from sparsemem.modeling.attention_matching import SpanProblem
    from sparsemem.modeling.compaction import HeadSpan
    from sparsemem.modeling.attention_matching_press import AttentionMatchingPress
    from sparsemem.modeling.baseline_presses import StreamingLLMPress

    generator = torch.Generator().manual_seed(7)
    problems, total, n, dim = 6, 80, 9, 16  # 6 queries fit 8 slots: the fit can overfit them
    keys = torch.randn(problems, total, dim, generator=generator)
    values = torch.randn(problems, total, dim, generator=generator)
    # half the problems: queries that look at the newest keys (the newest entries serve them), half: queries
    # spread over the whole span (the fit serves them)
    queries = torch.randn(problems, n, dim, generator=generator)
    queries[: problems // 2] += 4.0 * keys[: problems // 2, -8:].mean(1, keepdim=True)
    logits = queries @ keys.transpose(-1, -2) * 0.25
    problem = SpanProblem(queries, keys, values, torch.zeros(problems, total), torch.logsumexp(logits, -1) + 1.0, 0.25)
    span = HeadSpan(problem, torch.arange(total), torch.full((n,), -1))
    guarded = AttentionMatchingPress(exact_newest=0.0, guard_every=3)
    got = guarded.compact(span, 8)
    held_out = torch.arange(n) % 3 == 0
    fitted = AttentionMatchingPress(exact_newest=0.0).compact(span.with_queries(~held_out), 8)
    newest = StreamingLLMPress().compact(span, 8)
    check = span.with_queries(held_out)
    fit_better = check.slot_error(*fitted) <= check.slot_error(*newest)
    assert 0 < int(fit_better.sum()) < problems  # both choices happen here
    for number in range(problems):
        want = fitted if fit_better[number] else newest
        for a, b in zip(got, want):
            torch.testing.assert_close(a[number], b[number].to(a.dtype))
    assert guarded.last_kept_fit == pytest.approx(float(fit_better.float().mean()))
    with pytest.raises(ValueError, match="guard_every"):
        AttentionMatchingPress(guard_every=1)


def test_online_guard_applies_to_fitting_presses_only():
    assert OnlineCompaction(64, method="am").press.guard_every == 4
    assert OnlineCompaction(64, method="am", guard_every=None).press.guard_every is None
    assert OnlineCompaction(64, method="am-learned", guard_every=8).press.guard_every == 8
    assert OnlineCompaction(64, method="streaming-llm").guard_every is None
    with pytest.raises(ValueError, match="guard_every.*fits none"):
        OnlineCompaction(64, method="streaming-llm", guard_every=4)


def test_learned_consolidation_streams_under_inference_mode_past_the_window():
    """am-learned trains its slots by gradient steps inside a stream, which runs under inference mode, with
    cache positions past the (tiny) trained window: the refinement must run and the budget hold."""
    from conftest import ByteTokenizer
    from sparsemem.stream import stream

    model = sparsemem.convert(make_base_model("llama", max_position_embeddings=256), top_k_blocks=None, block_fraction=None)
    online = OnlineCompaction(128, keep_first=4, method="am-learned")
    run, _ = stream(model, ByteTokenizer(), 900, chunk=100, budget=128, method="am-learned", progress=False, online=online)
    assert run.summary["budget_respected"] and run.records[-1]["rope_offset"] > 0
    assert math.isfinite(run.summary["loss_beyond_window"])
    assert online.press.last_accepted is not None
    assert online.press.train_keys is False  # refitted keys drift over many compactions; values and beta move


def test_refinement_without_key_training_keeps_the_closed_form_keys():
    """`train_keys=False`: the refined press returns the closed form's keys (real span keys) and its own values."""
    from sparsemem.modeling.attention_matching import SpanProblem
    from sparsemem.modeling.compaction import HeadSpan
    from sparsemem.modeling.attention_matching_press import AttentionMatchingPress
    from sparsemem.modeling.consolidation import LearnedConsolidationPress

    generator = torch.Generator().manual_seed(4)
    keys, values = torch.randn(2, 60, 8, generator=generator), torch.randn(2, 60, 8, generator=generator)
    queries = torch.randn(2, 200, 8, generator=generator)
    lse = torch.logsumexp(queries @ keys.transpose(-1, -2) * 0.35, -1) + 0.2
    span = HeadSpan(SpanProblem(queries, keys, values, torch.zeros(2, 60), lse, 0.35), torch.arange(60), torch.arange(60, 260))
    closed = AttentionMatchingPress(exact_newest=0.0).compact(span, 6)
    press = LearnedConsolidationPress(exact_newest=0.0, train_keys=False, max_ratio=None)
    refined = press.compact(span, 6)
    assert press.last_accepted == 1.0  # both heads took their refinement (better on held-out queries)
    assert torch.equal(refined[0], closed[0]) and torch.equal(refined[1], closed[1])
    assert not torch.allclose(refined[2], closed[2])


def test_value_fit_shrinks_toward_the_kept_values_and_stays_within_the_span_lengths():
    """`value_prior="kept"`: with a heavy ridge the fitted values are the chosen entries' own values (the
    default shrinks them to zero); `bound_values`: no fitted value is longer than the span's longest token
    value."""
    from sparsemem.modeling.attention_matching import SpanProblem, attention_matching, bound_value_norms

    generator = torch.Generator().manual_seed(2)
    keys, values = torch.randn(3, 50, 8, generator=generator), torch.randn(3, 50, 8, generator=generator)
    queries = torch.randn(3, 12, 8, generator=generator)
    lse = torch.logsumexp(queries @ keys.transpose(-1, -2) * 0.35, -1) + 0.3
    problem = SpanProblem(queries, keys, values, torch.zeros(3, 50), lse, 0.35)
    index, _, kept, _ = attention_matching(problem, 10, ridge=1e6, value_prior="kept")
    chosen = values.gather(1, index[..., None].expand(-1, -1, 8))
    torch.testing.assert_close(kept, chosen, atol=1e-3, rtol=1e-3)
    _, _, zero, _ = attention_matching(problem, 10, ridge=1e6)
    assert float(zero.abs().max()) < 1e-3
    longest = values.norm(dim=-1).amax(-1)
    wild = torch.randn(3, 10, 8, generator=generator) * 100
    bounded = bound_value_norms(wild, values, torch.zeros(3, 50))
    assert bool((bounded.norm(dim=-1) <= longest[:, None] * (1 + 1e-5)).all())
    torch.testing.assert_close(bounded / bounded.norm(dim=-1, keepdim=True), wild / wild.norm(dim=-1, keepdim=True))
    small = values[:, :10] * 0.5
    torch.testing.assert_close(bound_value_norms(small, values, torch.zeros(3, 50)), small)
    online = OnlineCompaction(64, method="am")
    assert online.press.value_prior == "kept" and online.press.bound_values and online.press.nnls_method == "fast"



def test_online_press_options_change_the_press_after_the_online_settings():
    online = OnlineCompaction(64, method="am", press_options={"exact_newest": 0.9})
    assert online.press.exact_newest == 0.9
    assert online.press.value_prior == "kept" and online.press.nnls_method == "fast"  # the online settings stay
    assert OnlineCompaction(64, method="am").press.exact_newest != 0.9
    with pytest.raises(ValueError, match="press_options.*no option\\(s\\) \\['exact_newst'\\]"):
        OnlineCompaction(64, method="am", press_options={"exact_newst": 0.9})
    with pytest.raises(ValueError, match="press_options"):
        OnlineCompaction(64, method="streaming-llm", press_options={"exact_newest": 0.9})
