"""`generate` continues a filled, compacted or loaded cache from the new tokens alone, and `ask` answers
many questions from one document without changing or copying its cache."""

import copy

import pytest
import torch
from conftest import ByteTokenizer, make_base_model, prefilled

import sparsemem
from sparsemem.documents import load_document, save_document

OPTIONS = dict(top_k_blocks=None, block_size=8, sink_tokens=4, local_tokens=16)
GREEDY = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)


class Tokenizer(ByteTokenizer):
    eos_token_id = 1

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


@pytest.fixture(scope="module")
def document():
    model, ids, cache = prefilled("llama", 260, 200, **OPTIONS)
    return model, ids, cache


def _compacted(model, ids, cache):
    cache = copy.deepcopy(cache)
    sparsemem.compact(model, cache, ratio=4, input_ids=ids[:, :200])
    return cache


@pytest.mark.parametrize("state", ["filled", "compacted", "loaded"])
@pytest.mark.parametrize("argument", ["past_key_values", "cache"])
def test_new_tokens_alone_continue_the_cache_as_the_whole_sequence_does(document, state, argument, tmp_path):
    model, ids, filled = document
    cache = filled if state == "filled" else _compacted(model, ids, filled)
    if state == "loaded":
        save_document(cache, model, tmp_path / "doc")
        cache = load_document(tmp_path / "doc", model)
    question = ids[:, 200:212]
    whole = model.generate(ids[:, :212], past_key_values=copy.deepcopy(cache), **GREEDY)
    alone = model.generate(question, **{argument: copy.deepcopy(cache)}, **GREEDY)
    assert alone.shape == (1, 12 + 8)
    assert torch.equal(alone, whole[:, 200:])
    if state == "filled":  # dense-equivalent options: the same as generating from the text with no cache
        assert torch.equal(whole, model.generate(ids[:, :212], **GREEDY))


def test_new_tokens_longer_than_the_cache_are_told_from_the_whole_sequence(document):
    model, ids, _ = document
    cache = sparsemem.SparseMemCache(model.config)
    with torch.no_grad():
        model(ids[:, :20], past_key_values=cache)
    longer = ids[:, 100:140]  # 40 new tokens after a 20-token cache: not the cached tokens first
    expected = model.generate(torch.cat([ids[:, :20], longer], dim=1), past_key_values=copy.deepcopy(cache), **GREEDY)
    assert torch.equal(model.generate(longer, past_key_values=copy.deepcopy(cache), **GREEDY), expected[:, 20:])
    cache.token_ids = None  # e.g. a cache filled from embeddings: ambiguous, so refused
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(longer, past_key_values=copy.deepcopy(cache), **GREEDY)
    mask = torch.ones(1, 60, dtype=torch.long)  # transformers' own way to say "new tokens only"
    assert torch.equal(model.generate(longer, past_key_values=cache, attention_mask=mask, **GREEDY), expected[:, 20:])


def test_crop_back_to_the_document_keeps_views_of_its_tensors(document):
    model, ids, filled = document
    cache = _compacted(model, ids, filled)
    original = [(layer.keys.clone(), layer.values.clone(), layer.positions.clone()) for layer in cache.layers]
    pointers = None
    for start in (200, 230, 200):  # the first answer moves the document into an append buffer, once
        with torch.no_grad():
            model(ids[:, start : start + 30], past_key_values=cache)
        cache.crop(200)
        assert cache.get_seq_length() == 200
        for layer, (keys, values, positions) in zip(cache.layers, original):
            assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
            assert torch.equal(layer.positions, positions)
        now = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers]
        assert pointers is None or now == pointers
        pointers = now


def test_ask_answers_as_a_fresh_copy_per_question_and_leaves_the_document(document, tmp_path):
    model, ids, filled = document
    tokenizer = Tokenizer()
    text = bytes(int(i) for i in ids[0, :200]).decode("latin-1")  # the document as text for the byte tokenizer
    context = tokenizer(text, return_tensors="pt").input_ids
    questions = ["What is the key?", "Who wrote it, and when was it written?", "Why?"]
    cache = sparsemem.read_document(model, tokenizer, context, ratio=4, save_to=tmp_path / "doc")
    expected = []
    for question in questions:
        q = tokenizer(question, return_tensors="pt").input_ids
        out = model.generate(q, past_key_values=copy.deepcopy(cache), **GREEDY)
        expected.append(tokenizer.decode(out[0, q.shape[1]:]))
    keys = [(layer.keys.clone(), layer.slots.keys.clone()) for layer in cache.layers]
    assert sparsemem.ask(model, tokenizer, cache, questions, **GREEDY) == expected
    assert cache.get_seq_length() == context.shape[1]
    assert all(torch.equal(layer.keys, k) and torch.equal(layer.slots.keys, s) for layer, (k, s) in zip(cache.layers, keys))
    # the same from text in one call, and from the saved document
    assert sparsemem.ask(model, tokenizer, context, questions, ratio=4, **GREEDY) == expected
    assert sparsemem.ask(model, tokenizer, load_document(tmp_path / "doc", model), questions, **GREEDY) == expected
    assert sparsemem.ask(model, tokenizer, cache, questions[0], **GREEDY) == expected[0]


def test_ask_refuses_what_it_cannot_honour(document):
    model, ids, filled = document
    tokenizer = Tokenizer()
    with pytest.raises(ValueError, match="num_beams"):
        sparsemem.ask(model, tokenizer, copy.deepcopy(filled), ["q"], num_beams=2)
    with pytest.raises(ValueError, match="already a cache"):
        sparsemem.ask(model, tokenizer, copy.deepcopy(filled), ["q"], ratio=4)
    with pytest.raises(ValueError, match="without a `ratio`"):
        sparsemem.ask(model, tokenizer, ids[:, :50], ["q"], compact_options={"budgets": "uniform"})
    with pytest.raises(ValueError, match="questions"):
        sparsemem.ask(model, tokenizer, ids[:, :50], [])


def _budgeted(model, ids, **kwargs):
    """Tokens and cache of a 60-token greedy generation, with the cache handed back."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=60, min_new_tokens=60, do_sample=False,
                         return_dict_in_generate=True, **kwargs)
    return out.sequences, out.past_key_values


def test_generation_config_budget_and_options_are_honoured_and_saved(tmp_path):
    from transformers import GenerationConfig

    from sparsemem.modeling.online_compaction import OnlineCompaction

    model = sparsemem.convert(make_base_model("qwen3"), top_k_blocks=None)
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    for method in ("am", "streaming-llm"):
        explicit = sparsemem.SparseMemCache(model.config, online=OnlineCompaction(32, keep_first=4, method=method))
        expected = model.generate(ids, past_key_values=explicit, attention_mask=torch.ones_like(ids), max_new_tokens=60,
                                  min_new_tokens=60, do_sample=False)
        config = GenerationConfig(max_kv_tokens=32, kv_compaction={"method": method})
        tokens, cache = _budgeted(model, ids, generation_config=config)
        assert torch.equal(tokens, expected)
        assert cache.online.method == method and cache.online.compactions == explicit.online.compactions > 0
        assert max(OnlineCompaction.physical_size(layer) for layer in cache.layers) <= 32
    # saved with the checkpoint (generation_config.json) and read back
    model.generation_config.max_kv_tokens = 32
    model.generation_config.kv_compaction = {"method": "streaming-llm"}
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = type(model).from_pretrained(tmp_path / "ckpt")
    assert reloaded.generation_config.max_kv_tokens == 32
    tokens, cache = _budgeted(reloaded, ids)
    assert torch.equal(tokens, expected) and cache.online.method == "streaming-llm"
    # the keyword overrides the generation config's budget
    _, cache = _budgeted(reloaded, ids, max_kv_tokens=48)
    assert cache.online.max_kv_tokens == 48


def test_generation_config_options_that_cannot_be_honoured_are_refused():
    from transformers import GenerationConfig

    model = sparsemem.convert(make_base_model("qwen3"), top_k_blocks=None)
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    cases = {
        "need `max_kv_tokens`": GenerationConfig(kv_compaction={"method": "am"}),
        "unknown `kv_compaction`": GenerationConfig(max_kv_tokens=32, kv_compaction={"methd": "am"}),
        "cache_implementation": GenerationConfig(max_kv_tokens=32, cache_implementation="static"),
        "integer >= 8": GenerationConfig(max_kv_tokens=4),
    }
    for message, config in cases.items():
        with pytest.raises(ValueError, match=message):
            model.generate(ids, generation_config=config, max_new_tokens=2)
    with pytest.raises(ValueError, match="not with a `past_key_values`"):
        model.generate(ids, generation_config=GenerationConfig(max_kv_tokens=32), max_new_tokens=2,
                       past_key_values=sparsemem.SparseMemCache(model.config))
