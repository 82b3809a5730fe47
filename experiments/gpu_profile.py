"""Where the time of one block-sparse attention call goes on CUDA (torch profiler tables; needs a GPU).

Measures, on random bf16 tensors of Llama-3-8B's attention shape (32 query / 8 KV heads, d=128, blocks of
128, 128 sinks, 256 recent tokens, minmax scorer):
- `decode`: one decode step of `block_decode_attention` over a `--context` (128K) cache at `--batch` (16)
  and block fraction 0.125: host time to enqueue, wall time per call, then the profiler's kernel table;
- `prefill`: `--context` (64K) queries at block fraction 0.1: planning (`plan_block_sparse`: scores and
  top-k), the kernel alone and the whole call in milliseconds, then the profiler's table of the planning.
- `step`: one whole decode step of a Llama-3-8B-shaped model (random bf16 weights, block fraction 0.125) over a
  `StaticSparseMemCache` filled to `--context` (128K) at `--batch` (1), replayed from its CUDA graph: ms per
  step, then the kernel table of the replays (what the step spends on weights, attention, selection);
  `--compile`: the step compiled before capture (`StaticSparseMemCache(compile=True)`); `--shape smollm2`:
  SmolLM2-135M's shape at the default sparse settings (8-token blocks);
- `widths`: the decode kernel at batch 1, 4 and 16 for each launch shape (`DecodeLaunch`); `--shape smollm2`: at
  SmolLM2's shape and default settings (8-token blocks, 4K context).

Prints the tables of `reports/bench-h100/decode_profile.md` and `prefill_profile.md` (kept there as the
output, in a fenced block):

    python experiments/gpu_profile.py decode > decode_profile.txt
    python experiments/gpu_profile.py prefill --context 65536 --batch 1 > prefill_profile.txt
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from sparsemem.bench import cuda_time_ms
from sparsemem.modeling.block_decode import BlockSummaryCache, block_decode_attention
from sparsemem.modeling.block_sparse import block_sparse_attention, plan_block_sparse, run_flex
from sparsemem.modeling.scorer import PooledKeyScorer

HEADS, KV_HEADS, DIM, BLOCK = 32, 8, 128, 128


def options(fraction: float) -> dict:
    return dict(block_size=BLOCK, query_block_size=BLOCK, sink_tokens=128, local_tokens=256, top_k_blocks=1,
                block_fraction=fraction, query_chunk_size=512)


def tensors(batch: int, queries: int, context: int):
    generator = torch.Generator(device="cuda").manual_seed(0)
    make = lambda heads, n: torch.randn(batch, heads, n, DIM, device="cuda", dtype=torch.bfloat16, generator=generator)  # noqa: E731
    return make(HEADS, queries), make(KV_HEADS, context), make(KV_HEADS, context)


def kernel_us(fn, names, calls: int = 20) -> float:
    """Mean device microseconds per call of `fn` spent in kernels whose names contain any of `names` (launch gaps
    of the host excluded)."""
    for _ in range(3):
        fn()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total = sum(event.device_time_total for event in profiler.key_averages() if any(name in event.key for name in names))
    return total / calls


def profile_table(fn, calls: int, rows: int) -> str:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return profiler.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)


@torch.no_grad()
def decode(batch: int, context: int) -> None:
    query, key, value = tensors(batch, 1, context)
    scorer, summaries, opts = PooledKeyScorer("minmax"), BlockSummaryCache(BLOCK), options(0.125)
    summaries.update(key)
    step = lambda: block_decode_attention(query, key, value, DIM**-0.5, scorer, opts, summaries)  # noqa: E731
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        step()
    enqueue = (time.perf_counter() - start) / 20 * 1000
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / 20 * 1000
    print(f"enqueue {enqueue:.3f} ms/call, wall {wall:.3f} ms/call")
    print(profile_table(step, calls=5, rows=12))


@torch.no_grad()
def widths(context: int, shape: str = "llama3-8b") -> None:
    """The decode kernel's time (tiles + merge) for each launch shape (`DecodeLaunch`: keys read per loop step,
    most steps per program) at batch 1, 4 and 16, on the selection a step makes: few programs each waiting on
    many loads leave the GPU's memory system idle at batch 1, many programs cost a wider merge."""
    from sparsemem.modeling.block_decode import DecodeLaunch, selected_tiles_attention, selection_budget

    if shape == "llama3-8b":
        heads, kv_heads, dim, block, sink, local, top_k, fraction = HEADS, KV_HEADS, DIM, BLOCK, 128, 256, 1, 0.125
        launches = [DecodeLaunch(128, steps) for steps in (1, 2, 4, 8)]
    else:  # SmolLM2-135M at its default sparse settings
        heads, kv_heads, dim, block, sink, local, top_k, fraction = 9, 3, 64, 8, 16, 64, 16, 0.195
        launches = [DecodeLaunch(keys, steps) for keys in (16, 32, 64, 128) for steps in (1, 2, 4, 8)]
    candidates = (context - 1 - local) // block - sink // block + 1
    budget = selection_budget(candidates, top_k, fraction)
    generator = torch.Generator(device="cuda").manual_seed(0)
    for batch in (1, 4, 16):
        make = lambda *size: torch.randn(*size, device="cuda", dtype=torch.bfloat16, generator=generator)  # noqa: E731
        query = make(batch, kv_heads, heads // kv_heads, dim)
        key, value = make(batch, kv_heads, context, dim), make(batch, kv_heads, context, dim)
        scores = torch.rand(batch, kv_heads, candidates, device="cuda", generator=generator)
        index = scores.topk(budget, dim=-1).indices + sink // block
        times = []
        for launch in launches:
            call = lambda: selected_tiles_attention(query, key, value, index, sink, local, dim**-0.5, block, torch.bfloat16, launch=launch)  # noqa: E731
            us = kernel_us(call, ("_decode_tiles_kernel", "_merge_splits_kernel"))
            times.append(f"({launch.keys_per_step} keys/step, <= {launch.steps_per_program} steps): {us:.1f} us")
        print(f"{shape}, batch {batch}, context {context}, {budget} blocks of {block}: " + "; ".join(times))
        del query, key, value


@torch.no_grad()
def prefill(batch: int, context: int) -> None:
    query, key, value = tensors(batch, context, context)
    scorer, opts = PooledKeyScorer("minmax"), options(0.1)
    print("plan ms", cuda_time_ms(lambda: plan_block_sparse(query, key, scorer, opts), warmup=3, repeats=10))
    print("total ms", cuda_time_ms(lambda: block_sparse_attention(query, key, value, DIM**-0.5, scorer, opts), warmup=3, repeats=10))
    plan = plan_block_sparse(query, key, scorer, opts)
    print("kernel ms", cuda_time_ms(lambda: run_flex(query, key, value, plan, DIM**-0.5, need_lse=False), warmup=3, repeats=10))
    print(profile_table(lambda: plan_block_sparse(query, key, scorer, opts), calls=3, rows=25))


SMOLLM2_135M = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True,
)


@torch.no_grad()
def step(batch: int, context: int, compile: bool = False, shape: str = "llama3-8b") -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsemem import StaticSparseMemCache, convert
    from sparsemem.bench import LLAMA3_8B

    dims = LLAMA3_8B if shape == "llama3-8b" else SMOLLM2_135M
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        base = LlamaForCausalLM(LlamaConfig(**dims, max_position_embeddings=max(context + 64, 8192))).eval()
    torch.set_default_dtype(torch.float32)
    # the 8B shape at the bench's speed settings; SmolLM2's shape at the defaults a user gets
    model = convert(base, **options(0.125), attention_backend="flex") if shape == "llama3-8b" else convert(base)
    cache = StaticSparseMemCache(model.config, max_cache_len=context + 64, compile=compile)
    generator = torch.Generator(device="cuda").manual_seed(0)
    kv_shape = (batch, dims["num_key_value_heads"], context, dims.get("head_dim", DIM))
    for layer in range(dims["num_hidden_layers"]):
        keys, values = (torch.randn(kv_shape, device="cuda", dtype=torch.bfloat16, generator=generator) for _ in range(2))
        cache.update(keys, values, layer)
    ids = torch.randint(0, dims["vocab_size"], (batch, 1), device="cuda", generator=generator)
    run = lambda: model(input_ids=ids, past_key_values=cache)  # noqa: E731
    for _ in range(3):  # capture
        run()
    print(f"{shape}, context {context}, batch {batch}: ms per step {cuda_time_ms(run, warmup=2, repeats=10):.3f}")
    print(profile_table(run, calls=5, rows=30))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("decode", "prefill", "step", "widths"))
    parser.add_argument("--compile", action="store_true", help="step: StaticSparseMemCache(compile=True)")
    parser.add_argument("--shape", choices=("llama3-8b", "smollm2"), default="llama3-8b",
                        help="step, widths: the model's shape (random bf16 weights); smollm2 runs the default sparse settings")
    parser.add_argument("--context", type=int, default=None, help="tokens (decode: 131072, prefill: 65536)")
    parser.add_argument("--batch", type=int, default=None, help="sequences (decode: 16, prefill: 1)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_profile.py profiles the CUDA kernels: no CUDA device is available")
    if args.mode == "decode":
        decode(args.batch or 16, args.context or 131072)
    elif args.mode == "step":
        step(args.batch or 1, args.context or 131072, compile=args.compile, shape=args.shape)
    elif args.mode == "widths":
        widths(args.context or (131072 if args.shape == "llama3-8b" else 4096), args.shape)
    else:
        prefill(args.batch or 1, args.context or 65536)


if __name__ == "__main__":
    main()
