import os

# no test needs the network; Hub code paths are exercised against local folders and offline caches
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

torch.set_num_threads(min(4, os.cpu_count() or 1))

_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)

# small random configs; Mistral and Qwen2 use a sliding window shorter than the test sequences
FAMILY_CONFIGS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 48}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": True, "sliding_window": 48, "max_window_layers": 1}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
}


def make_base_model(family: str, seed: int = 0, **overrides):
    config_class, model_class, extra = FAMILY_CONFIGS[family]
    torch.manual_seed(seed)
    config = config_class(**{**_COMMON, **extra, **overrides})
    model = model_class(config).eval()
    model.config._attn_implementation = "eager"
    return model


class ByteTokenizer:
    """Bytes as token ids (mod a tiny vocabulary): real text, tokenized in microseconds. Plain calls give
    {"input_ids": list} (a list of texts: a list of lists, as a fast tokenizer batches them);
    `return_tensors="pt"` an object with `input_ids` [1, n]. Counts its calls."""

    def __init__(self, vocab: int = 256):
        self.vocab = vocab
        self.calls = 0

    def __call__(self, text, add_special_tokens=False, return_tensors=None, verbose=True):
        from types import SimpleNamespace

        if isinstance(text, list) and return_tensors is None:
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        self.calls += 1
        ids = [byte % self.vocab for byte in text.encode()]
        return {"input_ids": ids} if return_tensors is None else SimpleNamespace(input_ids=torch.tensor([ids]))

    eos_token_id = 1

    def decode(self, ids, skip_special_tokens=False):
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


def perturb_learned_modules(model, scale: float = 0.5):
    """Give the learned modules trained-looking parameters (every term of the scorer then matters)."""
    from sparsemem.training.trainer import learned_modules

    with torch.no_grad():
        for module in learned_modules(model):
            for p in module.parameters():
                noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
                p.add_(noise.to(p.device, p.dtype) * scale)
    return model


def whole_and_stepwise_logits(model, ids, prefill: int):
    """(logits of one prefill of `ids`, logits of a prefill of the first `prefill` tokens then one token
    at a time through a SparseMemCache), each [T, vocab]."""
    import sparsemem

    with torch.no_grad():
        whole = model(ids).logits[0]
        cache = sparsemem.SparseMemCache(model.config)
        steps = [model(ids[:, :prefill], past_key_values=cache).logits[0]]
        steps += [model(ids[:, t : t + 1], past_key_values=cache).logits[0] for t in range(prefill, ids.shape[1])]
    return whole, torch.cat(steps)


def fast_and_reference_on_the_gpu(base, options: dict, ids, prefill: int, steps: int = 10):
    """Per backend ("auto", "reference"): (logits of a prefill of `prefill` tokens then `steps` decode steps,
    measured density), with trained-looking learned modules."""
    import sparsemem

    results = {}
    for backend in ("auto", "reference"):
        model = perturb_learned_modules(sparsemem.convert(base, **options, attention_backend=backend))
        with torch.no_grad():
            cache = sparsemem.SparseMemCache(model.config)
            first = model(ids[:, :prefill], past_key_values=cache).logits
            rest = [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(prefill, prefill + steps)]
        results[backend] = (torch.cat([first, *rest], dim=1).float(), model.sparsemem_stats()["density"])
    return results


def prefilled(family: str, total: int, context: int, **options):
    """A converted tiny model, `total` random token ids, and a SparseMemCache holding the first `context`."""
    import sparsemem

    model = sparsemem.convert(make_base_model(family), **options)
    ids = torch.randint(3, 256, (1, total), generator=torch.Generator().manual_seed(0))
    cache = sparsemem.SparseMemCache(model.config)
    with torch.no_grad():
        model(ids[:, :context], past_key_values=cache)
    return model, ids, cache


@pytest.fixture(params=sorted(FAMILY_CONFIGS))
def family(request):
    return request.param


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real default model (SmolLM2-135M-Instruct) as a cached safetensors folder."""
    from sparsemem.default_model import default_model_dir

    return default_model_dir()


def remote_code_loader(checks: str) -> str:
    """Source of a script run in a fresh interpreter where `import sparsemem` fails: it loads argv[1] with
    trust_remote_code, compares its logits with the `logits` of the safetensors file argv[2] (<= 1e-5),
    runs `checks` (Python with `model`, `ref`, `logits`, `diff` in scope) and prints OK."""
    head = """
import sys
sys.modules["sparsemem"] = None  # not importable here
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
source, reference = sys.argv[1], sys.argv[2]
ref = load_file(reference)
model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True, dtype=torch.float32).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    logits = model(ref["input_ids"]).logits
diff = (logits - ref["logits"]).abs().max().item()
assert diff <= 1e-5, diff
"""
    return head + checks + '\nprint("OK", type(model).__name__, diff)\n'
