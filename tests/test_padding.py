"""Left padding: every row's sinks and blocks are counted from its first real token, so a padded row computes
what it computes alone (prefill, decode, query blocks, slots of blocks)."""

import pytest
import torch
from conftest import make_base_model

import sparsemem

# sparse enough that selection engages at these lengths: 2 blocks of 8 beyond 4 sinks and 16 recent tokens
SPARSE = dict(block_size=8, sink_tokens=4, local_tokens=16, top_k_blocks=2, block_fraction=None)
LENGTHS = (97, 60, 123, 75)


def _padded_batch(prompts, pad=0):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _prompts(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=generator).tolist() for n in LENGTHS]


@pytest.mark.parametrize("family,options", [
    ("llama", SPARSE),
    ("qwen2", SPARSE),  # a sliding window shorter than the prompts
    ("llama", {**SPARSE, "query_block_size": 16}),
    ("llama", {**SPARSE, "scorer": "learned"}),
])
@torch.no_grad()
def test_padded_rows_match_rows_alone_in_prefill_and_decode(family, options):
    model = sparsemem.convert(make_base_model(family), **options)
    prompts = _prompts()
    ids, mask = _padded_batch(prompts)
    width = ids.shape[1]
    cache = sparsemem.SparseMemCache(model.config)
    # RoPE positions from each row's first real token, as `generate` gives them
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    batch_logits = [model(ids, attention_mask=mask, position_ids=positions, past_key_values=cache).logits]
    step_ids = torch.randint(3, 256, (len(prompts), 3), generator=torch.Generator().manual_seed(1))
    for step in range(step_ids.shape[1]):
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], 1)
        positions = positions[:, -1:] + 1
        batch_logits.append(
            model(step_ids[:, step : step + 1], attention_mask=mask, position_ids=positions, past_key_values=cache).logits
        )
    batch_logits = torch.cat(batch_logits, 1)
    for row, prompt in enumerate(prompts):
        alone_cache = sparsemem.SparseMemCache(model.config)
        alone = [model(torch.tensor([prompt]), past_key_values=alone_cache).logits[0]]
        alone += [model(step_ids[row : row + 1, s : s + 1], past_key_values=alone_cache).logits[0] for s in range(3)]
        alone = torch.cat(alone)
        got = batch_logits[row, width - len(prompt) :]
        assert (got - alone).abs().max() < 1e-4, (row, (got - alone).abs().max())


@torch.no_grad()
def test_block_slots_with_padding_of_whole_blocks_match_and_other_padding_is_refused():
    model = sparsemem.convert(make_base_model("llama"), **SPARSE, block_slots=2)
    prompts = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (96, 80, 64)]
    ids, mask = _padded_batch(prompts)  # padded by 0, 16 and 32 tokens: whole blocks
    logits = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    for row, prompt in enumerate(prompts):
        alone = model(torch.tensor([prompt])).logits[0]
        assert (logits[row, ids.shape[1] - len(prompt) :] - alone).abs().max() < 1e-4
    ids, mask = _padded_batch([prompts[0], prompts[1][:75]])
    with pytest.raises(ValueError, match="multiple of block_size=8"):
        model(ids, attention_mask=mask)


@torch.no_grad()
def test_compaction_of_a_padded_batch_is_refused():
    model = sparsemem.convert(make_base_model("llama"), **SPARSE)
    ids, mask = _padded_batch(_prompts())
    cache, queries = sparsemem.prefill(model, ids, attention_mask=mask)
    with pytest.raises(ValueError, match="padded"):
        sparsemem.compact(model, cache, ratio=4, reference_queries=queries)
    with pytest.raises(ValueError, match="online compaction .* padded batch"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, max_kv_tokens=64, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    return tokenizer, model


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_left_padded_greedy_batch_equals_one_by_one(smollm2):
    from sparsemem.corpus import load_corpus, token_window

    tokenizer, base = smollm2
    # selection engages from ~100 tokens: 4 sinks, 32 recent tokens, 4 blocks of 8
    model = sparsemem.convert(base, block_size=8, sink_tokens=4, local_tokens=32, top_k_blocks=4, block_fraction=None)
    corpus = load_corpus()
    prompts = [token_window(tokenizer, corpus, n, offset=4000 * i + 700)
               for i, n in enumerate((150, 97, 131, 110, 172, 104, 141, 120))]
    pad = tokenizer.eos_token_id
    ids, mask = _padded_batch(prompts, pad)
    options = dict(max_new_tokens=5, do_sample=False, pad_token_id=pad)
    batch = model.generate(ids, attention_mask=mask, **options)[:, ids.shape[1] :]
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **options)
        assert batch[row].tolist() == alone[0, len(prompt) :].tolist(), row


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_left_padding_keeps_the_kl_to_dense(smollm2):
    """The issue's case: a 410-token prompt left-padded by 110 tokens, default options."""
    from sparsemem.corpus import load_corpus, token_window

    tokenizer, base = smollm2
    model = sparsemem.convert(base)
    prompt = token_window(tokenizer, load_corpus(), 410, offset=9000)
    dense = base(torch.tensor([prompt])).logits[0].log_softmax(-1)
    plain = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    ids, mask = _padded_batch([prompt, prompt + prompt[:110]], tokenizer.eos_token_id)
    padded = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[0, 110:].log_softmax(-1)

    def kl(logp):
        return (dense.exp() * (dense - logp)).sum(-1).mean().item()

    assert kl(plain) > 1e-3  # sparse attention engaged
    assert kl(padded) <= 1.5 * kl(plain), (kl(padded), kl(plain))
