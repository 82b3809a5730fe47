"""Head-budget policies and query sources: the objects `compact` composes, against hand-computed allocations."""

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import ByteTokenizer, prefilled

import sparsemem
from sparsemem.head_budgets import (
    HEAD_BUDGETS, WHOLE_SPAN_SHARE, GlobalBudgets, ProportionalBudgets, UniformBudgets, allocate_by_scores, budget_policy,
)
from sparsemem.modeling.compaction import CompactionRecord, LayerAttention
from sparsemem.modeling.presses import make_press
from sparsemem.query_sources import (
    QUERY_SOURCES, ContextQueries, RandomQueries, RepeatQueries, SelfStudyQueries, capture_reference_queries,
    query_sources_for, resolve_query_sources,
)


def _layer(kv_heads: int):
    # what a per-layer policy reads of a cache layer: its KV heads
    return SimpleNamespace(keys=torch.zeros(1, kv_heads, 4, 8))


def test_uniform_budgets_split_evenly_with_the_remainder_to_the_first_heads():
    policy = UniformBudgets()
    assert policy.split(7, _layer(3), None, None, 1.0) == [3, 2, 2]
    assert policy.split(8, _layer(2), None, None, 1.0) == [4, 4]


def test_proportional_budgets_follow_the_attention_each_head_gives_the_span():
    # head 0 gives the span (first two entries) 0.6 of its attention, head 1 gives it 0.2
    phi = [torch.tensor([[[0.3, 0.3, 0.4, 0.0]]]), torch.tensor([[[0.1, 0.1, 0.4, 0.4]]])]
    attention = LayerAttention(phi, [None, None], [torch.zeros(1, 1)] * 2)
    span = torch.tensor([True, True, False, False])
    policy = ProportionalBudgets()
    # one each, then 8 split 3:1 -> 6 and 2
    assert policy.split(10, _layer(2), None, span, 1.0, attention) == [7, 3]
    # one each, then 7 split 3:1 = 5.25 and 1.75 -> 5 and 1, the remaining one to the larger remainder (head 1)
    assert policy.split(9, _layer(2), None, span, 1.0, attention) == [6, 3]


def test_global_budgets_rank_the_heads_of_all_layers_together():
    # four retrieval-like heads winning 8, 7, 6 and 5 of their 10 entries, six flat heads: two layers of five
    retrieval = [torch.cat([torch.full((n,), 0.9), torch.full((10 - n,), 0.001)]) for n in (8, 7, 6, 5)]
    flat = [torch.cat([torch.full((4,), 0.1 - 0.001 * i), torch.full((6,), 1e-4)]) for i in range(6)]
    scores = [retrieval + flat[:1], flat[1:]]
    # 5 slots per head in both layers: 50 in all; ranked, each head gets the entries it wins
    assert GlobalBudgets(whole_span_share=None).allocate(scores, [5, 5]) == [[8, 7, 6, 5, 4], [4, 4, 4, 4, 4]]
    # whole in order of share: 2, 3, 4 more slots (9 <= half of the 29 the others had); the fourth would take
    # 14 > half of 24; the flat heads pay the 9, lowest-ranked entries first
    assert GlobalBudgets(whole_span_share=0.5).allocate(scores, [5, 5]) == [[10, 10, 10, 5, 4], [4, 4, 1, 1, 1]]
    # allowed to take up to all the others had, the fourth is whole too: 10 left for the six flat heads, one
    # each, then the best four of the rest (flat 0's three, then flat 1's best)
    assert GlobalBudgets(whole_span_share=0.5, whole_span_take=1.0).allocate(scores, [5, 5]) == [[10, 10, 10, 10, 4], [2, 1, 1, 1, 1]]
    # one pooled ranking: the same counts as ranking the flattened heads
    assert GlobalBudgets(whole_span_share=0.5).allocate(scores, [5, 5]) == [
        allocate_by_scores(retrieval + flat, 50, whole_span_share=0.5)[:5], allocate_by_scores(retrieval + flat, 50, whole_span_share=0.5)[5:]]
    with pytest.raises(ValueError, match="for_press"):
        GlobalBudgets().allocate(scores, [5, 5])


def test_global_budgets_resolve_auto_whole_spans_for_the_press():
    assert GlobalBudgets().for_press(make_press("am")) == GlobalBudgets(whole_span_share=WHOLE_SPAN_SHARE)
    assert GlobalBudgets().for_press(make_press("am-no-beta")).whole_span_share == WHOLE_SPAN_SHARE
    for baseline in ("kvzip", "h2o", "snapkv", "streaming-llm"):
        assert GlobalBudgets().for_press(make_press(baseline)).whole_span_share is None
    assert GlobalBudgets(whole_span_share=0.3).for_press(make_press("h2o")).whole_span_share == 0.3
    assert UniformBudgets(chunk_size=8).for_press(make_press("am")) == UniformBudgets(chunk_size=8)


def test_each_policy_checks_its_own_options():
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ValueError, match="UniformBudgets `chunk_size`"):
            UniformBudgets(chunk_size=bad)
        with pytest.raises(ValueError, match="ProportionalBudgets `chunk_size`"):
            ProportionalBudgets(chunk_size=bad)
    for bad in (0, 1.5, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="GlobalBudgets `whole_span_share`"):
            GlobalBudgets(whole_span_share=bad)
    for bad in (0, -1, float("inf"), False, "half"):
        with pytest.raises(ValueError, match="GlobalBudgets `whole_span_take`"):
            GlobalBudgets(whole_span_take=bad)


def test_budget_policy_is_the_one_resolver_of_names_and_objects():
    assert list(HEAD_BUDGETS) == ["uniform", "proportional", "global"]
    assert budget_policy() == budget_policy(None) == budget_policy("global") == GlobalBudgets()
    assert budget_policy("uniform", chunk_size=64) == UniformBudgets(chunk_size=64)
    assert budget_policy("proportional") == ProportionalBudgets() != UniformBudgets()
    assert budget_policy("global", whole_span_share=None) == GlobalBudgets(whole_span_share=None)
    policy = UniformBudgets(chunk_size=8)
    assert budget_policy(policy) is policy
    with pytest.raises(ValueError, match="set them on it"):
        budget_policy(policy, chunk_size=16)
    with pytest.raises(ValueError, match="`budgets` must be one of"):
        budget_policy("even")
    with pytest.raises(ValueError, match=r"`chunk_size` is not an option of 'global'.*\['uniform', 'proportional'\]"):
        budget_policy("global", chunk_size=64)
    with pytest.raises(ValueError, match=r"`whole_span_share` is not an option of 'proportional'.*\['global'\]"):
        budget_policy("proportional", whole_span_share=0.5)
    with pytest.raises(ValueError, match="`ratio` is not an option.*no policy has it"):
        budget_policy("uniform", ratio=2)


@pytest.fixture(scope="module")
def filled():
    return prefilled("llama", 260, 240, top_k_blocks=None, block_size=8, sink_tokens=4, local_tokens=16)


def test_compact_records_the_policy_it_ran_and_the_record_round_trips(filled):
    model, ids, full = filled
    run = lambda **kw: sparsemem.compact(model, copy.deepcopy(full), ratio=5, input_ids=ids[:, :240], **kw).compaction  # noqa: E731
    chunked = run(budgets=UniformBudgets(chunk_size=64), keep_last=16)
    assert (chunked.head_budgets, chunked.chunk_size, chunked.whole_span_share, chunked.whole_span_take) == ("uniform", 64, None, None)
    assert chunked.slots_per_kv_head is None
    default = run()
    assert (default.head_budgets, default.chunk_size, default.whole_span_share, default.whole_span_take) == ("global", None, 0.45, 0.5)
    baseline = run(method="h2o", budgets=GlobalBudgets(whole_span_take=0.25))
    assert (baseline.head_budgets, baseline.whole_span_share, baseline.whole_span_take) == ("global", None, 0.25)
    assert run(budgets="proportional").head_budgets == "proportional"
    assert CompactionRecord.from_dict(chunked.to_dict()) == chunked
    # a policy object and its name compact alike
    by_name = sparsemem.compact(model, copy.deepcopy(full), ratio=5, input_ids=ids[:, :240], budgets="proportional")
    by_object = sparsemem.compact(model, copy.deepcopy(full), ratio=5, input_ids=ids[:, :240], budgets=ProportionalBudgets())
    for a, b in zip(by_name.layers, by_object.layers):
        assert torch.equal(a.slots.keys, b.slots.keys) and torch.equal(a.slots.beta, b.slots.beta)
    with pytest.raises(ValueError, match="`budgets` must be one of"):
        run(budgets="even")


def test_query_sources_resolve_names_and_objects_and_label_their_settings():
    assert list(QUERY_SOURCES) == ["context", "repeat", "self-study", "random"]
    assert resolve_query_sources(("context", RepeatQueries(reach=8))) == (ContextQueries(), RepeatQueries(reach=8))
    assert [s.label for s in resolve_query_sources(["repeat", "self-study", "random"])] == ["repeat", "self-study", "random"]
    assert RepeatQueries(reach=8).label == "repeat(reach=8)" and SelfStudyQueries(max_new_tokens=12).label == "self-study(max_new_tokens=12)"
    # the press's own sources, else the default; given ones win
    assert query_sources_for("kvzip") == (RepeatQueries(),)
    assert query_sources_for("h2o") == query_sources_for("snapkv") == (ContextQueries(),)
    assert query_sources_for("am") == (ContextQueries(),) and query_sources_for("am", default=("repeat",)) == (RepeatQueries(),)
    assert query_sources_for("kvzip", ("random",)) == (RandomQueries(),)
    for bad in ("repeat", (), ("echo",), [3]):
        with pytest.raises(ValueError, match="query source"):
            resolve_query_sources(bad)
    for bad in (0, True, "32"):
        with pytest.raises(ValueError, match="RepeatQueries `reach`"):
            RepeatQueries(reach=bad)
    with pytest.raises(ValueError, match="SelfStudyQueries `max_new_tokens`"):
        SelfStudyQueries(max_new_tokens=0)
    with pytest.raises(ValueError, match="RepeatQueries `prompt`"):
        RepeatQueries(prompt="")


def test_a_repeat_source_object_is_the_named_one_and_its_reach_is_honoured(filled):
    model, ids, full = filled
    context, tokenizer = ids[:, :240], ByteTokenizer()
    named = capture_reference_queries(model, context, ("repeat",), tokenizer)
    given = capture_reference_queries(model, context, (RepeatQueries(),), tokenizer)
    near = capture_reference_queries(model, context, (RepeatQueries(reach=1),), tokenizer)
    for layer in named:
        assert all(torch.equal(a, b) for a, b in zip(named[layer], given[layer]))
        assert torch.equal(named[layer][0], near[layer][0])  # the same queries ...
        # ... reading less of the repetition beyond the context: a smaller outside log-sum-exp
        assert bool((near[layer][2] <= named[layer][2] + 1e-5).all()) and not torch.equal(near[layer][2], named[layer][2])
    cache = sparsemem.compact(model, copy.deepcopy(full), ratio=6, queries=(RepeatQueries(reach=1),), reference_queries=near)
    assert cache.compaction.queries == ["repeat(reach=1)"]
