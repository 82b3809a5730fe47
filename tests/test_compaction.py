"""Attention Matching and the compaction presses."""

import copy
import itertools
import logging
import math

import pytest
import torch
from conftest import ByteTokenizer, prefilled

import sparsemem
from sparsemem.head_budgets import GlobalBudgets, UniformBudgets, budget_policy
from sparsemem.modeling.attention_matching import SpanProblem, attention_matching, nnls
from sparsemem.modeling.presses import PRESSES


def _problem(seed=0, n=256, span=200, kept=20, dim=16, duplicate=False):
    torch.manual_seed(seed)
    q = torch.randn(2, n, dim)
    k = torch.randn(2, span, dim)
    v = torch.randn(2, span, dim)
    if duplicate:
        k[:] = k[:, :1]
    other = torch.randn(2, kept, dim)
    scale = dim**-0.5
    lse = torch.logsumexp(torch.cat([q @ other.transpose(1, 2), q @ k.transpose(1, 2)], -1) * scale, -1)
    return SpanProblem(q, k, v, torch.zeros(2, span), lse, scale)


def test_nnls_matches_the_kkt_conditions():
    torch.manual_seed(0)
    a = torch.rand(3, 50, 8)
    m = torch.rand(3, 50)
    w = nnls(a.transpose(1, 2) @ a, (a.transpose(1, 2) @ m[..., None])[..., 0], iterations=3000)
    gradient = (a.transpose(1, 2) @ (a @ w[..., None] - m[..., None]))[..., 0]
    assert (w >= 0).all()
    # KKT: zero gradient where w > 0, non-negative gradient where w == 0
    assert gradient[w > 1e-6].abs().max() < 1e-4
    assert (gradient[w <= 1e-6] > -1e-4).all()


def _residual(a, mass, w):
    """||A w - m||^2 per problem (fp64)."""
    return ((a @ w[..., None])[..., 0] - mass).pow(2).sum(-1)


def _enumerated_optimum(a, mass):
    """The exact NNLS residual of one small problem: the best over every support whose unconstrained
    least-squares solution is non-negative (the optimum is one of them)."""
    size = a.shape[-1]
    best = float(mass.pow(2).sum())  # w = 0
    for count in range(1, size + 1):
        for support in itertools.combinations(range(size), count):
            s = list(support)
            w = torch.zeros(size, dtype=a.dtype)
            w[s] = torch.linalg.lstsq(a[:, s], mass[:, None]).solution[:, 0]
            if bool((w >= 0).all()):
                best = min(best, float(_residual(a[None], mass[None], w[None])))
    return best


def _attention_nnls(seed, problems, n, t, sharpness):
    """NNLS problems as the beta fit poses them: the weights A of t keys of a span for n queries, and the
    span's mass m. Sharp attention gives the ill-conditioned systems where projected gradient falls short.
    Returns (A, m, A^T A, A^T m), fp64."""
    torch.manual_seed(seed)
    q, k = torch.randn(problems, n, 16), torch.randn(problems, 4 * t, 16) * sharpness
    logits = q @ k.transpose(1, 2) / 4
    phi = torch.exp(logits - logits.logsumexp(-1, keepdim=True)).double()
    a, mass = phi[..., :t], phi.sum(-1)
    return a, mass, a.transpose(1, 2) @ a, (a.transpose(1, 2) @ mass[..., None])[..., 0]


@pytest.mark.parametrize("method", ["active-set", "fista", "fast"])  # "fast" is the active set on the CPU
def test_nnls_reaches_the_optimum_of_every_support(method):
    """Both solvers (the CPU's active set, the accelerators' projected gradient with its active-set finish)
    within 1e-4 of the exact optimum's residual, on problems small enough to enumerate every support
    (projected gradient alone is up to ~1e-2 above it on these)."""
    worst = 0.0
    for seed in range(6):
        a, mass, gram, rhs = _attention_nnls(seed, 3, 40, 8, sharpness=1.0 + seed)
        w = nnls(gram, rhs, method=method)
        assert (w >= 0).all()
        for p in range(3):
            exact = _enumerated_optimum(a[p], mass[p])
            worst = max(worst, (float(_residual(a[p], mass[p], w[p])) - exact) / exact)
    assert worst < 1e-4, worst


def test_nnls_active_set_meets_the_kkt_conditions_and_beats_projected_gradient():
    """On larger problems (no enumeration) the active set meets the KKT conditions to fp64 rounding, and
    its residual is never above projected gradient's alone (which stops short on sharp attention)."""
    from sparsemem.modeling.attention_matching import _kkt_residual, _projected_gradient

    a, mass, gram, rhs = _attention_nnls(0, 4, 300, 60, sharpness=3.0)
    exact = nnls(gram, rhs, method="active-set")
    assert (exact >= 0).all()
    assert (_kkt_residual(gram, rhs, exact) <= 1e-9 * rhs.abs().amax(-1)).all()
    approximate = _projected_gradient(gram, rhs, 400, None, 1e-6)
    assert (_residual(a, mass, exact) <= _residual(a, mass, approximate) * (1 + 1e-9)).all()


def test_nnls_past_its_round_cap_falls_back_and_says_so(caplog):
    from sparsemem.modeling.attention_matching import _kkt_residual

    _, _, gram, rhs = _attention_nnls(1, 2, 100, 30, sharpness=2.0)
    with caplog.at_level(logging.WARNING, logger="sparsemem.modeling.attention_matching"):
        w = nnls(gram, rhs, method="active-set", max_rounds=1, iterations=500)
    assert "not finished in 1 active-set rounds" in caplog.text
    # projected gradient went on from the active set's best feasible point
    assert (w >= 0).all() and (_kkt_residual(gram, rhs, w) <= 1e-4 * rhs.abs().amax(-1)).all()
    with pytest.raises(ValueError, match="nnls `method`"):
        nnls(gram, rhs, method="exact")


def _enumerated_bounded_optimum(a, mass, floor):
    """The exact residual of min ||A w - m||^2 subject to w >= floor, for one small problem: the best over
    every set S of free entries (the others at the floor) whose least-squares solution keeps w_S >= floor."""
    size = a.shape[-1]
    at_floor = torch.full((size,), floor, dtype=a.dtype)
    best = float(_residual(a[None], mass[None], at_floor[None]))
    for count in range(1, size + 1):
        for support in itertools.combinations(range(size), count):
            s = list(support)
            w = at_floor.clone()
            rest = mass - a @ at_floor + a[:, s] @ at_floor[s]
            w[s] = torch.linalg.lstsq(a[:, s], rest[:, None]).solution[:, 0]
            if bool((w[s] >= floor).all()):
                best = min(best, float(_residual(a[None], mass[None], w[None])))
    return best


def test_fit_beta_floor_reaches_the_bounded_optimum():
    """With `min_weight`, the mass fit is the exact least squares over w >= min_weight (checked against
    every support of small problems), while plain NNLS leaves some of the same slots below that floor."""
    from sparsemem.modeling.attention_matching import fit_beta

    floor, worst, below = math.exp(-1), 0.0, 0
    for seed in range(4):
        a, mass, _, _ = _attention_nnls(seed, 3, 40, 8, sharpness=1.0 + seed)
        w = fit_beta(a.float(), mass.float(), span_length=32, min_weight=floor).double().exp()
        assert (w >= floor * (1 - 1e-5)).all()
        below += int((fit_beta(a.float(), mass.float(), span_length=32).exp() < floor).sum())
        for p in range(3):
            exact = _enumerated_bounded_optimum(a[p], mass[p], floor)
            worst = max(worst, (float(_residual(a[p], mass[p], w[p])) - exact) / exact)
    assert worst < 1e-4, worst
    assert below > 0  # the floor binds: these problems are not solved by plain NNLS already


def test_min_beta_keeps_every_fitted_slot_alive():
    """Plain NNLS switches some chosen keys off (beta at log 1e-6); `min_beta` keeps every slot at or above
    it, and the slots still reproduce the span better than the chosen keys left as they are."""
    problem = _problem(span=200, n=256)
    _, _, _, dead = attention_matching(problem, 40, query_weights="peak")
    assert bool((dead < -13).any())
    index, keys, values, beta = attention_matching(problem, 40, query_weights="peak", min_beta=-1.0)
    assert bool((beta >= -1.0 - 1e-5).all())
    gather = lambda t: t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
    fitted = _errors(problem, keys, values, beta)
    kept = _errors(problem, keys, gather(problem.values), torch.zeros_like(beta))
    assert fitted[0] < kept[0] and fitted[1] < kept[1]


def test_max_beta_clips_the_fitted_beta():
    """`max_beta` clips the mass fit's betas (the same keys; the beta of the uncapped fit, clipped) and the
    values are fitted to the clipped betas."""
    problem = _problem()
    index, _, values, beta = attention_matching(problem, 10, query_weights="peak", min_beta=-1.0)
    assert bool((beta > 2.0).any())  # few slots for the span: some stand for many entries
    capped_index, _, capped_values, capped = attention_matching(problem, 10, query_weights="peak", min_beta=-1.0, max_beta=2.0)
    assert torch.equal(capped_index, index)
    torch.testing.assert_close(capped, beta.clamp(max=2.0), rtol=0, atol=1e-6)
    assert not torch.allclose(capped_values, values, atol=1e-3)


def test_identical_keys_collapse_to_one_slot_exactly():
    """T identical keys: one kept key with beta = log(T) and value = mean value reproduces the span."""
    problem = _problem(duplicate=True)
    _, keys, values, beta = attention_matching(problem, budget=1)
    torch.testing.assert_close(beta, torch.full_like(beta, math.log(200)), rtol=0, atol=1e-3)
    torch.testing.assert_close(values[:, 0], problem.values.mean(1), rtol=0, atol=1e-3)


def _errors(problem, keys, values, beta):
    phi = problem.weights()
    mass, output = problem.targets(phi)
    logits = problem.queries @ keys.transpose(1, 2) * problem.scaling + beta[:, None]
    got_mass = torch.exp(logits - problem.context_lse[..., None]).sum(-1)
    got_out = torch.softmax(logits, -1) @ values
    return ((got_mass - mass).abs() / mass).mean().item(), ((got_out - output).norm(dim=-1) * mass).mean().item()


@pytest.mark.parametrize("selection", ["attention", "omp"])
def test_beta_and_value_fits_each_reduce_their_error(selection):
    problem = _problem()
    base = attention_matching(problem, 40, key_selection=selection, fit_bias=False, refit_values=False)
    with_beta = attention_matching(problem, 40, key_selection=selection, refit_values=False)
    full = attention_matching(problem, 40, key_selection=selection)
    mass_err0, out_err0 = _errors(problem, *base[1:])
    mass_err1, _ = _errors(problem, *with_beta[1:])
    _, out_err2 = _errors(problem, *full[1:])
    assert mass_err1 < 0.5 * mass_err0
    assert out_err2 < 0.5 * out_err0


def test_budget_at_least_the_span_is_exact():
    problem = _problem(span=10)
    index, keys, values, beta = attention_matching(problem, budget=12)
    assert torch.equal(keys, problem.keys) and torch.equal(values, problem.values) and (beta == 0).all()


def test_non_finite_input_is_refused():
    problem = _problem()
    keys = problem.keys.clone()
    keys[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="keys"):
        SpanProblem(problem.queries, keys, problem.values, problem.key_bias, problem.context_lse, problem.scaling)


@pytest.fixture(scope="module")
def filled():
    return prefilled("llama", 260, 240, top_k_blocks=None, block_size=8, sink_tokens=4, local_tokens=16)


@pytest.mark.parametrize("method", sorted(PRESSES))
def test_every_method_compacts_to_the_nominal_ratio(filled, method):
    model, ids, full = filled
    cache = copy.deepcopy(full)
    sparsemem.compact(model, cache, ratio=8, method=method, input_ids=ids[:, :240], queries=("context",))
    before = full.memory_bytes()["total"]
    after = cache.memory_bytes()["total"]
    assert abs(before / after - 8) / 8 < 0.05, before / after
    assert cache.get_seq_length() == 240
    with torch.no_grad():
        logits = model(ids[:, 240:], past_key_values=cache).logits
    assert torch.isfinite(logits).all()


def test_compaction_with_proportional_head_budgets_stays_at_ratio(filled):
    model, ids, full = filled
    cache = copy.deepcopy(full)
    sparsemem.compact(model, cache, ratio=6, input_ids=ids[:, :240], budgets="proportional")
    counts = [torch.bincount(layer.slots.head, minlength=2).tolist() for layer in cache.layers]
    assert all(sum(c) == sum(counts[0]) for c in counts)
    assert abs(full.memory_bytes()["total"] / cache.memory_bytes()["total"] - 6) / 6 < 0.05


def test_global_head_budgets_rank_all_heads_together_and_keep_the_ratio(filled):
    model, ids, full = filled
    cache = copy.deepcopy(full)
    sparsemem.compact(model, cache, ratio=6, input_ids=ids[:, :240], budgets="global")
    counts = [torch.bincount(layer.slots.head, minlength=2).tolist() for layer in cache.layers]
    assert counts == cache.compaction.slots_per_kv_head
    nominal = sum(cache.compaction.slots_per_head) * 2
    assert sum(map(sum, counts)) == nominal and min(map(min, counts)) >= 1
    assert len({c for layer in counts for c in layer}) > 1  # heads really differ
    assert abs(full.memory_bytes()["total"] / cache.memory_bytes()["total"] - 6) / 6 < 0.05
    with torch.no_grad():
        assert torch.isfinite(model(ids[:, 240:], past_key_values=cache).logits).all()
    with pytest.raises(ValueError, match="`chunk_size` is not an option of 'global'"):
        sparsemem.compact(model, copy.deepcopy(full), ratio=6, input_ids=ids[:, :240],
                          budgets=budget_policy("global", chunk_size=64))


def test_allocation_by_scores_follows_the_global_ranking():
    from sparsemem.head_budgets import allocate_by_scores

    sharp = torch.tensor([0.9, 0.8, 0.7, 0.6])  # a head that singles entries out
    flat = torch.tensor([0.05, 0.04, 0.03, 0.02])
    # one each first, then the best 4 of the remaining 6 entries: all of sharp's three, one of flat's
    assert allocate_by_scores([sharp, flat], 6) == [4, 2]
    assert allocate_by_scores([sharp, flat], 2) == [1, 1]
    assert allocate_by_scores([sharp, flat], 8) == [4, 4]
    with pytest.raises(ValueError, match="at least"):
        allocate_by_scores([sharp, flat], 1)


def test_whole_span_share_gives_retrieval_heads_their_span_and_keeps_the_total():
    from sparsemem.head_budgets import allocate_by_scores

    sharp = torch.tensor([0.9, 0.8, 0.7, 0.6])
    mild = torch.tensor([0.5, 0.4, 0.3, 0.2, 0.01, 0.01, 0.01, 0.01])
    flat = torch.tensor([0.05, 0.04, 0.03, 0.02, 0.01, 0.01, 0.01, 0.01])
    # without: one each, then the best 5 of the rest (sharp's 3, mild's 2) -> [4, 3, 1]
    assert allocate_by_scores([sharp, mild, flat], 8) == [4, 3, 1]
    # mild wins 3 of its 8 (< half): unchanged; at a share of 1/4 it would need all 8, 5 more slots than
    # flat (its one other head) was given: mild stays as ranked rather than starve flat
    assert allocate_by_scores([sharp, mild, flat], 8, whole_span_share=0.5) == [4, 3, 1]
    assert allocate_by_scores([sharp, mild, flat], 8, whole_span_share=0.25) == [4, 3, 1]
    # a wins all 20 (already whole), b 9 of 10 (whole at 0.9: one more slot), c 3, which pays the slot
    a, b, c = torch.full((20,), 0.9), torch.cat([torch.full((9,), 0.8), torch.tensor([0.01])]), torch.full((20,), 0.05)
    assert allocate_by_scores([a, b, c], 32) == [20, 9, 3]
    assert allocate_by_scores([a, b, c], 32, whole_span_share=0.9) == [20, 10, 2]
    assert allocate_by_scores([a, b, c], 30, whole_span_share=0.9) == [20, 9, 1]  # c cannot go below its one slot
    # the slots a whole head takes come from the lowest-ranked entries of all, not from every head alike:
    # w wins 4 of 6 and takes 2 more; x keeps its three 0.8 entries and y (all 0.03) pays both
    w = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.01, 0.01])
    x, y = torch.cat([torch.full((4,), 0.8), torch.full((6,), 0.02)]), torch.full((10,), 0.03)
    assert allocate_by_scores([w, x, y], 12) == [4, 4, 4]
    assert allocate_by_scores([w, x, y], 12, whole_span_share=0.5) == [6, 4, 2]


def test_whole_span_share_makes_heads_whole_by_share_until_the_others_would_lose_half():
    from sparsemem.head_budgets import WHOLE_SPAN_TAKE, allocate_by_scores

    assert WHOLE_SPAN_TAKE == 0.5
    # four retrieval-like heads winning 8, 7, 6 and 5 of their 10 entries, six flat heads 4 each (50 slots)
    retrieval = [torch.cat([torch.full((n,), 0.9), torch.full((10 - n,), 0.001)]) for n in (8, 7, 6, 5)]
    flat = [torch.cat([torch.full((4,), 0.1 - 0.001 * i), torch.full((6,), 1e-4)]) for i in range(6)]
    plain = allocate_by_scores(retrieval + flat, 50)
    assert plain == [8, 7, 6, 5] + [4] * 6
    # whole in order of share, they take 2, then 3, 4 slots: 9 <= half of the 29 the others were given;
    # the fourth would make it 14 > half of 24, so it keeps its ranked 5 and the flat heads pay the 9
    capped = allocate_by_scores(retrieval + flat, 50, whole_span_share=0.5)
    assert capped == [10, 10, 10, 5] + allocate_by_scores(flat, 15) and sum(capped) == 50
    assert capped[4:] == [4, 4, 4, 1, 1, 1]  # the lowest-ranked flat entries go first
    # a share none reaches changes nothing
    assert allocate_by_scores(retrieval + flat, 50, whole_span_share=0.85) == plain


def test_whole_span_share_on_a_model_keeps_the_ratio_and_the_heads_spans(filled):
    model, ids, full = filled
    plain = sparsemem.compact(model, copy.deepcopy(full), ratio=2, input_ids=ids[:, :240],
                              budgets=GlobalBudgets(whole_span_share=None))
    info = plain.compaction
    assert info.whole_span_share is None
    span = [240 - info.keep_first - last for last in info.keep_last]
    # just below the largest share a head wins: that head (at least) keeps its whole span
    share = 0.99 * max(c / span[layer] for layer, counts in enumerate(info.slots_per_kv_head) for c in counts)
    cache = sparsemem.compact(model, copy.deepcopy(full), ratio=2, input_ids=ids[:, :240], budgets=GlobalBudgets(share))
    info = cache.compaction
    whole = [(layer, head) for layer, counts in enumerate(info.slots_per_kv_head) for head, c in enumerate(counts) if c == span[layer]]
    assert whole and info.slots_per_kv_head != plain.compaction.slots_per_kv_head
    assert abs(full.memory_bytes()["total"] / cache.memory_bytes()["total"] - 2) / 2 < 0.05
    layer, head = whole[0]
    # the head's span is kept exact: its slots are the span's own keys, in order, with no bias
    own = cache.layers[layer].slots.head == head
    kept = full.layers[layer].keys[:, head, info.keep_first : info.keep_first + span[layer]]
    torch.testing.assert_close(cache.layers[layer].slots.keys[:, own], kept)
    assert torch.all(cache.layers[layer].slots.beta[:, own] == 0)
    with torch.no_grad():
        assert torch.isfinite(model(ids[:, 240:], past_key_values=cache).logits).all()
    # "auto" (the default): 0.45 for Attention Matching with global budgets, none for a baseline or other budgets
    auto = lambda **kw: sparsemem.compact(model, copy.deepcopy(full), ratio=4, input_ids=ids[:, :240], **kw).compaction  # noqa: E731
    assert auto().whole_span_share == 0.45 and auto(method="am-no-beta").whole_span_share == 0.45
    assert auto(method="kvzip", queries=("context",)).whole_span_share is None and auto(budgets="uniform").whole_span_share is None
    for bad in (0, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="GlobalBudgets `whole_span_share`"):
            GlobalBudgets(whole_span_share=bad)
    with pytest.raises(ValueError, match="`whole_span_share` is not an option of 'uniform'"):
        budget_policy("uniform", whole_span_share=0.5)


def test_ratio_one_below_one_and_bad_arguments(filled):
    model, ids, full = filled
    for bad in (0.5, float("nan"), 0):
        with pytest.raises(ValueError, match="ratio"):
            sparsemem.compact(model, copy.deepcopy(full), ratio=bad, input_ids=ids[:, :240])
    with pytest.raises(ValueError, match="input_ids"):
        sparsemem.compact(model, copy.deepcopy(full), ratio=4)
    with pytest.raises(ValueError, match="method"):
        sparsemem.compact(model, copy.deepcopy(full), ratio=4, method="magic", input_ids=ids[:, :240])


def test_kvzip_ranks_by_its_repeat_pass_in_compact_and_in_the_evaluation(monkeypatch):
    """`method="kvzip"` means one press with one query source: `compact` and `sparsemem eval compaction`
    both rank by the repeat pass KVzip declares, so the evaluation's cache is the library's, slot for slot."""
    from conftest import make_base_model
    from sparsemem import evaluation_compaction
    from sparsemem.corpus import python_reference_docs, token_window

    model = sparsemem.convert(make_base_model("llama"), top_k_blocks=None, block_fraction=None)
    tokenizer, corpus = ByteTokenizer(), python_reference_docs()
    real, made = evaluation_compaction.compact, []
    monkeypatch.setattr(evaluation_compaction, "compact", lambda *args, **kwargs: made.append(real(*args, **kwargs)) or made[-1])
    results, _ = evaluation_compaction.evaluate_compaction(model, tokenizer, corpus, methods=["kvzip"], ratios=[4], length=192,
                                                           continuation=32, needle_depths=(), queries=("context",))
    assert len(made) == 1 and results[1].queries == ["repeat"] and made[0].compaction.queries == ["repeat"]

    ids = torch.tensor([token_window(tokenizer, corpus, 192 + 32, offset=20000)])
    full = sparsemem.SparseMemCache(model.config)  # read as the evaluation reads it
    with torch.no_grad():
        model(ids[:, :192], past_key_values=full)
        reference = torch.log_softmax(model(ids[:, 192:], past_key_values=copy.deepcopy(full)).logits.float(), dim=-1)

    def compacted(**options):
        cache = sparsemem.compact(model, copy.deepcopy(full), 4, method="kvzip", input_ids=ids[:, :192], **options)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids[:, 192:], past_key_values=cache).logits.float(), dim=-1)
        return cache, (reference.exp() * (reference - logprobs)).sum(-1).mean().item()

    library, kl = compacted(tokenizer=tokenizer)
    assert library.compaction.queries == ["repeat"]
    assert kl == pytest.approx(results[1].kl, abs=1e-6)
    fields = ("keys", "values", "beta", "head", "position")
    for ours, theirs in zip(library.layers, made[0].layers):  # both read the continuation after compaction
        assert torch.equal(ours.positions, theirs.positions) and torch.equal(ours.keys, theirs.keys)
        assert all(torch.equal(getattr(ours.slots, name), getattr(theirs.slots, name)) for name in fields)
    # the context's own queries, asked for explicitly, are another ranking: the check above can tell them apart
    other, _ = compacted(queries=("context",))
    assert other.compaction.queries == ["context"]
    assert any(not torch.equal(a.slots.position, b.slots.position) or not torch.equal(a.slots.head, b.slots.head)
               for a, b in zip(other.layers, library.layers))
    with pytest.raises(ValueError, match="kvzip.*tokenizer"):
        sparsemem.compact(model, copy.deepcopy(full), 4, method="kvzip", input_ids=ids[:, :192])


def test_read_document_gives_each_method_its_own_queries(filled):
    """`read_document` reuses the prefill's context queries only where the press ranks by them."""
    from sparsemem.corpus import python_reference_docs

    model, _, _ = filled
    text = python_reference_docs().text[20000:20200]
    made = {method: sparsemem.read_document(model, ByteTokenizer(), text, ratio=4, method=method).compaction
            for method in ("am", "kvzip", "h2o")}
    assert {method: record.queries for method, record in made.items()} == {"am": ["context"], "kvzip": ["repeat"], "h2o": ["context"]}


def test_chunked_compaction_keeps_the_ratio_and_every_chunk(filled):
    model, ids, full = filled
    cache = copy.deepcopy(full)
    sparsemem.compact(model, cache, ratio=5, input_ids=ids[:, :240], budgets=UniformBudgets(chunk_size=64), keep_last=16)
    layer = cache.layers[0]
    # 4..223 is compacted in 4 chunks: the slots of each chunk stand at that chunk's last position
    assert sorted(set(layer.slots.position.tolist())) == [67, 131, 195, 223]
    assert abs(full.memory_bytes()["total"] / cache.memory_bytes()["total"] - 5) / 5 < 0.05
    with torch.no_grad():
        assert torch.isfinite(model(ids[:, 240:], past_key_values=cache).logits).all()


def test_am_output_error_is_below_kvzip_on_a_fixed_problem():
    """Same budget, same queries: AM's fitted beta and values reproduce the span's attention output and
    mass better than KVzip's kept keys and values."""
    from sparsemem.modeling.compaction import HeadSpan
    from sparsemem.modeling.baseline_presses import KVzipPress

    problem = _problem()
    span = HeadSpan(problem, torch.arange(200), torch.full((256,), -1))
    am = attention_matching(problem, 40)
    kvzip = KVzipPress().compact(span, 40)
    am_mass, am_out = _errors(problem, *am[1:])
    kv_mass, kv_out = _errors(problem, *kvzip[1:])
    assert am_out < 0.5 * kv_out, (am_out, kv_out)
    assert am_mass < 0.5 * kv_mass, (am_mass, kv_mass)


def test_every_layer_and_head_keeps_slots_when_the_split_is_searched(filled):
    """The recent/slot split never gives a layer's whole budget to recent tokens: mid-document tokens
    keep a representative in every layer."""
    model, ids, full = filled
    cache = copy.deepcopy(full)
    sparsemem.compact(model, cache, ratio=6, input_ids=ids[:, :240], queries=("context",))
    assert all(slots > 0 for slots in cache.compaction.slots_per_head)
    kv_heads = model.config.num_key_value_heads
    for layer in cache.layers:
        assert layer.slots is not None
        assert (torch.bincount(layer.slots.head, minlength=kv_heads) > 0).all()


def test_context_queries_judge_the_split_but_only_the_sources_are_fitted(filled):
    from sparsemem.modeling.attention_matching_press import AttentionMatchingPress

    class Recording(AttentionMatchingPress):
        seen: list

        def compact(self, span, budget):
            self.seen.append(span.query_positions.clone())
            return super().compact(span, budget)

    model, ids, full = filled
    for sources, future_only in ((("random",), True), (("context",), False)):
        press = Recording()
        press.seen = []
        cache = copy.deepcopy(full)
        sparsemem.compact(model, cache, ratio=6, method=press, input_ids=ids[:, :240], queries=sources)
        positions = torch.cat(press.seen)
        assert bool((positions < 0).all()) == future_only
        # the split is searched (several candidates) with the context's late queries in both cases
        assert len(press.seen) > len(cache.layers)


def test_prefill_records_the_reference_queries_in_the_same_pass(filled):
    """`prefill` fills the cache like a dense pass and records the queries a separate capture pass would;
    compacting with them gives the same cache as compacting with `input_ids` (which captures them again)."""
    from sparsemem.query_sources import capture_reference_queries

    model, ids, full = filled
    cache, recorded = sparsemem.prefill(model, ids[:, :240])
    captured = capture_reference_queries(model, ids[:, :240], ("context",))
    assert sorted(recorded) == sorted(captured) == list(range(len(full.layers)))
    for index, layer in enumerate(cache.layers):
        torch.testing.assert_close(layer.keys, full.layers[index].keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(recorded[index][0], captured[index][0], rtol=0, atol=1e-5)
        assert torch.equal(recorded[index][1], captured[index][1])
    by_recording, by_capture = copy.deepcopy(cache), copy.deepcopy(cache)
    sparsemem.compact(model, by_recording, ratio=6, reference_queries=recorded)
    sparsemem.compact(model, by_capture, ratio=6, input_ids=ids[:, :240])
    for ours, theirs in zip(by_recording.layers, by_capture.layers):
        torch.testing.assert_close(ours.slots.keys, theirs.slots.keys, rtol=0, atol=1e-4)
        torch.testing.assert_close(ours.slots.beta, theirs.slots.beta, rtol=1e-3, atol=1e-3)


def test_prefill_refuses_what_it_cannot_fill(filled):
    from transformers import DynamicCache

    model, ids, _ = filled
    with pytest.raises(ValueError, match="SparseMemCache"):
        sparsemem.prefill(model, ids[:, :20], cache=DynamicCache())


def test_am_fits_only_the_queries_that_come_after_the_span():
    from sparsemem.modeling.compaction import HeadSpan

    problem = _problem(n=4, span=50)
    span = HeadSpan(problem, torch.arange(10, 60), torch.tensor([-1, 5, 50, 100]))
    after = span.after_span()
    assert after.query_positions.tolist() == [-1, 100]
    torch.testing.assert_close(after.problem.queries, problem.queries[:, [0, 3]])
    torch.testing.assert_close(after.problem.weights(), problem.weights()[:, [0, 3]])
    # no query after the span: nothing to restrict to, the span is returned as it is
    early = HeadSpan(problem, torch.arange(10, 60), torch.tensor([1, 2, 3, 4]))
    assert early.after_span() is early


def test_recent_key_selection_without_fits_is_streaming_llm():
    from sparsemem.modeling.compaction import HeadSpan
    from sparsemem.modeling.attention_matching_press import AttentionMatchingPress
    from sparsemem.modeling.baseline_presses import StreamingLLMPress

    problem = _problem(span=60)
    span = HeadSpan(problem, torch.arange(100, 160), torch.full((problem.queries.shape[1],), -1))
    plain = AttentionMatchingPress(key_selection="recent", fit_bias=False, refit_values=False).compact(span, 12)
    streaming = StreamingLLMPress().compact(span, 12)
    for ours, theirs in zip(plain, streaming):
        assert torch.equal(ours, theirs)
    assert plain[0][0].tolist() == list(range(48, 60))
    # with the fits, the same keys stand for the whole span: the mass error falls
    fitted = AttentionMatchingPress(key_selection="recent").compact(span, 12)
    assert torch.equal(fitted[1], streaming[1])
    mass_error = lambda out: _errors(problem, out[1], out[2], out[3])[0]  # noqa: E731
    assert mass_error(fitted) < 0.5 * mass_error(streaming)


def test_am_keeps_the_newest_share_of_each_budget_exact_and_fits_the_rest_to_the_older_part():
    from sparsemem.modeling.compaction import HeadSpan
    from sparsemem.modeling.attention_matching_press import AttentionMatchingPress

    problem = _problem(span=60)
    span = HeadSpan(problem, torch.arange(100, 160), torch.full((problem.queries.shape[1],), -1))
    index, keys, values, beta = AttentionMatchingPress(exact_newest=0.5).compact(span, 12)
    assert keys.shape[1] == values.shape[1] == beta.shape[1] == 12
    # the six newest entries, untouched
    assert torch.equal(index[:, 6:], torch.arange(54, 60).expand(2, -1))
    assert torch.equal(keys[:, 6:], problem.keys[:, 54:]) and torch.equal(values[:, 6:], problem.values[:, 54:])
    assert torch.equal(beta[:, 6:], problem.key_bias[:, 54:])
    # the other six are Attention Matching slots of the older 54 entries alone
    older = SpanProblem(problem.queries, problem.keys[:, :54], problem.values[:, :54], problem.key_bias[:, :54],
                        problem.context_lse, problem.scaling)
    _, old_keys, old_values, old_beta = attention_matching(older, 6)
    torch.testing.assert_close(keys[:, :6], old_keys)
    torch.testing.assert_close(values[:, :6], old_values)
    torch.testing.assert_close(beta[:, :6], old_beta)


def test_exact_newest_indices_point_into_the_span_whatever_its_order():
    from sparsemem.modeling.compaction import HeadSpan
    from sparsemem.modeling.attention_matching_press import AttentionMatchingPress

    problem = _problem(span=60)
    # positions descending: the newest entries come first in the span, so its older part is not a prefix
    span = HeadSpan(problem, torch.arange(159, 99, -1), torch.full((problem.queries.shape[1],), -1))
    index, keys, _, _ = AttentionMatchingPress(exact_newest=0.5).compact(span, 12)
    assert torch.equal(index[:, 6:], torch.arange(6).expand(2, -1))
    assert bool((index[:, :6] >= 6).all())
    gathered = problem.keys.gather(1, index[..., None].expand(-1, -1, problem.keys.shape[-1]))
    assert torch.equal(keys, gathered)


def test_exact_newest_must_be_a_share():
    from sparsemem.modeling.attention_matching_press import AttentionMatchingPress

    assert AttentionMatchingPress().exact_share == 0.75  # "auto" without whole spans
    assert AttentionMatchingPress().with_whole_spans().exact_share == 0.0
    assert AttentionMatchingPress(exact_newest=0.5).with_whole_spans().exact_share == 0.5  # a chosen share stays
    for bad in (1.5, -0.1, "half", True):
        with pytest.raises(ValueError, match="exact_newest"):
            AttentionMatchingPress(exact_newest=bad)


def test_peak_query_weights_ignore_what_each_query_reads_beyond_the_span():
    """"peak" counts every query as if the span were all it read: moving each query's context log-sum-exp
    (how much it reads elsewhere) changes nothing, while "share" weights follow it."""
    problem = _problem()
    elsewhere = torch.rand(problem.context_lse.shape) * 4
    moved = SpanProblem(problem.queries, problem.keys, problem.values, problem.key_bias, problem.context_lse + elsewhere,
                        problem.scaling)
    for weights, same in (("peak", True), ("share", False)):
        a = attention_matching(problem, 30, query_weights=weights)
        b = attention_matching(moved, 30, query_weights=weights)
        close = torch.equal(a[0], b[0]) and torch.allclose(a[3], b[3], atol=1e-3) and torch.allclose(a[2], b[2], atol=1e-3)
        assert close == same, weights
    with pytest.raises(ValueError, match="query_weights"):
        attention_matching(problem, 30, query_weights="equal")


def test_head_budgets_choose_the_press_fit(filled):
    """Uniform budgets fit every slot over the span with "peak" weights, beta bounded to [-1, 3] and a light
    value ridge; global ones keep "share" and the general defaults; options given stay as given."""
    from sparsemem.modeling.attention_matching_press import AttentionMatchingPress

    model, ids, full = filled
    keys = ("query_weights", "exact_newest", "min_beta", "max_beta", "ridge")
    fit = lambda cache: tuple(getattr(cache.compaction, key) for key in keys)  # noqa: E731
    uniform = sparsemem.compact(model, copy.deepcopy(full), ratio=6, input_ids=ids[:, :240], budgets="uniform")
    assert fit(uniform) == ("peak", 0.0, -1.0, 3.0, 1e-5)
    chosen = AttentionMatchingPress(exact_newest=0.5, query_weights="share", min_beta=None, max_beta=None, ridge=1e-2)
    kept = sparsemem.compact(model, copy.deepcopy(full), ratio=6, method=chosen, input_ids=ids[:, :240], budgets="uniform")
    assert fit(kept) == ("share", 0.5, None, None, 1e-2)
    press = AttentionMatchingPress().for_head_budgets("global")
    assert (press.query_weights, press.min_beta, press.max_beta, press.ridge) == ("share", None, None, 1e-3)
    with pytest.raises(ValueError, match="query_weights"):
        AttentionMatchingPress(query_weights="equal")
    for bad in (-1.0, "light", True, float("inf")):
        with pytest.raises(ValueError, match="ridge"):
            AttentionMatchingPress(ridge=bad)
    for bad in ("low", float("nan"), False):
        with pytest.raises(ValueError, match="min_beta"):
            AttentionMatchingPress(min_beta=bad)
        with pytest.raises(ValueError, match="max_beta"):
            AttentionMatchingPress(max_beta=bad)
    with pytest.raises(ValueError, match="must not exceed"):
        AttentionMatchingPress(min_beta=1.0, max_beta=0.0)


def test_on_policy_fits_each_layer_to_the_queries_of_its_compacted_lower_layers(filled):
    """Layer l's queries depend only on layers < l, so a repeat pass over the finished on-policy cache
    yields exactly the queries each layer was fitted to: fitting the full cache to those (off-policy)
    must rebuild the on-policy cache, while the full cache's own repeat queries give other slots."""
    from sparsemem.query_sources import REPEAT_PROMPT, recording_queries

    model, ids, full = filled
    context, tokenizer = ids[:, :240], ByteTokenizer()
    options = dict(queries=("repeat",), tokenizer=tokenizer, input_ids=context, budgets="uniform", max_queries=10**6)
    on = sparsemem.compact(model, copy.deepcopy(full), ratio=6, on_policy=True, **options)
    off = sparsemem.compact(model, copy.deepcopy(full), ratio=6, **options)
    assert on.get_seq_length() == 240 and all(int(layer.positions.max()) < 240 for layer in on.layers)
    assert on.memory_bytes()["total"] == off.memory_bytes()["total"]

    prompt = tokenizer(REPEAT_PROMPT, return_tensors="pt").input_ids
    reader = copy.deepcopy(on)
    with torch.no_grad(), recording_queries(model, keep_from=prompt.shape[1]) as captured:
        model(torch.cat([prompt, context], 1), past_key_values=reader,
              position_ids=torch.arange(240, 240 + prompt.shape[1] + 240)[None])
    recorded = {layer: (torch.cat(parts, -2), torch.full((240,), -1)) for layer, parts in captured.items()}
    rebuilt = sparsemem.compact(model, copy.deepcopy(full), ratio=6, reference_queries=recorded, **options)
    differs = []
    for number, (a, b, c) in enumerate(zip(on.layers, rebuilt.layers, off.layers)):
        for name in ("keys", "values", "beta"):
            torch.testing.assert_close(getattr(a.slots, name), getattr(b.slots, name), rtol=0, atol=2e-5)
        gap = (a.slots.values - c.slots.values).abs().max().item()
        if number == 0:  # the first layer's queries come from the embeddings alone
            assert gap < 2e-5
        differs.append(gap > 1e-4)  # 5x the rebuild tolerance (transformers 5.24's random weights give 1.5e-4)
    assert all(differs[1:])


def test_on_policy_needs_the_repeat_source_the_context_and_a_tokenizer(filled):
    model, ids, full = filled
    with pytest.raises(ValueError, match="on_policy"):
        sparsemem.compact(model, copy.deepcopy(full), 6, on_policy=True, queries=("context",), input_ids=ids[:, :240])
    with pytest.raises(ValueError, match="input_ids"):
        sparsemem.compact(model, copy.deepcopy(full), 6, on_policy=True, queries=("repeat",), tokenizer=ByteTokenizer())


def test_peak_selection_keeps_a_key_one_query_needs():
    """RMS favours keys many queries attend a little; the peak keeps the key one query needs sharply."""
    from sparsemem.modeling.attention_matching import select_by_attention

    phi = (0.1 + 0.001 * torch.arange(6.0)).expand(1, 100, 6).clone()
    phi[0, :, 4] = 0.12
    phi[0, :, 5] = 0.0
    phi[0, 7, 5] = 0.9  # one query recalls key 5, the others never look at it (RMS 0.09)
    assert select_by_attention(phi, 2).tolist() == [[3, 4]]
    assert select_by_attention(phi, 2, order=float("inf")).tolist() == [[4, 5]]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_repeat_queries_know_the_share_of_attention_the_context_gets(family):
    """The repeat pass's queries also attend to the prompt and the repetition so far; the captured `outside`
    log-sum-exp gives each query's context share, sigmoid(lse_context - outside), equal to the attention
    weights the dense model (eager attention) puts on the context over those on the context, the prompt and
    the last `REPEAT_REACH` tokens of the repetition (older ones copy the context and do not count)."""
    from conftest import make_base_model

    from sparsemem.query_sources import REPEAT_PROMPT, REPEAT_REACH, capture_reference_queries

    tokenizer = ByteTokenizer()
    model, ids, full = prefilled(family, 64, 64)
    captured = capture_reference_queries(model, ids, ("repeat",), tokenizer)
    prompt = tokenizer(REPEAT_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        attentions = make_base_model(family)(torch.cat([ids, prompt, ids], 1), output_attentions=True).attentions
    repetition = torch.arange(64)
    near = (repetition[None, :] <= repetition[:, None]) & (repetition[None, :] > repetition[:, None] - REPEAT_REACH)
    assert not near[-1, 0]  # the reach really leaves out the repetition's oldest tokens
    scaling = model.model.layers[0].self_attn.scaling
    for index, layer in enumerate(full.layers):
        queries, positions, outside = captured[index]
        assert (positions == -1).all() and outside.shape == queries.shape[:-1]
        keys = layer.keys.float().repeat_interleave(queries.shape[1] // layer.keys.shape[1], dim=1)
        context_lse = torch.logsumexp(queries @ keys.transpose(-1, -2) * scaling, dim=-1)
        share = torch.sigmoid(context_lse - outside)
        weights = attentions[index][:, :, -64:]
        context = weights[..., :64].sum(-1)
        counted = context + weights[..., 64:-64].sum(-1) + (weights[..., -64:] * near).sum(-1)
        torch.testing.assert_close(share, context / counted, rtol=0, atol=1e-4)
        assert 0.05 < float(share.mean()) < 0.95  # both parts really take attention


def test_global_ranking_weighs_attention_by_the_share_the_cache_gets(filled):
    """A query that reads as much outside the cache (its `outside` log-sum-exp) as in it gives every entry
    half the weight it would give reading the cache alone: the ranking scores halve, exactly."""
    from sparsemem.head_budgets import max_attention
    from sparsemem.modeling.compaction import LayerAttention

    model, _, full = filled
    layer, scaling = full.layers[0], model.model.layers[0].self_attn.scaling
    batch, kv_heads, entries, dim = layer.keys.shape
    queries = torch.randn(batch, model.config.num_attention_heads, 24, dim, generator=torch.Generator().manual_seed(0))
    span = torch.ones(entries, dtype=torch.bool)
    alone = max_attention(layer, queries, span, scaling, torch.full(queries.shape[:-1], float("-inf")))
    lse = LayerAttention.measure(layer, queries, scaling).lse  # per KV head, [B, G * n]
    outside = torch.cat([head.view(batch, -1, queries.shape[-2]) for head in lse], dim=1)
    halved = max_attention(layer, queries, span, scaling, outside)
    for ours, reference in zip(halved, alone):
        torch.testing.assert_close(ours, reference / 2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("window, reach", [(None, None), (None, 32), (48, None), (48, 32), (None, 1)])
def test_outside_log_sum_exp_in_chunks_matches_the_masked_dense_one(window, reach):
    """`causal_lse` only multiplies each chunk of queries by the keys it may see, each KV head by its group's
    queries at once; the result equals the log-sum-exp of the full masked logits (causal, sliding window,
    reach into the queries' own part) with every KV head's keys repeated for its query heads, in fp32."""
    from sparsemem.query_sources import causal_lse

    generator = torch.Generator().manual_seed(0)
    # two batch dims (as [L, B, ...]), 6 query heads over 2 KV heads
    queries, keys, offset = torch.randn(2, 1, 6, 300, 16, generator=generator), torch.randn(2, 1, 2, 320, 16, generator=generator), 20
    logits = queries.double() @ keys.double().repeat_interleave(3, dim=2).transpose(-1, -2) * 0.25
    index, at = torch.arange(320), offset + torch.arange(300)[:, None]
    seen = (index <= at) & ((index > at - window) if window else True)
    if reach is not None:
        seen &= (index > at - reach) | (index < offset)
    expected = torch.logsumexp(logits.masked_fill(~seen, float("-inf")), dim=-1).float()
    got = causal_lse(queries, keys, offset, 0.25, window, reach, chunk=64)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # queries at chosen indices of the keys' sequence (unsorted, some past the last key: they read every key
    # the mask lets through), in chunks that straddle them
    positions = torch.tensor([319, 20, 21, 150, 151, 152, 40, 330, 25, 299, 300, 64])
    picked = queries[..., :12, :]
    logits = picked.double() @ keys.double().repeat_interleave(3, dim=2).transpose(-1, -2) * 0.25
    at = positions[:, None]
    seen = (index <= at) & ((index > at - window) if window else True)
    if reach is not None:
        seen &= (index > at - reach) | (index < offset)
    expected = torch.logsumexp(logits.masked_fill(~seen, float("-inf")), dim=-1).float()
    got = causal_lse(picked, keys, offset, 0.25, window, reach, chunk=5, positions=positions)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_causal_lse_refuses_uneven_groups_and_misshapen_positions():
    from sparsemem.query_sources import causal_lse

    with pytest.raises(ValueError, match="5 query heads cannot share 2 KV heads"):
        causal_lse(torch.zeros(5, 4, 8), torch.zeros(2, 6, 8), 0, 1.0)
    with pytest.raises(ValueError, match="`positions` must give one index per query"):
        causal_lse(torch.zeros(4, 4, 8), torch.zeros(2, 6, 8), 0, 1.0, positions=torch.arange(3))
