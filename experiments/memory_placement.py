"""Where a long block store's selected memory is attended beyond the trained context (`memory_placement`).

SmolLM2-135M (8K trained context) reads `--tokens` of real text (the standard library's sources) with
sparse selection and nothing evicted, so the block store outgrows the trained window. Configurations:

- "dense (logical)": full attention at logical positions, what the model does without sparsemem.
- "sparse, cache": sparse selection, every block at its held rank (distances leave the trained range).
- "sparse, fixed": selected blocks, sinks and slots scored and attended at one distance (InfLLM).
- "sparse, ordered": the same position-free scoring, selected blocks packed in time order before the local
  window (ReAttention).
- "streaming-llm": constant memory, the sinks and the newest `--budget` tokens (online compaction).

Per length: the mean next-token loss over the tokens beyond the trained context ("beyond") and inside it,
and pass-key recall with the key at `--depths` of a prompt of that length (greedy answer contains the key).
One JSON line per (configuration, length) on stdout:

    python experiments/memory_placement.py --device cuda --dtype bfloat16 --tokens 16384 32768 \
        --depths 0.1 0.3 0.5 0.7 0.9 > reports/memory-placement-h100/results.jsonl
"""

import argparse
import json
import math
import platform
import time

import torch

import sparsemem
from harness import load_default_model
from sparsemem.corpus import load_corpus, passkey_case, token_window
from sparsemem.modeling.rope import trained_context

CONFIGS = {
    "dense (logical)": {"top_k_blocks": None, "block_fraction": None, "positions": "logical"},
    "sparse, cache": {"memory_placement": "cache"},
    "sparse, fixed": {"memory_placement": "fixed"},
    "sparse, ordered": {"memory_placement": "ordered"},
    "streaming-llm": {"top_k_blocks": None, "block_fraction": None, "online": "streaming-llm"},
}


def build(base, name: str, sparse: dict, budget: int):
    """(model, cache factory) of configuration `name`; `sparse`: the selection options of the sparse rows,
    `budget`: the entries streaming-llm keeps."""
    options = dict(CONFIGS[name])
    online = options.pop("online", None)
    if "memory_placement" in options:
        options = {**sparse, **options}
    model = sparsemem.convert(base, **options)

    def new_cache():
        if online is None:
            return sparsemem.SparseMemCache(model.config)
        compaction = sparsemem.OnlineCompaction(budget, keep_first=model.config.sink_tokens, method=online)
        return sparsemem.SparseMemCache(model.config, online=compaction)

    return model, new_cache


@torch.no_grad()
def read(model, cache, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Feed `ids` [1, n] through `cache` in chunks; the next-token losses [n - 1] (fp32)."""
    losses, last = [], None
    for start in range(0, ids.shape[1], chunk):
        part = ids[:, start : start + chunk]
        logits = model(part, past_key_values=cache).logits.float()
        if last is not None:
            losses.append(torch.nn.functional.cross_entropy(last[None], part[:, 0]))
        losses.append(torch.nn.functional.cross_entropy(logits[0, :-1], part[0, 1:], reduction="none"))
        last = logits[0, -1]
    return torch.cat([loss.reshape(-1) for loss in losses])


@torch.no_grad()
def answer(model, cache, ids: torch.Tensor, chunk: int, new_tokens: int = 8) -> list[int]:
    """Greedy answer of `new_tokens` tokens after reading the prompt `ids` through `cache`."""
    logits = None
    for start in range(0, ids.shape[1], chunk):
        logits = model(ids[:, start : start + chunk], past_key_values=cache).logits
    out = []
    for _ in range(new_tokens):
        token = logits[0, -1].argmax()
        out.append(int(token))
        logits = model(token.view(1, 1), past_key_values=cache).logits
    return out


def measure(model, new_cache, tokenizer, corpus, length: int, depths, chunk: int, window: int, device) -> dict:
    text = torch.tensor([token_window(tokenizer, corpus, length, offset=50000)], device=device)
    start = time.perf_counter()
    losses = read(model, new_cache(), text, chunk)
    read_seconds = time.perf_counter() - start
    found = []
    for depth in depths:
        case = passkey_case(tokenizer, corpus, length, depth, seed=0)
        ids = torch.tensor([case.input_ids], device=device)
        reply = tokenizer.decode(answer(model, new_cache(), ids, chunk))
        found.append({"depth": depth, "key": case.passkey, "answer": reply, "recalled": case.passkey in reply})
    beyond = losses[window - 1 :]  # targets at positions >= window
    result = {
        "tokens": length,
        "loss_within_window": round(losses[: window - 1].mean().item(), 4),
        "loss_beyond_window": round(beyond.mean().item(), 4) if beyond.numel() else None,
        "passkeys": f"{sum(f['recalled'] for f in found)}/{len(found)}",
        "passkey_cases": found,
        "read_seconds": round(read_seconds, 1),
    }
    if not all(math.isfinite(v) for v in (result["loss_within_window"], result["loss_beyond_window"] or 0.0)):
        raise FloatingPointError(f"non-finite loss at {length} tokens: {result}")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--chunk", type=int, default=1024, help="tokens per forward pass while reading")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--top-k-blocks", type=int, default=32)
    parser.add_argument("--sink-tokens", type=int, default=64)
    parser.add_argument("--local-tokens", type=int, default=2048)
    parser.add_argument("--scorer", default="minmax", help="block scorer of the sparse rows")
    parser.add_argument("--query-block-size", type=int, default=64,
                        help="queries sharing one selection in the sparse rows (0: each query selects its own)")
    parser.add_argument("--budget", type=int, default=4096, help="entries streaming-llm keeps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    base, tokenizer = load_default_model()
    base = base.to(device=args.device, dtype=getattr(torch, args.dtype))
    corpus = load_corpus()
    window = trained_context(base.config)
    sparse = dict(block_size=args.block_size, top_k_blocks=args.top_k_blocks, block_fraction=None,
                  sink_tokens=args.sink_tokens, local_tokens=args.local_tokens, positions="auto",
                  query_block_size=args.query_block_size or None, scorer=args.scorer)
    for name in args.configs:
        model, new_cache = build(base, name, sparse, args.budget)
        for length in args.tokens:
            row = measure(model, new_cache, tokenizer, corpus, length, args.depths, args.chunk, window, args.device)
            row.update(config=name, trained_context=window, device=args.device, dtype=args.dtype, machine=platform.machine(),
                       budget=args.budget, **sparse)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
