"""`sparsemem bench`: dense SDPA against the sparsemem fast paths on one CUDA GPU.

Sections (each optional):
- attention: one attention layer's prefill at Llama-3-8B's attention shape (32 query / 8 KV heads,
  d=128, bf16): dense causal SDPA against sparsemem (selection + FlexAttention, and the kernel alone).
- prefill: end-to-end chunked prefill of a Llama-3-8B-shaped model with random bf16 weights: plain
  transformers with SDPA against the same weights converted to sparsemem.
- decode: one layer's decode attention (dense SDPA against block-sparse decode), then decode steps of
  the 8B-shaped model over a filled 128K cache, at batch 1 and the largest batch dense fits.
- decode-small: SmolLM2-135M (real weights) decoding real text at batch 1, teacher-forced, for the model's default
  sparse settings and the GPU-sized configuration of the --small-* options, eager and with the static cache; then
  each configuration's pass keys and perplexity (`evaluation.evaluate_model`) on the same models: quality at the
  timed settings. Runs on CUDA, or on the CPU (`--device cpu`) without the CUDA-graph rows.
- stream (`--stream-tokens N`): a constant-memory stream of N real-text tokens through SmolLM2-135M (or
  `--model`) with the cache compacted online to `--stream-budget` entries per layer and KV head; records
  per-chunk peak memory, cache bytes and loss (see stream.py). Runs on CUDA or CPU.
Writes bench.json, bench.md and PNG plots to the output folder; timings are medians of CUDA-event runs
after warm-up (compilation excluded).
"""

import functools
import gc
import json
import logging
import platform
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from .atomic import write_text
from .machine import device_name, synchronize
from .modeling.modeling_sparsemem import CACHE_ARGUMENT
from .modeling.scorer import SCORER_KINDS as TRAINING_FREE_SCORERS

logger = logging.getLogger(__name__)

# decode-small: the GPU-sized configuration timed and evaluated next to the model's default settings (8-token
# blocks). On SmolLM2 at the section's 4096-token context (CPU, fp32; reports/bench-quality-cpu), 64-token blocks
# scored by 2-token sub-blocks answered the pass keys dense answers (6 of these 9 depths) at 13.7% density; by
# 4-token sub-blocks one fewer of 5. The --small-* options override each entry.
SMALL_TIMED_OPTIONS = dict(block_size=64, top_k_blocks=1, block_fraction=0.1, scorer="subminmax", scorer_sub_block=2)
SMALL_DEPTHS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)

LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, rope_theta=500000.0,
)


def cuda_time_ms(fn, warmup: int = 2, repeats: int = 5, calls: int = 1) -> float:
    """Median milliseconds per call of `fn()` between CUDA events, after `warmup` untimed calls.

    `calls` > 1 times that many calls issued back to back (as a model's consecutive layers issue
    them: the host prepares the next call while the GPU runs the last) and divides by it."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def _sparse_options(args, fraction: float) -> dict:
    return dict(
        block_size=args.block_size, query_block_size=args.block_size, sink_tokens=args.sink_tokens,
        local_tokens=args.local_tokens, top_k_blocks=1, block_fraction=fraction, query_chunk_size=512,
        scorer=args.scorer, scorer_sub_block=args.scorer_sub_block,
    )


def _bench_scorer(args):
    """The scorer of the attention, prefill and decode sections (`--scorer`, `--scorer-sub-block`)."""
    from .modeling.scorer import PooledKeyScorer

    try:
        return PooledKeyScorer(args.scorer, args.scorer_sub_block)
    except ValueError as error:
        raise ValueError(f"sparsemem bench --scorer {args.scorer} --scorer-sub-block {args.scorer_sub_block}: {error}") from None


@torch.no_grad()
def bench_attention(args) -> list[dict]:
    from .modeling.block_sparse import attended_pairs, block_sparse_attention, plan_block_sparse, run_flex

    heads, kv_heads, dim = 32, 8, 128
    scorer, scale = _bench_scorer(args), dim**-0.5
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows = []
    for total in args.contexts:
        gen = torch.Generator(device="cuda").manual_seed(total)
        q = torch.randn(1, heads, total, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, kv_heads, total, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(1, kv_heads, total, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
        k_rep, v_rep = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        torch.cuda.reset_peak_memory_stats()
        dense_ms = min(
            cuda_time_ms(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True)),
            cuda_time_ms(lambda: sdpa(q, k_rep, v_rep, is_causal=True)),
        )
        dense_stream_ms = min(
            cuda_time_ms(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True), calls=4),
            cuda_time_ms(lambda: sdpa(q, k_rep, v_rep, is_causal=True), calls=4),
        )
        del k_rep, v_rep
        dense_pairs = total * (total + 1) / 2
        rows.append(dict(context=total, method="dense SDPA", fraction=1.0, density=1.0, ms=dense_ms, kernel_ms=dense_ms,
                         stream_ms=dense_stream_ms, peak_gib=torch.cuda.max_memory_allocated() / 2**30))
        logger.info("attention %d dense %.2f ms", total, dense_ms)
        for fraction in args.densities:
            options = _sparse_options(args, fraction)
            torch.cuda.reset_peak_memory_stats()
            total_ms = cuda_time_ms(lambda: block_sparse_attention(q, k, v, scale, scorer, options))
            stream_ms = cuda_time_ms(lambda: block_sparse_attention(q, k, v, scale, scorer, options), calls=4)
            plan = plan_block_sparse(q, k, scorer, options)
            kernel_ms = cuda_time_ms(lambda: run_flex(q, k, v, plan, scale, need_lse=False))
            pairs = attended_pairs(plan.selected, 0, total, args.block_size, args.block_size, args.sink_tokens, args.local_tokens)
            density = float(pairs) / (dense_pairs * kv_heads)
            rows.append(dict(
                context=total, method="sparsemem", fraction=fraction, density=density, ms=total_ms, kernel_ms=kernel_ms,
                stream_ms=stream_ms, speedup=dense_ms / total_ms, kernel_speedup=dense_ms / kernel_ms,
                stream_speedup=dense_stream_ms / stream_ms,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30,
            ))
            logger.info("attention %d fraction %.4f: %.2f ms (kernel %.2f ms), density %.3f", total, fraction, total_ms, kernel_ms, density)
            del plan
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def _llama_8b(max_positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA3_8B, max_position_embeddings=max_positions)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def _prefill_seconds(model, ids, chunk: int, make_cache) -> tuple[float, float]:
    """Seconds of a chunked prefill of `ids` and the peak GPU memory (GiB) it reached."""
    cache = make_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for begin in range(0, ids.shape[1], chunk):
        model(input_ids=ids[:, begin : begin + chunk], **{CACHE_ARGUMENT: cache}, use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30
    del cache
    torch.cuda.empty_cache()
    return seconds, peak


@torch.no_grad()
def bench_prefill(args) -> list[dict]:
    from transformers import DynamicCache

    from . import SparseMemCache, convert

    longest = max(args.prefill_contexts)
    dense = _llama_8b(longest + 1)
    ids = torch.randint(0, LLAMA3_8B["vocab_size"], (1, longest), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    rows = []
    # warm-up: kernels, cuBLAS handles; for sparsemem every (chunk, cached length) shape is compiled here
    _prefill_seconds(dense, ids[:, : args.chunk], args.chunk, lambda: DynamicCache(config=dense.config))
    sparse_models = {f: convert(dense, **_sparse_options(args, f), attention_backend="flex") for f in args.prefill_densities}
    for fraction, model in sparse_models.items():
        start = time.perf_counter()
        _prefill_seconds(model, ids, args.chunk, lambda: SparseMemCache(model.config))
        logger.info("prefill warm-up (compilation) at fraction %.4f: %.1f s", fraction, time.perf_counter() - start)
    for total in args.prefill_contexts:
        seconds, peak = _prefill_seconds(dense, ids[:, :total], args.chunk, lambda: DynamicCache(config=dense.config))
        rows.append(dict(context=total, method="dense SDPA (transformers)", fraction=1.0, density=1.0, seconds=seconds, peak_gib=peak))
        logger.info("prefill %d dense: %.2f s", total, seconds)
        for fraction, model in sparse_models.items():
            model.reset_sparsemem_stats()
            seconds_sparse, peak = _prefill_seconds(model, ids[:, :total], args.chunk, lambda: SparseMemCache(model.config))
            density = model.sparsemem_stats()["prefill_density"]
            rows.append(dict(
                context=total, method="sparsemem", fraction=fraction, density=density, seconds=seconds_sparse,
                peak_gib=peak, speedup=seconds / seconds_sparse,
            ))
            logger.info("prefill %d fraction %.4f: %.2f s (density %.3f)", total, fraction, seconds_sparse, density)
    return rows


def copy_bandwidth_gbs() -> float:
    """Device memory bandwidth seen by a large copy (bytes read + written), GB/s."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), warmup=3, repeats=10)
    return 2 * src.numel() / ms / 1e6


@torch.no_grad()
def bench_decode_attention(args) -> list[dict]:
    from .modeling.block_decode import BlockSummaryCache, block_decode_attention

    heads, kv_heads, dim = 32, 8, 128
    scorer, scale = _bench_scorer(args), dim**-0.5
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows = []
    for total in args.decode_contexts:
        for batch in args.decode_batches:
            gen = torch.Generator(device="cuda").manual_seed(total + batch)
            q = torch.randn(batch, heads, 1, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
            k = torch.randn(batch, kv_heads, total, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
            v = torch.randn(batch, kv_heads, total, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
            dense_ms = cuda_time_ms(lambda: sdpa(q, k, v, enable_gqa=True), warmup=3, repeats=20)
            rows.append(dict(context=total, batch=batch, method="dense SDPA", fraction=1.0, density=1.0, ms=dense_ms))
            for fraction in args.densities:
                options = _sparse_options(args, fraction)
                summaries = BlockSummaryCache(args.block_size, args.scorer_sub_block)
                summaries.update(k)  # built as tokens arrive; a step only re-reads the newest block
                ms = cuda_time_ms(lambda: block_decode_attention(q, k, v, scale, scorer, options, summaries), warmup=3, repeats=20)
                _, attended = block_decode_attention(q, k, v, scale, scorer, options, summaries)
                density = float(attended) / (total * heads * batch)
                rows.append(dict(context=total, batch=batch, method="sparsemem", fraction=fraction, density=density, ms=ms,
                                 speedup=dense_ms / ms))
                logger.info("decode attention %d x%d fraction %.4f: %.3f ms vs dense %.3f ms", total, batch, fraction, ms, dense_ms)
            del q, k, v
            torch.cuda.empty_cache()
    return rows


def _filled_cache(cache, layers: int, batch: int, total: int, gen):
    shape = (batch, LLAMA3_8B["num_key_value_heads"], total, LLAMA3_8B["hidden_size"] // LLAMA3_8B["num_attention_heads"])
    for index in range(layers):
        k = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
        cache.update(k, v, index, {"cache_position": torch.arange(total, device="cuda")})
        del k, v
    return cache


class _StaticCacheLength:
    """transformers' `StaticCache` as `DecodeGraph` sees a cache: its length lives on the device only."""

    def __init__(self, cache):
        self.cache = cache

    def device_length(self) -> torch.Tensor:
        return self.cache.layers[0].cumulative_length.view(1)

    def get_seq_length(self) -> int:
        return int(self.cache.layers[0].cumulative_length)

    def rewind(self, length: int) -> None:
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(length)

    def advance(self, steps: int) -> None:
        pass  # a replay advanced the device-side length, the only one


class CapturedDenseStep:
    """transformers' model over its `StaticCache`, each one-token step replayed from a CUDA graph captured at the
    first one (`DecodeGraph`, as sparsemem's static cache is): dense attention with the launch overhead removed the
    same way (like compared with like); `compile`: the step compiled with `torch.compile` before the capture, as
    sparsemem's is with `StaticSparseMemCache(compile=True)` (gpt-fast style). Called as the model is; returns an
    object with `.logits`."""

    def __init__(self, model, compile: bool = False):
        self.model = model
        self.compile = compile
        self.cache = self.graph = None

    def __call__(self, input_ids, **kwargs):
        from .modeling.decode_graph import DecodeGraph

        cache = kwargs[CACHE_ARGUMENT]
        if input_ids.shape[1] != 1:  # a prompt: read eagerly, as generate would
            return self.model(input_ids=input_ids, **kwargs)
        if self.graph is None or self.cache is not cache:
            self.cache = cache
            forward = functools.partial(self.model, **{CACHE_ARGUMENT: cache}, logits_to_keep=1)
            self.graph = DecodeGraph(forward, _StaticCacheLength(cache), input_ids.shape[0], input_ids.device, compile=self.compile)
        return SimpleNamespace(logits=self.graph(input_ids))

    def release(self) -> None:
        self.cache = self.graph = None


def _release(*objects) -> None:
    """Free what a run held on the GPU: captured graphs keep their memory pools, and a cache and its captured
    step refer to each other (only a collection frees them)."""
    for item in objects:
        if hasattr(item, "release"):
            item.release()
    gc.collect()
    torch.cuda.empty_cache()


@torch.no_grad()
def bench_decode_model(args, bandwidth: float) -> list[dict]:
    from transformers import DynamicCache, StaticCache

    from . import SparseMemCache, StaticSparseMemCache, convert

    total, steps = args.decode_model_context, args.decode_steps
    dense = _llama_8b(total + steps + 8)
    layers = LLAMA3_8B["num_hidden_layers"]
    weight_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
    per_sequence = 2 * layers * LLAMA3_8B["num_key_value_heads"] * 128 * 2 * (total + steps)
    free = torch.cuda.mem_get_info()[0]
    largest = max(1, min(16, int((free - 8 * 2**30) // per_sequence)))
    sparse_models = {f: convert(dense, **_sparse_options(args, f), attention_backend="flex") for f in args.decode_model_densities}
    rows = []
    for batch in sorted({1, largest}):
        # what users compare with: transformers' static cache with its step captured, eager and compiled (gpt-fast
        # style: compiled, then captured in a CUDA graph)
        captured_dense = CapturedDenseStep(dense)
        compiled_dense = CapturedDenseStep(dense, compile=True)
        gen = torch.Generator(device="cuda").manual_seed(batch)
        ids = torch.randint(0, LLAMA3_8B["vocab_size"], (batch, steps + 3), device="cuda", generator=gen)
        static = lambda: StaticCache(config=dense.config, max_cache_len=total + steps + 8)  # noqa: E731
        runs = [("dense SDPA, StaticCache", dense, 1.0, static),
                ("dense SDPA, DynamicCache", dense, 1.0, lambda: DynamicCache(config=dense.config))]
        runs.append(("dense SDPA, StaticCache + CUDA graph", captured_dense, 1.0, static))
        if args.compile_dense:
            runs.append(("dense SDPA, StaticCache + torch.compile + CUDA graph", compiled_dense, 1.0, static))
        runs += [("sparsemem", m, f, lambda m=m: SparseMemCache(m.config)) for f, m in sparse_models.items()]
        for compiled in (False, True):
            name = "sparsemem, static cache + torch.compile + CUDA graph" if compiled else "sparsemem, static cache + CUDA graph"
            runs += [(name, m, f, lambda m=m, c=compiled: StaticSparseMemCache(m.config, max_cache_len=total + steps + 8, compile=c))
                     for f, m in sparse_models.items()]
        # the block store in pinned host memory, read in place over the bus (GPU memory: weights + summaries);
        # batch 1 only: a 128K batch-3 store would pin over 50 GB of host memory
        first_fraction, first_model = next(iter(sparse_models.items()))
        if batch == 1:
            runs.append(("sparsemem, block store in host memory", first_model, first_fraction,
                         lambda m=first_model: SparseMemCache(m.config, offload_blocks=True)))
        for method, model, fraction, make_cache in runs:
            try:
                cache = _filled_cache(make_cache(), layers, batch, total, gen)
                warmed = time.perf_counter()
                if hasattr(model, "reset_sparsemem_stats"):
                    model.reset_sparsemem_stats()
                for step in range(3):  # warm-up: kernels, buffers with room for the new tokens, graph capture
                    model(input_ids=ids[:, step : step + 1], **{CACHE_ARGUMENT: cache}, use_cache=True, logits_to_keep=1)
                warm_up_seconds = time.perf_counter() - warmed
                # a captured step counts nothing (no Python runs in a replay): its density is the warm-up's
                warm_density = model.sparsemem_stats()["decode_density"] if hasattr(model, "sparsemem_stats") else 1.0
                if hasattr(model, "reset_sparsemem_stats"):
                    model.reset_sparsemem_stats()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                for step in range(steps):
                    model(input_ids=ids[:, 3 + step - 1 : 3 + step], **{CACHE_ARGUMENT: cache}, use_cache=True, logits_to_keep=1)
                torch.cuda.synchronize()
                ms = (time.perf_counter() - start) * 1000 / steps
            except Exception as error:  # noqa: BLE001 - one method failing (memory, capture) must not end the section
                logger.warning("decode %s at batch %d failed: %s", method, batch, str(error)[:300])
                cache = None
                _release(model)
                continue
            density = model.sparsemem_stats()["decode_density"] if hasattr(model, "sparsemem_stats") else 1.0
            if density is None:
                density = warm_density
            kv_read = per_sequence * batch * density
            bound_ms = (weight_bytes + kv_read) / bandwidth / 1e6
            rows.append(dict(context=total, batch=batch, method=method, fraction=fraction, density=density, ms_per_step=ms,
                             tokens_per_s=batch * 1000 / ms, bound_ms=bound_ms, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                             warm_up_seconds=warm_up_seconds))
            logger.info("decode model %d x%d %s %.4f: %.2f ms/step (bound %.2f ms)", total, batch, method, fraction, ms, bound_ms)
            del cache
            _release(model)
        del compiled_dense, captured_dense
        torch._dynamo.reset()  # compiled steps of this batch's shapes
        _release()
    _speedups(rows)
    return rows


def _speedups(rows: list[dict]) -> None:
    """Each sparsemem row's speedup over the dense rows of its batch: eager StaticCache, DynamicCache, and the
    best dense time (compiled where it ran)."""
    for row in rows:
        base = [r for r in rows if r["batch"] == row["batch"] and r["method"].startswith("dense")]
        if base and row["method"].startswith("sparsemem"):
            row["speedup_vs_static"] = next((b["ms_per_step"] for b in base if b["method"].endswith("StaticCache")), float("nan")) / row["ms_per_step"]
            row["speedup_vs_dynamic"] = next((b["ms_per_step"] for b in base if "Dynamic" in b["method"]), float("nan")) / row["ms_per_step"]
            row["speedup_vs_best_dense"] = min(b["ms_per_step"] for b in base) / row["ms_per_step"]


def _decode_run(model, cache, ids: torch.Tensor, context: int) -> tuple[float, float, float]:
    """Prefill `ids[:, :context]`, then feed the following tokens one step at a time (teacher forcing).
    Returns (ms per step, mean NLL of the tokens the steps predict, seconds of the first three steps: warm-up,
    capture, compilation)."""
    model(input_ids=ids[:, :context], **{CACHE_ARGUMENT: cache}, use_cache=True, logits_to_keep=1)
    warm, steps = 3, ids.shape[1] - context - 1
    if steps <= warm:
        raise ValueError(f"decode-small needs more than {warm} steps (--small-steps), got {steps}")
    logits = []
    synchronize(ids.device)
    start = time.perf_counter()
    for step in range(steps):
        if step == warm:
            synchronize(ids.device)
            timed, warm_up = time.perf_counter(), time.perf_counter() - start
        at = context + step
        out = model(input_ids=ids[:, at : at + 1], **{CACHE_ARGUMENT: cache}, use_cache=True, logits_to_keep=1)
        logits.append(out.logits[:, -1])
    synchronize(ids.device)
    ms = (time.perf_counter() - timed) * 1000 / (steps - warm)
    targets = ids[:, context + 1 : context + 1 + steps]
    nll = torch.nn.functional.cross_entropy(torch.stack(logits, 1).float().flatten(0, 1), targets.flatten())
    if not torch.isfinite(nll):
        raise FloatingPointError("non-finite loss over the decode-small steps")
    return ms, float(nll), warm_up


def small_timed_options(args) -> dict:
    """`sparsemem.convert` options of decode-small's GPU-sized configuration, from the --small-* options. The
    sub-block defaults to SMALL_TIMED_OPTIONS' with the "subminmax" scorer and to none with the others; a
    combination the model does not implement is refused when the model is converted (`small_models`)."""
    sub_block = args.small_scorer_sub_block
    if sub_block is None and args.small_scorer == "subminmax":
        sub_block = SMALL_TIMED_OPTIONS["scorer_sub_block"]
    return dict(block_size=args.small_block_size, top_k_blocks=args.small_top_k_blocks,
                block_fraction=args.small_block_fraction, scorer=args.small_scorer, scorer_sub_block=sub_block)


def small_models(base, args) -> dict[str, torch.nn.Module]:
    """decode-small's configurations by name: "dense" (`base`), "default" (the model's default sparse settings,
    as a user gets them) and "GPU-sized" (`small_timed_options`). Each is converted once: the timed steps and the
    quality measurement run the same model."""
    from . import convert

    options = small_timed_options(args)
    try:
        timed = convert(base, **options)
    except ValueError as error:
        raise ValueError(f"sparsemem bench decode-small ({_small_flags(options)}): {error}") from None
    return {"dense": base, "default": convert(base), "GPU-sized": timed}


def _small_flags(options: dict) -> str:
    """`options` as the --small-* command-line options that give them (a sub-block of None: not given)."""
    spelled = {"top_k_blocks": "all", "block_fraction": "none"}
    return " ".join(f"--small-{name.replace('_', '-')} {spelled[name] if value is None else value}"
                    for name, value in options.items() if value is not None or name in spelled)


def check_small_options(args) -> None:
    """Refuse decode-small settings no sparsemem model runs before the model is loaded (the options' checks
    common to every family; `small_models` adds the family's own)."""
    from .modeling.configuration_sparsemem import SparseMemLlamaConfig

    options = small_timed_options(args)
    try:
        SparseMemLlamaConfig(**options)
    except ValueError as error:
        raise ValueError(f"sparsemem bench decode-small ({_small_flags(options)}): {error}") from None
    if args.small_ppl_length is not None and args.small_ppl_length < 0:
        raise ValueError(f"sparsemem bench --small-ppl-length must be >= 0 (0 skips the perplexity), got {args.small_ppl_length}")
    outside = [depth for depth in args.small_depths if not 0.0 <= depth <= 1.0]
    if outside:
        raise ValueError(f"sparsemem bench --small-depths must lie in [0, 1], got {outside}")


SETTING_NAMES = ("block_size", "scorer", "scorer_sub_block", "top_k_blocks", "block_fraction", "sink_tokens", "local_tokens")


def sparse_settings(model) -> dict:
    """The sparse settings `model` runs with, read back from its config (all None for a dense model)."""
    config = model.config
    if getattr(config, "block_size", None) is None:  # not a sparsemem model
        return dict.fromkeys(SETTING_NAMES)
    return {name: getattr(config, name) for name in SETTING_NAMES}


def settings_quality(models: dict, tokenizer, corpus, length: int, depths, ppl_length: int) -> list[dict]:
    """Quality of each model of `models` (name -> model) as `sparsemem eval retrieval` measures it
    (`evaluation.evaluate_model`): pass keys hidden at `depths` of `length`-token prompts (greedy answers) and the
    perplexity of `ppl_length` tokens of `corpus` (0: none), with the densities measured on them and the settings
    the model ran. One dict per model, in order."""
    from dataclasses import asdict

    from .evaluation import evaluate_model

    rows = []
    for name, model in models.items():
        report = evaluate_model(name, model, tokenizer, corpus, [length], list(depths), ppl_length)
        densities = [case.density for case in report.passkey if case.density is not None]
        rows.append(dict(
            configuration=name, **sparse_settings(model), passkeys_correct=sum(case.correct for case in report.passkey),
            passkeys=len(report.passkey), passkey_length=length,
            passkey_density=sum(densities) / len(densities) if densities else None, perplexity=report.perplexity,
            perplexity_tokens=report.perplexity_tokens, perplexity_density=report.perplexity_density,
            cases=[asdict(case) for case in report.passkey], seconds=report.seconds,
        ))
        logger.info("decode-small quality %s: pass keys %d/%d, perplexity %s", name, rows[-1]["passkeys_correct"],
                    rows[-1]["passkeys"], report.perplexity)
    return rows


@torch.no_grad()
def bench_decode_small(args) -> dict:
    """SmolLM2-135M (real weights, or `--model`) decoding real text at batch 1, where launching kernels, not
    reading bytes, bounds a step: plain transformers (eager, and StaticCache compiled) against sparsemem (eager,
    and its static cache with the step captured in a CUDA graph), for the model's default sparse settings and the
    GPU-sized configuration of the --small-* options. The steps are teacher-forced on the text, so the same run
    gives each method's loss on the tokens it predicted; then each configuration's pass keys (prompts as long as
    the timed context) and perplexity, measured on the same converted models (quality at the timed settings).

    On a CUDA device (default) the steps are timed between synchronisations in bf16; with `--device cpu` the
    section runs in fp32 without the CUDA-graph and compiled rows (the static cache then steps eagerly).
    Returns {"rows": timed rows, "quality": `settings_quality` rows, "failed": methods that raised}."""
    from transformers import DynamicCache, StaticCache

    from . import SparseMemCache, StaticSparseMemCache
    from .corpus import load_corpus, token_window
    from .default_model import load_model

    device = torch.device(args.device or "cuda")
    cuda = device.type == "cuda"
    _, tokenizer, base = load_model(args.model, str(device), "bfloat16" if cuda else "float32")
    corpus = load_corpus(args.stream_text)
    context, steps = args.small_context, args.small_steps
    ids = torch.tensor([token_window(tokenizer, corpus, context + steps + 1)], device=device)
    length = context + steps + 8
    models = small_models(base, args)  # options refused here, before anything is timed
    runs = [("dense", "transformers eager, DynamicCache", base, lambda: DynamicCache(config=base.config))]
    static = lambda: StaticCache(config=base.config, max_cache_len=length)  # noqa: E731
    if cuda and args.compile_dense:
        runs.append(("dense", "transformers, StaticCache + torch.compile + CUDA graph", CapturedDenseStep(base, compile=True), static))
    for name, sparse in models.items():
        if name == "dense":
            continue
        runs.append((name, "sparsemem eager, SparseMemCache", sparse, lambda m=sparse: SparseMemCache(m.config)))
        if cuda:
            runs += [(name, "sparsemem, static cache + CUDA graph", sparse,
                      lambda m=sparse: StaticSparseMemCache(m.config, max_cache_len=length)),
                     (name, "sparsemem, static cache + torch.compile + CUDA graph", sparse,
                      lambda m=sparse: StaticSparseMemCache(m.config, max_cache_len=length, compile=True))]
        else:
            runs.append((name, "sparsemem, static cache (eager steps)", sparse,
                         lambda m=sparse: StaticSparseMemCache(m.config, max_cache_len=length, cuda_graph=False)))
    rows, failed = [], []
    for configuration, method, model, make_cache in runs:
        if cuda and "compile" in method:
            torch._dynamo.reset()  # each configuration's step compiled afresh, not as a recompilation of the last
        try:
            if hasattr(model, "reset_sparsemem_stats"):
                model.reset_sparsemem_stats()
            ms, nll, warm_up = _decode_run(model, make_cache(), ids, context)
        except Exception as error:  # noqa: BLE001 - one method failing (e.g. compilation) must not end the section
            logger.warning("decode-small %s %s failed: %s", configuration, method, str(error)[:300])
            failed.append(dict(configuration=configuration, method=method, error=f"{type(error).__name__}: {str(error)[:300]}"))
            continue
        finally:
            _release(model)
        stats = model.sparsemem_stats() if hasattr(model, "sparsemem_stats") else {}
        rows.append(dict(configuration=configuration, context=context, steps=steps, batch=1, method=method,
                         ms_per_step=ms, tokens_per_s=1000 / ms, nll=nll, decode_density=stats.get("decode_density") or 1.0,
                         warm_up_seconds=warm_up, device=str(device)))
        logger.info("decode-small %s %s: %.2f ms/step, nll %.4f", configuration, method, ms, nll)
    eager = next((r["ms_per_step"] for r in rows if r["method"] == "transformers eager, DynamicCache"), None)
    for row in rows:
        if eager is not None:
            row["speedup_vs_transformers_eager"] = eager / row["ms_per_step"]
    ppl_length = context if args.small_ppl_length is None else args.small_ppl_length
    quality = settings_quality(models, tokenizer, corpus, context, args.small_depths, ppl_length)
    return {"rows": rows, "quality": quality, "failed": failed}


GPU_SECTIONS = ("attention", "prefill", "decode", "decode-small")


def render_markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [f"# sparsemem bench on {meta['gpu']}", "", f"torch {meta['torch']}, transformers {meta['transformers']}."]
    if any(report.get(key) for key in ("attention", "prefill", "decode_attention", "decode_model")):
        sub_blocks = f" (sub-blocks of {meta['scorer_sub_block']})" if meta.get("scorer_sub_block") else ""
        lines[-1] += (f" Block {meta['block_size']} (query blocks too), sinks {meta['sink_tokens']}, recent window "
                      f"{meta['local_tokens']}, scorer {meta['scorer']}{sub_blocks}. Density = attended (query, key) pairs / "
                      "dense causal pairs, measured.")
    lines.append("")
    if report.get("attention"):
        lines += ["## Attention prefill, one layer (32 q / 8 KV heads, d=128, bf16)", "",
                  "| context | method | block fraction | density | time ms | speedup | streamed ms | streamed speedup | kernel ms | kernel speedup |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in report["attention"]:
            stream = f"{r['stream_ms']:.2f} | {r.get('stream_speedup', 1.0):.2f}x" if "stream_ms" in r else "- | -"
            lines.append(
                f"| {r['context']} | {r['method']} | {r['fraction']:.4g} | {r['density']:.1%} | {r['ms']:.2f} | "
                f"{r.get('speedup', 1.0):.2f}x | {stream} | {r['kernel_ms']:.2f} | {r.get('kernel_speedup', 1.0):.2f}x |"
            )
        lines += ["", "time = selection (block summaries, scorer, top-k, BlockMask) + kernel, one call at a time (the GPU "
                  "waits while the host prepares the selection); streamed = four calls back to back, as a model's layers "
                  "issue them, per call; kernel = FlexAttention alone.", ""]
    if report.get("prefill"):
        lines += [f"## End-to-end prefill, Llama-3-8B-shaped model (random bf16 weights), {meta['chunk']}-token chunks", "",
                  "| context | method | block fraction | density | seconds | speedup | peak GiB |", "|---:|---|---:|---:|---:|---:|---:|"]
        for r in report["prefill"]:
            lines.append(
                f"| {r['context']} | {r['method']} | {r['fraction']:.4g} | {r['density']:.1%} | {r['seconds']:.2f} | "
                f"{r.get('speedup', 1.0):.2f}x | {r['peak_gib']:.1f} |"
            )
        lines.append("")
    if report.get("decode_attention"):
        lines += ["## Decode attention, one layer (32 q / 8 KV heads, d=128, bf16), one new token per sequence", "",
                  "| context | batch | method | block fraction | density | ms | speedup |", "|---:|---:|---|---:|---:|---:|---:|"]
        for r in report["decode_attention"]:
            lines.append(f"| {r['context']} | {r['batch']} | {r['method']} | {r['fraction']:.4g} | {r['density']:.1%} | "
                         f"{r['ms']:.3f} | {r.get('speedup', 1.0):.2f}x |")
        lines += ["", "sparsemem = scorer on cached block summaries + selection + Triton kernel over the selected blocks "
                  "+ anchors + LSE merge.", ""]
    if report.get("decode_model"):
        lines += [f"## Decode, Llama-3-8B-shaped model (random bf16 weights), copy bandwidth {meta.get('bandwidth_gbs', 0):.0f} GB/s", "",
                  "| context | batch | method | block fraction | density | ms/step | tokens/s | bound ms | step / bound | vs dense Static (eager) | vs dense Dynamic | vs best dense | peak GiB |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in report["decode_model"]:
            lines.append(
                f"| {r['context']} | {r['batch']} | {r['method']} | {r['fraction']:.4g} | {r['density']:.1%} | {r['ms_per_step']:.2f} | "
                f"{r['tokens_per_s']:.1f} | {r['bound_ms']:.2f} | {r['ms_per_step'] / r['bound_ms']:.2f} | {r.get('speedup_vs_static', 1.0):.2f}x | "
                f"{r.get('speedup_vs_dynamic', 1.0):.2f}x | {r.get('speedup_vs_best_dense', 1.0):.2f}x | {r['peak_gib']:.1f} |"
            )
        lines += ["", "bound = (weight bytes + attended KV bytes) / copy bandwidth: the step time a perfectly memory-bound "
                  "implementation would reach. DynamicCache (transformers' default) copies every layer's cache at each step; "
                  "StaticCache and SparseMemCache append in place. The row \"block store in host memory\" reads its selected blocks over the host bus, not from GPU memory: its bound column does not apply.", ""]
    if report.get("decode_small") or report.get("decode_small_quality"):
        lines += render_decode_small(report)
    if report.get("stream"):
        from .stream import render_stream_markdown

        lines += render_stream_markdown(report["stream"]["runs"], report["stream"]["meta"])
    lines += [f"command: `{meta['command']}`", ""]
    return "\n".join(lines)


def _percent(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def _settings_cells(q: dict) -> str:
    """Block, scorer, top-k / fraction and anchors of a `settings_quality` row, as table cells."""
    if q["block_size"] is None:
        return "- | dense (SDPA) | - | -"
    scorer = q["scorer"] + (f" (sub-blocks of {q['scorer_sub_block']})" if q["scorer_sub_block"] else "")
    top_k = "all" if q["top_k_blocks"] is None else q["top_k_blocks"]
    fraction = "-" if q["block_fraction"] is None else f"{q['block_fraction']:g}"
    return f"{q['block_size']} | {scorer} | {top_k} / {fraction} | {q['sink_tokens']} / {q['local_tokens']}"


def render_decode_small(report: dict) -> list[str]:
    """The decode-small section's markdown: the timed rows, then the quality of every configuration timed."""
    rows, quality = report.get("decode_small") or [], report.get("decode_small_quality") or []
    first = rows[0] if rows else {"context": quality[0]["passkey_length"], "steps": "-", "device": "-"}
    dtype = "bf16" if str(first.get("device", "cuda")).startswith("cuda") else "fp32"
    lines = [f"## Decode at batch 1, SmolLM2-135M (real weights, {dtype}), {first['context']}-token real-text prompt, "
             f"{first['steps']} teacher-forced steps", "",
             "| configuration | method | decode density | ms/step | tokens/s | vs transformers eager | loss (nats/token) | warm-up s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.get('configuration', 'default')} | {r['method']} | {r['decode_density']:.1%} | {r['ms_per_step']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r.get('speedup_vs_transformers_eager', float('nan')):.2f}x | {r['nll']:.4f} | "
                     f"{r['warm_up_seconds']:.1f} |")
    lines += ["", "Each step feeds the text's next token; loss = mean negative log-likelihood of the tokens the timed "
              "steps predicted, so speed and quality come from the same steps. Configurations: \"default\" = the "
              "model's default sparse settings, \"GPU-sized\" = the --small-* options (settings in the table below); "
              "warm-up = the first three steps (compilation, graph capture).", ""]
    for failure in report.get("decode_small_failed") or []:
        lines.append(f"- failed: {failure['configuration']}, {failure['method']}: {failure['error']}")
    if report.get("decode_small_failed"):
        lines.append("")
    if quality:
        tokens = quality[0]["perplexity_tokens"]
        lines += [f"### Quality at the timed settings ({quality[0]['passkey_length']}-token pass-key prompts, perplexity of "
                  f"{tokens or 'no'} tokens)", "",
                  "| configuration | block | scorer | top-k / fraction | sinks / recent | decode density (timed) | pass keys | "
                  "pass-key density | perplexity | perplexity density | pass key by depth |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for q in quality:
            timed = [r["decode_density"] for r in rows if r.get("configuration") == q["configuration"]]
            cases = " ".join(f"{c['depth']:g}:{'✓' if c['correct'] else '✗'}" for c in q["cases"])
            ppl = "-" if q["perplexity"] is None else f"{q['perplexity']:.3f}"
            lines.append(f"| {q['configuration']} | {_settings_cells(q)} | {_percent(timed[0] if timed else None)} | "
                         f"**{q['passkeys_correct']}/{q['passkeys']}** | {_percent(q['passkey_density'])} | {ppl} | "
                         f"{_percent(q['perplexity_density'])} | {cases} |")
        lines += ["", "Pass keys and perplexity as `sparsemem eval retrieval` measures them (`evaluate_model`: greedy "
                  "8-token answers, one forward pass for perplexity), on the converted models the timed rows ran. "
                  "Densities: attended (query head, key) pairs / dense causal pairs, counted by the attention function "
                  "(pass keys: prefill and answer steps, mean over cases). The eager and static-cache steps compute "
                  "the same function.", ""]
    return lines


def _save_context_plot(plt, fig, ax, path: Path, ylabel: str, title: str, log_y: bool, legend_size: int = 8) -> Path:
    """The common tail of the bench plots: log2 context axis, labels, legend, saved at 120 dpi."""
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plots(report: dict, folder: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no PNG plots (pip install matplotlib)")
        return []
    paths = []
    gpu = report["meta"]["gpu"]
    if report.get("attention"):
        fig, ax = plt.subplots(figsize=(6, 4))
        rows = report["attention"]
        for label, select in [("dense SDPA", lambda r: r["method"] == "dense SDPA")] + [
            (f"sparsemem {f:.4g} of blocks", lambda r, f=f: r["method"] == "sparsemem" and r["fraction"] == f)
            for f in sorted({r["fraction"] for r in rows if r["method"] == "sparsemem"}, reverse=True)
        ]:
            chosen = [r for r in rows if select(r)]
            ax.plot([r["context"] for r in chosen], [r["ms"] for r in chosen], marker="o", label=label)
        paths.append(_save_context_plot(plt, fig, ax, folder / "attention.png", "ms per layer",
                                        f"attention prefill, 32/8 heads d=128 bf16 ({gpu})", log_y=True))
    if report.get("prefill"):
        fig, ax = plt.subplots(figsize=(6, 4))
        rows = report["prefill"]
        for method, fraction in sorted({(r["method"], r["fraction"]) for r in rows}, key=lambda t: -t[1]):
            chosen = [r for r in rows if r["method"] == method and r["fraction"] == fraction]
            label = method if method != "sparsemem" else f"sparsemem {fraction:.4g} of blocks"
            ax.plot([r["context"] for r in chosen], [r["seconds"] for r in chosen], marker="o", label=label)
        paths.append(_save_context_plot(plt, fig, ax, folder / "prefill.png", "prefill seconds",
                                        f"Llama-3-8B-shaped prefill ({gpu})", log_y=False))
    if report.get("decode_attention"):
        fig, ax = plt.subplots(figsize=(6, 4))
        rows = report["decode_attention"]
        labels = sorted({(r["batch"], r["method"], r["fraction"]) for r in rows}, key=lambda t: (t[0], -t[2]))
        for batch, method, fraction in labels:
            chosen = [r for r in rows if (r["batch"], r["method"], r["fraction"]) == (batch, method, fraction)]
            name = method if method != "sparsemem" else f"sparsemem {fraction:.4g}"
            ax.plot([r["context"] for r in chosen], [r["ms"] for r in chosen], marker="o", label=f"batch {batch}: {name}")
        paths.append(_save_context_plot(plt, fig, ax, folder / "decode.png", "ms per layer and step",
                                        f"decode attention, 32/8 heads d=128 bf16 ({gpu})", log_y=True, legend_size=7))
    if report.get("stream"):
        from .stream import plot_stream

        path = plot_stream(report["stream"]["runs"], report["stream"]["meta"], folder / "stream.png")
        if path is not None:
            paths.append(path)
    return paths


def bench_stream(report: dict, args, save) -> None:
    """The stream section: one stream per method, the report saved after every chunk (and plotted now and then)."""
    from .stream import TokenStream, load_stream_model, stream

    started = time.perf_counter()
    model, tokenizer, meta = load_stream_model(args)
    section = report["stream"] = {"meta": meta, "runs": []}
    for method in args.stream_methods:
        time_limit = None
        if args.stream_time_limit is not None:  # one deadline for the section: later methods get what is left
            time_limit = max(0.0, args.stream_time_limit - (time.perf_counter() - started))
        entry = {"method": method, "budget": args.stream_budget, "chunk": args.stream_chunk, "records": [], "summary": {}}
        section["runs"].append(entry)

        def on_chunk(run, entry=entry):
            entry.update(records=run.records, summary=run.summary)
            save(plot=len(run.records) % 25 == 0)

        source = TokenStream(tokenizer, args.stream_text)
        meta["text"] = source.source
        run, _ = stream(
            model, tokenizer, args.stream_tokens, chunk=args.stream_chunk, budget=args.stream_budget, method=method,
            time_limit=time_limit, on_chunk=on_chunk, source=source, baseline=not args.stream_no_baseline,
            passkeys=args.stream_passkeys,
        )
        entry.update(records=run.records, summary=run.summary, stopped=run.stopped)
        logger.info("stream %s: %s", method, {k: v for k, v in run.summary.items() if not isinstance(v, dict)})
        save(plot=True)


def resolve_sections(args) -> list[str]:
    """`--sections` as given; by default the stream alone when `--stream-tokens` is given, else the GPU sections."""
    if args.sections is None:
        args.sections = ["stream"] if args.stream_tokens else list(GPU_SECTIONS)
    if "stream" in args.sections and not args.stream_tokens:
        args.stream_tokens = 1_000_000
    if args.output is None:
        args.output = "reports/stream" if args.sections == ["stream"] else "reports/bench"
    return args.sections


SMALL_CONTEXT, SMALL_STEPS = 4096, 256  # decode-small: prompt tokens, one-token steps

# options that some sections alone read, with their defaults: given to a run without those sections, they would
# be ignored
SECTION_OPTIONS = {
    "scorer_sub_block": ("--scorer-sub-block", None, ("attention", "prefill", "decode")),
    **{f"small_{name}": (f"--small-{name.replace('_', '-')}", value if name != "scorer_sub_block" else None, ("decode-small",))
       for name, value in SMALL_TIMED_OPTIONS.items()},
    "small_context": ("--small-context", SMALL_CONTEXT, ("decode-small",)),
    "small_steps": ("--small-steps", SMALL_STEPS, ("decode-small",)),
    "small_depths": ("--small-depths", list(SMALL_DEPTHS), ("decode-small",)),
    "small_ppl_length": ("--small-ppl-length", None, ("decode-small",)),
}


def check_section_options(args, sections: list[str]) -> None:
    """Refuse an option that no chosen section reads, and sparse settings the chosen sections cannot run, before
    anything is loaded."""
    for dest, (flag, default, readers) in SECTION_OPTIONS.items():
        value = getattr(args, dest, default)
        if value != default and not any(name in sections for name in readers):
            raise ValueError(f"sparsemem bench {flag} is read by the {'/'.join(readers)} section(s) alone, which this run "
                             f"does not include (--sections {' '.join(sections)})")
    if any(name in sections for name in ("attention", "prefill", "decode")):
        _bench_scorer(args)
    if "decode-small" in sections:
        check_small_options(args)


def _cuda_sections(args, sections: list[str]) -> list[str]:
    """The chosen sections that need a CUDA device (decode-small runs on the CPU with --device cpu)."""
    on_cpu = args.device is not None and torch.device(args.device).type == "cpu"
    return [n for n in sections if n in GPU_SECTIONS and not (n == "decode-small" and on_cpu)]


def run_bench(args, command: str) -> dict:
    sections = resolve_sections(args)
    check_section_options(args, sections)
    if _cuda_sections(args, sections) and not torch.cuda.is_available():
        raise ValueError(
            f"sparsemem bench sections {_cuda_sections(args, sections)} need a CUDA device (no GPU is visible "
            "to torch); the stream section (--stream-tokens N) and decode-small with --device cpu also run on the CPU"
        )
    import transformers

    meta = dict(
        gpu=device_name(getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")), torch=torch.__version__, transformers=transformers.__version__,
        host=platform.node(), block_size=args.block_size, sink_tokens=args.sink_tokens, local_tokens=args.local_tokens,
        scorer=args.scorer, scorer_sub_block=args.scorer_sub_block, chunk=args.chunk, command=command,
    )
    report = {"meta": meta}
    if args.kernel_options:
        from .modeling import block_sparse

        block_sparse.KERNEL_OPTIONS = dict(args.kernel_options)
        meta["kernel_options"] = block_sparse.KERNEL_OPTIONS
    folder = Path(args.output)
    folder.mkdir(parents=True, exist_ok=True)

    def save(plot: bool = False):
        write_text(folder / "bench.json", json.dumps(report, indent=2))
        write_text(folder / "bench.md", render_markdown(report))
        if plot:
            _plots(report, folder)

    if "attention" in args.sections:
        report["attention"] = bench_attention(args)
        save()
    if "prefill" in args.sections:
        report["prefill"] = bench_prefill(args)
        save()
    if "decode" in args.sections:
        meta["bandwidth_gbs"] = copy_bandwidth_gbs()
        report["decode_attention"] = bench_decode_attention(args)
        save()
        report["decode_model"] = bench_decode_model(args, meta["bandwidth_gbs"])
        save()
    if "decode-small" in args.sections:
        section = bench_decode_small(args)
        report["decode_small"], report["decode_small_quality"] = section["rows"], section["quality"]
        report["decode_small_failed"] = section["failed"]
        save()
    if "stream" in args.sections:
        bench_stream(report, args, save)
    save()
    report["plots"] = [str(p) for p in _plots(report, folder)]
    return report
