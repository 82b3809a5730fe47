"""`sparsemem` command line: demo, eval, bench, memory, calibrate, export and push."""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from .arguments import check_arguments, head_budgets
from .bench import GPU_SECTIONS as BENCH_SECTIONS
from .bench import SMALL_CONTEXT, SMALL_DEPTHS, SMALL_STEPS, SMALL_TIMED_OPTIONS, TRAINING_FREE_SCORERS
from .machine import model_label, run_info
from .memory_bank import REREAD_CONTEXT, REREADS, STORES
from .modeling.configuration_sparsemem import OPTION_NAMES, SCORERS, SparseMemOptions
from .modeling.modeling_sparsemem import CACHE_ARGUMENT
from .modeling.placement import PLACEMENTS

logger = logging.getLogger("sparsemem")

class HELP(argparse.ArgumentDefaultsHelpFormatter):
    """Every --help shows the defaults, except where the help text already describes the default."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default" in text or action.required else super()._get_help_string(action)


SUITES = ("retrieval", "compaction", "online", "scorer", "ruler", "memory")


def _top_k(value: str):
    if value in ("all", "none", "None"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--top-k-blocks expects an integer or 'all', got {value!r}") from None


def _share(option: str, auto: bool = False):
    """argparse type for `option`: a number in (0, 1], 'none' (None) and, with `auto`, 'auto'."""
    words = ", 'auto' or 'none'" if auto else " or 'none'"

    def parse(value: str):
        if value in ("none", "None"):
            return None
        if auto and value == "auto":
            return value
        try:
            return float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} expects a number in (0, 1]{words}, got {value!r}") from None

    return parse


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="local folder or Hub repo id (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--text", nargs="*", default=None, help="text files for the haystack (default: Python reference docs)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model weights' dtype")
    defaults = SparseMemOptions()
    parser.add_argument("--block-size", type=int, default=defaults.block_size, help="tokens per block of the block store")
    parser.add_argument("--sink-tokens", type=int, default=defaults.sink_tokens, help="first tokens always attended")
    parser.add_argument("--local-tokens", type=int, default=defaults.local_tokens, help="newest tokens always attended")
    parser.add_argument("--top-k-blocks", type=_top_k, default=defaults.top_k_blocks, help="integer, or 'all' for every block")
    parser.add_argument("--block-fraction", type=_share("--block-fraction"), default=defaults.block_fraction,
                        help="attend this fraction of each query's blocks, at least --top-k-blocks ('none' to use the count alone)")
    parser.add_argument("--scorer", default=defaults.scorer, choices=list(SCORERS), help="block scorer")
    parser.add_argument("--scorer-sub-block", type=int, default=defaults.scorer_sub_block,
                        help="tokens per sub-block of --scorer subminmax (a block scores its best sub-block's bound)")
    parser.add_argument("--block-slots", type=int, default=defaults.block_slots,
                        help="consolidate every complete block into this many slots that answer it when unselected")
    parser.add_argument("--memory-placement", default=defaults.memory_placement, choices=list(PLACEMENTS),
                        help="where selected memory is attended once the cache outgrows the trained context")


def _options(args) -> dict:
    return {name: getattr(args, name) for name in OPTION_NAMES if hasattr(args, name)}


def _load(args):
    from .default_model import load_model

    return load_model(args.model, args.device, args.dtype)


def _kv_bytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers if layer.keys is not None)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024


@torch.no_grad()
def cmd_demo(args) -> int:
    from transformers import DynamicCache

    from . import SparseMemCache, convert
    from .corpus import load_corpus, passkey_case

    path, tokenizer, base = _load(args)
    corpus = load_corpus(args.text)
    case = passkey_case(tokenizer, corpus, args.length, args.depth, seed=args.seed)
    ids = torch.tensor([case.input_ids], device=base.device)
    print(f"model: {path}")
    print(f"document: {len(case.input_ids)} tokens of {corpus.source}; pass key {case.passkey} hidden at depth {args.depth:.0%}")
    generate = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)

    start = time.perf_counter()
    dense_cache = DynamicCache(config=base.config)
    out = base.generate(ids, **{CACHE_ARGUMENT: dense_cache}, **generate)
    dense_answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    dense_seconds = time.perf_counter() - start

    sparse = convert(base, **_options(args))
    start = time.perf_counter()
    sparse_cache = SparseMemCache(sparse.config)
    out = sparse.generate(ids, past_key_values=sparse_cache, **generate)
    sparse_answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    sparse_seconds = time.perf_counter() - start
    stats = sparse.sparsemem_stats()
    tiers = sparse_cache.memory_bytes()

    dense_bytes = _kv_bytes(dense_cache)
    print()
    print(f"dense     answer: {dense_answer.strip()!r:24} {'correct' if case.passkey in dense_answer else 'WRONG'}")
    print(f"          attention density 100%   KV held {_fmt_bytes(dense_bytes)}   ({dense_seconds:.1f} s)")
    print(f"sparsemem answer: {sparse_answer.strip()!r:24} {'correct' if case.passkey in sparse_answer else 'WRONG'}")
    print(
        f"          attention density {stats['density']:.1%} (prefill {stats['prefill_density']:.1%}, "
        f"decode {stats['decode_density']:.1%})   ({sparse_seconds:.1f} s)"
    )
    print(
        f"          KV held {_fmt_bytes(tiers['total'])}: anchors {_fmt_bytes(tiers['anchors'])}, "
        f"block store {_fmt_bytes(tiers['block_store'])}, slots {_fmt_bytes(tiers['slots'])}"
    )
    print(f"          KV read per decode step ~{_fmt_bytes(stats['decode_density'] * dense_bytes)} (dense reads {_fmt_bytes(dense_bytes)})")
    print(f"options: {_options(args)}")
    return 0


def cmd_eval(args) -> int:
    if args.suite == "memory":
        return cmd_eval_memory(args)
    if args.suite == "compaction":
        return cmd_eval_compaction(args)
    if args.suite == "scorer":
        return cmd_eval_scorer(args)
    if args.suite == "online":
        return cmd_eval_online(args)
    if args.suite == "ruler":
        return cmd_eval_ruler(args)
    from . import convert
    from .corpus import load_corpus
    from .evaluation import evaluate_model, render_markdown, write_reports

    path, tokenizer, base = _load(args)
    corpus = load_corpus(args.text)
    sparse = convert(base, **_options(args))
    reports = []
    for name, model in (("dense", base), ("sparsemem", sparse)):
        logger.info("evaluating %s", name)
        reports.append(evaluate_model(name, model, tokenizer, corpus, args.lengths, args.depths, args.ppl_length))
    meta = {
        "model": model_label(args.model, path),
        "corpus": f"{corpus.source} (sha256 {corpus.sha256})",
        "options": _options(args),
        **run_info(args.dtype, base),
    }
    json_path, md_path = write_reports(reports, meta, Path(args.output))
    print(render_markdown(reports, meta))
    print(f"wrote {json_path} and {md_path}")
    return 0


def cmd_eval_compaction(args) -> int:
    from . import convert
    from .corpus import load_corpus
    from .evaluation_compaction import DEFAULT_METHODS, evaluate_compaction, render_compaction_markdown, write_compaction_report

    path, tokenizer, base = _load(args)
    # compaction is measured with every remaining block attended: the slots are the only approximation
    model = convert(base, **{**_options(args), "top_k_blocks": None, "block_fraction": None})
    results, meta = evaluate_compaction(
        model, tokenizer, load_corpus(args.text), methods=args.methods or DEFAULT_METHODS, ratios=args.ratios,
        length=args.context_tokens, continuation=args.continuation_tokens, queries=tuple(args.queries),
        budgets=head_budgets(args), documents=args.documents, progress=Path(args.output) / "progress.jsonl",
        on_policy=args.on_policy, needle_depths=tuple(args.needle_depths), needle_wording=args.needle_wording,
    )
    meta.update({"model": model_label(args.model, path), **run_info(args.dtype, base)})
    paths = write_compaction_report(results, meta, Path(args.output))
    print(render_compaction_markdown(results, meta))
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def cmd_eval_scorer(args) -> int:
    from .training.evaluation import evaluate_scorer, render_markdown

    if not args.run:
        raise ValueError("eval scorer needs --run RUN_DIR (a calibration output folder)")
    fraction = args.block_fraction if args.block_fraction is not None else 0.1
    report = evaluate_scorer(args.run, lengths=args.lengths, block_fraction=fraction, device=args.device,
                             dtype=args.dtype, output=args.output if args.output != "reports/eval" else None,
                             max_windows=args.max_windows, block_masses=args.block_masses)
    print(render_markdown(report))
    return 0


def cmd_calibrate(args) -> int:
    from .training import load_recipe, train
    from .training.evaluation import evaluate_scorer, render_markdown

    recipe = load_recipe(args.recipe)
    if args.output_dir:
        recipe.output_dir = args.output_dir
    output = train(recipe, resume=not args.no_resume)
    if recipe.eval is not None and not args.skip_eval:
        from accelerate import PartialState

        if PartialState().is_main_process:
            report = evaluate_scorer(output, recipe.eval.lengths, recipe.eval.block_fraction, dtype=recipe.dtype)
            print(render_markdown(report))
    print(f"calibration written to {output}")
    return 0


def cmd_export(args) -> int:
    from .training.export import export

    full, modules = export(args.run, args.output, repo_id=args.repo_id, base_model=args.base_model,
                           card_template=args.card_template, dtype=args.dtype)
    print(f"wrote {full} (full weights) and {modules} (modules only)")
    return 0


def cmd_push(args) -> int:
    from .push import PushError, push

    try:
        url = push(args.folder, args.repo_id, private=args.private, token=args.token, revision=args.revision)
    except PushError as error:
        print(f"sparsemem push: error: {error}", file=sys.stderr)
        return 3
    print(f"pushed to {url}")
    return 0


def cmd_bench(args) -> int:
    from .bench import render_markdown, run_bench

    report = run_bench(args, "sparsemem " + " ".join(sys.argv[1:]))
    print(render_markdown(report))
    print(f"wrote {args.output}/bench.json, bench.md" + "".join(f", {Path(p).name}" for p in report["plots"]))
    return 0


def cmd_eval_online(args) -> int:
    from . import convert
    from .corpus import load_corpus
    from .evaluation_compaction import ONLINE_METHODS, evaluate_online, render_online_markdown, write_online_report

    path, tokenizer, base = _load(args)
    model = convert(base, **{**_options(args), "top_k_blocks": None, "block_fraction": None})
    results, meta = evaluate_online(
        model, tokenizer, load_corpus(args.text), methods=args.methods or ONLINE_METHODS, budgets=args.budgets,
        context=args.context_tokens, steps=args.decode_tokens,
    )
    meta.update({"model": model_label(args.model, path), **run_info(args.dtype, base)})
    paths = write_online_report(results, meta, Path(args.output))
    print(render_online_markdown(results, meta))
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def cmd_eval_ruler(args) -> int:
    from . import convert
    from .corpus import load_corpus
    from .evaluation_ruler import evaluate_ruler, export_lm_eval, make_samples, read_progress, render_ruler_markdown, write_ruler_report

    corpus = load_corpus(args.text)
    if args.export_lm_eval:  # the prompts alone: only the tokenizer is needed
        from transformers import AutoTokenizer

        from .default_model import resolve_model

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
        samples = make_samples(tokenizer, corpus, args.tasks, args.lengths, args.samples, seed=args.seed)
        paths = export_lm_eval(samples, tokenizer, Path(args.export_lm_eval))
        print(f"wrote {len(paths)} files of lm-eval tasks to {args.export_lm_eval} (group sparsemem_ruler)")
        return 0
    defaults = SparseMemOptions()
    if (args.top_k_blocks, args.block_fraction) != (defaults.top_k_blocks, defaults.block_fraction):
        raise ValueError("--top-k-blocks/--block-fraction: eval ruler attends every entry the cache keeps, so "
                         "compaction is the only approximation measured; leave them at their defaults")
    path, tokenizer, base = _load(args)
    samples = make_samples(tokenizer, corpus, args.tasks, args.lengths, args.samples, seed=args.seed)
    # as in the compaction suite: every remaining entry attended, so compaction is the only approximation
    options = {**_options(args), "top_k_blocks": None, "block_fraction": None}
    model = convert(base, **options)
    meta = {"model": model_label(args.model, path), "corpus": f"{corpus.source} (sha256 {corpus.sha256})",
            "tasks": list(args.tasks), "lengths": list(args.lengths), "samples": args.samples, "seed": args.seed,
            "am_queries": list(args.queries), "options": options, **run_info(args.dtype, base)}
    progress = Path(args.output) / "progress.jsonl"
    done = []
    if args.resume and progress.is_file():
        done = read_progress(progress, meta)
    results = evaluate_ruler(model, tokenizer, samples, methods=args.methods, ratios=args.ratios,
                             queries=tuple(args.queries), progress=progress, meta=meta, done=done)
    paths = write_ruler_report(results, meta, Path(args.output))
    print(render_ruler_markdown(results, meta))
def _memory_model(args, folder=None):
    """(path, tokenizer, model) for a memory command; without --model, `ask`/`info` load the bank's own model."""
    if args.model is None and folder is not None:
        from .memory_bank import read_manifest

        recorded = read_manifest(Path(folder)).get("model")
        if recorded:
            args.model = recorded
    return _load(args)


def _bank_options(args) -> dict:
    return {"top_k": args.top_k, "selection": args.selection}


def cmd_memory(args) -> int:
    from .memory_bank import MemoryBank

    if args.memory_command == "ingest":
        paths = [Path(p) for p in args.paths]
        for path in paths:
            if not path.exists():
                raise FileNotFoundError(f"{path} does not exist")
        _, tokenizer, model = _memory_model(args)
        bank = MemoryBank.create(args.bank, model, tokenizer, chunk_tokens=args.chunk_tokens, ratio=args.ratio,
                                 piece_tokens=args.piece_tokens, batch_tokens=args.batch_tokens,
                                 routing_layers=args.routing_layers, routing_pool=args.routing_pool,
                                 whole_span_share=args.whole_span_share, store=args.store, reread=args.reread,
                                 reread_context=args.reread_context, exist_ok=True)
        stats = bank.add(paths, progress=True)
        logger.warning("ingested %d documents (%d tokens, %.0f tokens/s); %d already in the bank", stats["documents"],
                       stats["tokens"], stats["tokens_per_second"], stats["skipped"])
        return 0
    _, tokenizer, model = _memory_model(args, args.bank)
    if args.memory_command == "info":
        import json

        print(json.dumps(MemoryBank.open(args.bank, model, tokenizer, verify=not args.no_verify).info(), indent=2))
        return 0
    bank = MemoryBank.open(args.bank, model, tokenizer, verify=not args.no_verify, selection=args.selection)
    result = bank.ask(args.question, max_new_tokens=args.max_new_tokens, top_k=args.top_k,
                      refresh_every=args.refresh_every, query_tokens=args.query_tokens,
                      min_relative_score=args.min_relative_score)
    print(result["answer"].strip())
    print()
    print("documents read:")
    for name in result["documents"]:
        print(f"  {name}")
    logger.warning("time to first token %.3f s, %d memory positions", result["seconds_to_first_token"], result["memory_positions"])
    return 0


def cmd_eval_memory(args) -> int:
    from .evaluation_memory import evaluate_memory, render_memory_markdown, write_memory_report

    path, tokenizer, model = _load(args)
    output = Path(args.output)
    run = {"model": model_label(args.model, path), **run_info(args.dtype, model)}

    def checkpoint(rows, meta):  # a long run killed midway keeps the rows it finished
        write_memory_report(rows, {**meta, **run, "finished": False}, output)

    rows, meta = evaluate_memory(
        model, tokenizer, sizes=args.tokens, ratio=args.ratio or None, full_resolution_max_tokens=args.full_resolution_max_tokens,
        needles=args.needles, code_count=args.code_questions, chunk_tokens=args.chunk_tokens, top_k=args.top_k,
        selections=args.selections, bm25=not args.no_bm25, workdir=Path(args.workdir or output / "banks"),
        keep_banks=args.keep_banks, batch_tokens=args.batch_tokens, piece_tokens=args.piece_tokens,
        routing_layers=args.routing_layers, routing_pool=args.routing_pool, query_tokens=args.query_tokens,
        min_relative_score=args.min_relative_score, whole_span_share=args.whole_span_share,
        rereads=args.rereads, progress=checkpoint,
    )
    meta.update({**run, "finished": True})
    paths = write_memory_report(rows, meta, output)
    print(render_memory_markdown(rows, meta))
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def _add_bank_args(parser, ingest: bool) -> None:
    parser.add_argument("--model", default=None, help="local folder or Hub repo id (default: the bank's model for ask/info, "
                                                       "else the embedded SmolLM2-135M-Instruct)" if not ingest else
                        "local folder or Hub repo id (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model weights' dtype")


def _share_or_auto(text: str):
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], 'auto' or 'none', got {text!r}") from None


def _reread_context(text: str, words=("auto", "piece")):
    if text in words:
        return None if text == "piece" else text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of tokens >= 0 or one of {', '.join(words)}, got {text!r}")
    return value


def _reread(text: str):
    return _reread_context(text, ("joint", "piece"))


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices such as 5 or 4,5,6, got {text!r}") from None


def _memory_read_args(parser) -> None:
    parser.add_argument("--chunk-tokens", type=int, default=64, help="tokens per retrieved chunk")
    parser.add_argument("--piece-tokens", type=int, default=None,
                        help="longest span read with positions from 0 (default: the trained context, at most 4096)")
    parser.add_argument("--batch-tokens", type=int, default=32768, help="tokens per forward pass while ingesting")
    parser.add_argument("--routing-layers", type=_layer_list, default=None, metavar="I,J,...",
                        help="layers whose keys route questions to chunks, comma-separated (default: the layer a sixth "
                             "of the way up)")
    parser.add_argument("--routing-pool", default="max", choices=["max", "mean"],
                        help="score a chunk by its best-matching key (every key kept) or by its mean key")
    parser.add_argument("--whole-span-share", type=_share_or_auto, default="auto", metavar="S|auto|none",
                        help="compacted banks: a layer's KV head that wins this share of a piece's entries keeps them all "
                             "exact (auto: 0.45)")


def _add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", formatter_class=HELP, help="dense SDPA against the sparsemem GPU paths: JSON, markdown and PNG reports")
    bench.add_argument("--sections", nargs="+", default=None, choices=[*BENCH_SECTIONS, "stream"],
                       help="default: attention prefill decode (CUDA), or stream alone when --stream-tokens is given")
    bench.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    bench.add_argument("--densities", type=float, nargs="+", default=[0.25, 0.125, 0.0625],
                       help="fractions of each query block's candidate blocks attended exactly (block_fraction)")
    bench.add_argument("--prefill-contexts", type=int, nargs="+", default=[32768, 65536, 131072])
    bench.add_argument("--prefill-densities", type=float, nargs="+", default=[0.125])
    bench.add_argument("--decode-contexts", type=int, nargs="+", default=[32768, 131072])
    bench.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16])
    bench.add_argument("--decode-model-context", type=int, default=131072)
    bench.add_argument("--decode-model-densities", type=float, nargs="+", default=[0.125, 0.0625])
    bench.add_argument("--decode-steps", type=int, default=8)
    bench.add_argument("--no-compile-dense", dest="compile_dense", action="store_false",
                       help="leave out dense transformers with StaticCache + torch.compile (compiled, then captured in a CUDA "
                            "graph) from the decode sections (its compilation takes minutes)")
    bench.add_argument("--small-context", type=int, default=SMALL_CONTEXT,
                       help="decode-small section: real-text prompt tokens before the timed steps")
    bench.add_argument("--small-steps", type=int, default=SMALL_STEPS, help="decode-small section: one-token steps (3 untimed)")
    timed = bench.add_argument_group(
        "decode-small section: the sparse configuration timed and evaluated next to the model's default settings "
        "(sparsemem.convert options; sinks and recent window stay the model's)")
    small = SMALL_TIMED_OPTIONS
    timed.add_argument("--small-block-size", type=int, default=small["block_size"], help="tokens per block")
    timed.add_argument("--small-top-k-blocks", type=_top_k, default=small["top_k_blocks"],
                       help="blocks attended at least per query: integer, or 'all' for every block")
    timed.add_argument("--small-block-fraction", type=_share("--small-block-fraction"), default=small["block_fraction"],
                       help="attend this fraction of each query's candidate blocks ('none': --small-top-k-blocks alone)")
    timed.add_argument("--small-scorer", default=small["scorer"], choices=list(TRAINING_FREE_SCORERS), help="block scorer")
    timed.add_argument("--small-scorer-sub-block", type=int, default=None,
                       help=f"tokens per sub-block of --small-scorer subminmax (default: {small['scorer_sub_block']} with subminmax)")
    timed.add_argument("--small-depths", type=float, nargs="+", default=list(SMALL_DEPTHS),
                       help="pass-key depths of the quality measurement (prompts of --small-context tokens)")
    timed.add_argument("--small-ppl-length", type=int, default=None,
                       help="tokens of real text for the perplexity of each configuration (default: --small-context; 0 skips it)")
    bench.add_argument("--chunk", type=int, default=16384, help="prefill chunk (tokens per forward call)")
    bench.add_argument("--block-size", type=int, default=128, help="key and query block size (a multiple of 128)")
    bench.add_argument("--sink-tokens", type=int, default=128)
    bench.add_argument("--local-tokens", type=int, default=256)
    bench.add_argument("--scorer", default="minmax", choices=list(TRAINING_FREE_SCORERS),
                       help="block scorer of the attention, prefill and decode sections")
    bench.add_argument("--scorer-sub-block", type=int, default=None,
                       help="tokens per sub-block of --scorer subminmax (attention, prefill and decode sections)")
    bench.add_argument("--kernel-options", type=json.loads, default=None,
                       help='FlexAttention kernel options as JSON, e.g. \'{"BLOCK_M": 128, "BLOCK_N": 64}\'')
    bench.add_argument("--output", default=None,
                       help="folder for bench.json, bench.md and PNGs (default reports/bench, or reports/stream for the stream alone)")
    stream = bench.add_argument_group("stream section (SmolLM2-135M by default; CUDA or CPU)")
    stream.add_argument("--stream-tokens", type=int, default=None,
                        help="stream this many real-text tokens under a constant KV budget (selects the stream section)")
    stream.add_argument("--stream-chunk", type=int, default=4096, help="tokens per forward pass")
    stream.add_argument("--stream-budget", type=int, default=4096,
                        help="max_kv_tokens: physical entries per layer and KV head left after each forward pass")
    stream.add_argument("--stream-methods", nargs="+", default=["am"],
                        help="online compaction methods, one stream each (am, streaming-llm, h2o, kvzip, ...)")
    stream.add_argument("--stream-text", nargs="+", default=None,
                        help="text files to stream (default: the Python standard library's .py sources, sorted paths)")
    stream.add_argument("--stream-time-limit", type=float, default=None,
                        help="seconds after which the stream section stops (model loading included; the methods run in "
                             "order and share it; a stream cut short says so in the report)")
    stream.add_argument("--stream-no-baseline", action="store_true",
                        help="skip the no-memory reference loss (each chunk alone), one extra forward per chunk")
    stream.add_argument("--stream-passkeys", type=int, nargs="+", default=None,
                        help="distances in tokens before the stream's end at which a named secret number is hidden; "
                             "each is asked for from the compacted cache at the end (e.g. 10000 100000 1000000)")
    stream.add_argument("--positions", default="auto", choices=["logical", "cache", "auto"],
                        help="RoPE positions of what the cache holds: logical (positions in the whole stream), cache "
                             "(each held entry's rank, keys re-rotated as entries leave) or auto (logical inside the "
                             "model's trained context, cache beyond it)")
    stream.add_argument("--model", default=None, help="local folder or Hub repo id (default: embedded SmolLM2-135M-Instruct)")
    stream.add_argument("--device", default=None,
                        help="cpu or cuda (default: cuda when available); decode-small also runs on cpu (fp32, no CUDA-graph rows)")
    stream.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsemem", description=__doc__, formatter_class=HELP)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", formatter_class=HELP, help="hide a pass key in a long real document; answer with dense and sparse attention")
    _add_model_args(demo)
    demo.add_argument("--length", type=int, default=3000, help="prompt length in tokens")
    demo.add_argument("--depth", type=float, default=0.5, help="relative depth of the pass key")
    demo.add_argument("--seed", type=int, default=0, help="seed of the pass key and its haystack")
    demo.set_defaults(func=cmd_demo)

    ev = sub.add_parser(
        "eval", formatter_class=HELP,
        help="evaluation suites: retrieval (default), compaction, online, scorer, ruler; `sparsemem eval SUITE --help` "
             "lists a suite's options",
        description="Evaluation suites. `sparsemem eval SUITE --help` lists a suite's options; with no suite, "
                    "`retrieval` runs.",
    )
    suites = ev.add_subparsers(dest="suite", metavar="SUITE")
    ev.set_defaults(func=cmd_eval, suite="retrieval")

    ret = suites.add_parser("retrieval", formatter_class=HELP, help="perplexity and pass keys, dense vs sparse")
    _add_model_args(ret)
    ret.add_argument("--lengths", type=int, nargs="+", default=[3000, 6000], help="pass-key prompt lengths")
    ret.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="pass-key depths")
    ret.add_argument("--ppl-length", type=int, default=6000, help="tokens of real text for perplexity (0 to skip)")
    ret.add_argument("--output", default="reports/eval", help="folder for the JSON/markdown/PNG reports")

    from .head_budgets import HEAD_BUDGETS

    com = suites.add_parser("compaction", formatter_class=HELP, help="compaction methods by ratio: KL, perplexity, needles, bytes, time")
    _add_model_args(com)
    com.add_argument("--methods", nargs="+", default=None, help="compaction presses (default: all of them)")
    com.add_argument("--ratios", type=float, nargs="+", default=[2, 5, 10, 20, 50, 100], help="compaction ratios")
    com.add_argument("--context-tokens", type=int, default=3000, help="tokens of each document")
    com.add_argument("--continuation-tokens", type=int, default=512, help="tokens after each document the KL is measured on")
    com.add_argument("--documents", type=int, default=1,
                     help="documents (consecutive corpus windows) averaged over, and pass-key haystacks per depth")
    com.add_argument("--queries", nargs="+", default=["repeat"],
                     help="the reference queries of the presses with none of their own, such as Attention Matching "
                          "(KVzip ranks by its repeat pass, SnapKV and H2O by the context's own queries, as in compact())")
    com.add_argument("--needle-depths", type=float, nargs="*", default=[0.25, 0.5, 0.75],
                     help="pass-key depths per document (none: KL, perplexity, bytes and time only)")
    com.add_argument("--needle-wording", default="pass-key", choices=["pass-key", "secret-number"],
                     help="how the needle and the question are worded; in Python documentation 'pass' is also a "
                          "keyword, which 'secret-number' avoids")
    com.add_argument("--on-policy", action="store_true",
                     help="Attention Matching fits each layer to the repeat queries of a pass that reads the layers "
                          "below it already compacted")
    com.add_argument("--whole-span-share", type=_share("--whole-span-share", auto=True), default="auto",
                     help="with global head budgets, a head that wins this share of its span (a retrieval head) keeps "
                          "all of it exact, paid for by the other heads; 'auto': 0.45 for the Attention Matching "
                          "methods, none for the baselines; 'none': never")
    com.add_argument("--head-budgets", default="global", choices=list(HEAD_BUDGETS),
                     help="slots per KV head: ranked over all layers and heads (global), equal per head, or in "
                          "proportion to the attention each head gives the span")
    com.add_argument("--output", default="reports/eval", help="folder for the JSON/markdown/PNG reports")

    onl = suites.add_parser("online", formatter_class=HELP, help="generation under a physical KV budget (max_kv_tokens)")
    _add_model_args(onl)
    onl.add_argument("--methods", nargs="+", default=None, help="presses (default: am, streaming-llm, h2o, kvzip)")
    onl.add_argument("--budgets", type=int, nargs="+", default=[256, 512], help="max_kv_tokens values")
    onl.add_argument("--context-tokens", type=int, default=3000, help="tokens read before decoding")
    onl.add_argument("--decode-tokens", type=int, default=512, help="tokens decoded one by one after the context")
    onl.add_argument("--output", default="reports/eval", help="folder for the JSON/markdown/PNG reports")

    sco = suites.add_parser("scorer", formatter_class=HELP, help="a calibrated scorer vs the training-free ones on held-out windows")
    _add_model_args(sco)
    sco.add_argument("--run", default=None, help="a calibration output folder")
    sco.add_argument("--lengths", type=int, nargs="+", default=[3000, 6000], help="held-out window lengths")
    sco.add_argument("--max-windows", type=int, default=None,
                     help="held-out windows per length averaged over (default: every whole window)")
    sco.add_argument("--block-mass", dest="block_masses", type=_share("--block-mass"), nargs="*", default=[],
                     help="also the final learned scorer selecting by these attention-mass thresholds (block_mass; "
                          "density then varies per query and is reported)")
    sco.add_argument("--output", default="reports/eval", help="folder for the JSON/markdown/PNG reports")
    from .evaluation_ruler import DEFAULT_METHODS as RULER_METHODS, TASKS as RULER_TASKS

    rul = suites.add_parser("ruler", formatter_class=HELP,
                            help="RULER-style synthetic tasks (needles, variable tracking, word extraction), full cache vs compaction")
    _add_model_args(rul)
    rul.add_argument("--tasks", nargs="+", default=list(RULER_TASKS), choices=list(RULER_TASKS), metavar="TASK",
                     help=f"RULER tasks, of {', '.join(RULER_TASKS)}")
    rul.add_argument("--lengths", type=int, nargs="+", default=[4096], help="prompt lengths in tokens (up to the model's window)")
    rul.add_argument("--samples", type=int, default=4, help="samples per task and length")
    rul.add_argument("--seed", type=int, default=0, help="seed of the samples (keys, values, depths, haystack offsets)")
    rul.add_argument("--methods", nargs="+", default=list(RULER_METHODS), help="compaction methods (the full cache always runs)")
    rul.add_argument("--ratios", type=float, nargs="+", default=[5, 10], help="compaction ratios")
    rul.add_argument("--queries", nargs="+", default=["repeat"],
                     help="the reference queries of the presses with none of their own, such as Attention Matching "
                          "(KVzip ranks by its repeat pass, SnapKV and H2O by the context's own queries, as in compact())")
    rul.add_argument("--resume", action="store_true",
                     help="keep the results in OUTPUT/progress.jsonl measured with the same settings (an interrupted "
                          "run, or one over other tasks) and measure only the rest")
    rul.add_argument("--export-lm-eval", default=None, metavar="DIR",
                     help="write the samples as a local lm-eval task folder (use with --include_path DIR) and stop; "
                          "only --tasks, --lengths, --samples, --seed, --model (its tokenizer) and --text apply")
    rul.add_argument("--output", default="reports/eval", help="folder for the JSON/markdown/PNG reports")
    mem = suites.add_parser("memory", formatter_class=HELP,
                            help="memory bank vs BM25 RAG vs full cache on Python-source haystacks: needles, code questions")
    _add_bank_args(mem, ingest=True)
    mem.add_argument("--tokens", type=int, nargs="+", default=[50000], help="haystack sizes in tokens")
    mem.add_argument("--ratio", type=float, default=8.0, help="Attention Matching ratio of the compacted bank (0: none)")
    mem.add_argument("--full-resolution-max-tokens", type=int, default=2_000_000,
                     help="build the full-resolution bank only for haystacks up to this size (23 KB/token for SmolLM2 in bf16)")
    mem.add_argument("--rereads", type=_reread, nargs="*", default=["joint"], metavar="joint|N|piece",
                     help="one bank of token ids (store tokens) per value: 'joint' reads the chosen chunks again as one "
                          "text; N reads each separately with N tokens of its piece before it ('piece': all of them); "
                          "give none to leave these banks out")
    mem.add_argument("--needles", type=int, default=20, help="needles (evenly spaced depths) per haystack")
    mem.add_argument("--code-questions", type=int, default=100, help="code questions per haystack")
    mem.add_argument("--top-k", type=int, default=32, help="chunks read per question (prompt budget = top-k x chunk-tokens)")
    mem.add_argument("--selections", nargs="+", default=["shared", "per-layer"], choices=["shared", "per-layer"],
                     help="chunk selection modes measured")
    mem.add_argument("--no-bm25", action="store_true", help="skip the BM25 retrieval-augmented generation row")
    mem.add_argument("--workdir", default=None, help="folder for the banks (default: OUTPUT/banks)")
    mem.add_argument("--keep-banks", action="store_true", help="keep each bank on disk after its rows")
    mem.add_argument("--query-tokens", type=int, default=None,
                     help="the question's last tokens whose queries route (default: all of them)")
    mem.add_argument("--min-relative-score", type=float, default=0.5,
                     help="leave out chunks scoring under this fraction of the best chunk's score (0: always top-k)")
    _memory_read_args(mem)
    mem.add_argument("--output", default="reports/eval", help="folder for the JSON/markdown/PNG reports")
    for suite in (ret, com, onl, sco, rul, mem):
        suite.set_defaults(func=cmd_eval)

    memory = sub.add_parser("memory", formatter_class=HELP, help="a memory bank: ingest documents once, ask many questions")
    actions = memory.add_subparsers(dest="memory_command", required=True, metavar="ACTION")
    ing = actions.add_parser("ingest", formatter_class=HELP, help="read files (or folders) into a bank, creating it if needed")
    ing.add_argument("--bank", required=True, help="the bank's folder")
    ing.add_argument("--ratio", type=float, default=None, help="compact every chunk this many times (default: full resolution)")
    ing.add_argument("--store", default="kv", choices=list(STORES),
                     help="keep each chunk's K/V, or only its token ids and read the chunks a question needs again "
                          "(4 bytes per token on disk; ingestion runs the model up to the last routing layer only)")
    ing.add_argument("--reread", default="auto", choices=["auto", *REREADS],
                     help="--store tokens: read the chosen chunks again as one text (joint; auto) or each with its own "
                          "piece's start and --reread-context tokens before it (separate)")
    ing.add_argument("--reread-context", type=_reread_context, default="auto", metavar="N|piece|auto",
                     help=f"--reread separate: tokens of a chunk's piece read again before it ('piece': all of them; "
                          f"auto: {REREAD_CONTEXT})")
    _memory_read_args(ing)
    _add_bank_args(ing, ingest=True)
    ing.add_argument("paths", nargs="+", help="text files or folders (their files, sorted)")
    ask = actions.add_parser("ask", formatter_class=HELP, help="answer a question from a bank (answer on stdout, then the documents read)")
    ask.add_argument("--bank", required=True, help="the bank's folder")
    ask.add_argument("question", help="the question")
    ask.add_argument("--top-k", type=int, default=32, help="chunks read")
    ask.add_argument("--selection", default="shared", choices=["shared", "per-layer"], help="one choice for all layers, or per layer")
    ask.add_argument("--max-new-tokens", type=int, default=64, help="answer length")
    ask.add_argument("--query-tokens", type=int, default=None,
                     help="the question's last tokens whose queries route (default: all of them)")
    ask.add_argument("--min-relative-score", type=float, default=0.5,
                     help="leave out chunks scoring under this fraction of the best chunk's score (0: always top-k)")
    ask.add_argument("--refresh-every", type=int, default=None,
                     help="re-select chunks every N generated tokens, routed by the question and the answer so far")
    ask.add_argument("--no-verify", action="store_true", help="check a shard's SHA-256 only when a question reads it")
    _add_bank_args(ask, ingest=False)
    inf = actions.add_parser("info", formatter_class=HELP, help="documents, tokens and bytes on disk / host / device")
    inf.add_argument("--bank", required=True, help="the bank's folder")
    inf.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of every shard")
    _add_bank_args(inf, ingest=False)
    for action in (ing, ask, inf):
        action.set_defaults(func=cmd_memory)

    cal = sub.add_parser("calibrate", formatter_class=HELP, help="calibrate the learned modules from a YAML recipe (resumes from the last checkpoint)")
    cal.add_argument("recipe", help="recipe YAML (see recipes/)")
    cal.add_argument("--output-dir", default=None, help="override the recipe's output_dir")
    cal.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in output_dir")
    cal.add_argument("--skip-eval", action="store_true", help="do not run the recipe's evaluation at the end")
    cal.set_defaults(func=cmd_calibrate)

    exp = sub.add_parser("export", formatter_class=HELP, help="write Hub-ready checkpoints (full and modules-only) from a calibration run")
    exp.add_argument("run", help="calibration output folder")
    exp.add_argument("--output", required=True, help="folder to write full/ and modules/ into")
    exp.add_argument("--repo-id", default=None, help="repo id named in the model card")
    exp.add_argument("--base-model", "--base-reference", dest="base_model", default=None,
                     help="Hub id (OWNER/NAME) of the base model both variants name; required when the run's base "
                          "is a local folder (default: the run's base when it is a Hub id, or the embedded model's repo)")
    exp.add_argument("--card-template", default=None,
                     help="Jinja model card template for huggingface_hub.ModelCard (default: hub_cards/model_card.md)")
    exp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of the exported weights")
    exp.set_defaults(func=cmd_export)

    pu = sub.add_parser("push", formatter_class=HELP, help="upload an exported folder to the Hugging Face Hub")
    pu.add_argument("folder", help="an exported folder (full/ or modules/)")
    pu.add_argument("--repo-id", required=True, help="OWNER/NAME on the Hub")
    pu.add_argument("--private", action="store_true", help="create the repo private")
    pu.add_argument("--token", default=None, help="Hub token (else the saved login or HF_TOKEN)")
    pu.add_argument("--revision", default=None, help="branch to push to (else main)")
    pu.set_defaults(func=cmd_push)
    _add_bench_parser(sub)
    sub.choices["bench"].set_defaults(func=cmd_bench)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `sparsemem eval --flags` (no suite named) is the retrieval suite
    command = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), None)
    if command is not None and argv[command] == "eval":
        rest = argv[command + 1 :]
        if not rest or rest[0] not in (*SUITES, "-h", "--help"):
            argv.insert(command + 1, "retrieval")
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_arguments(args)  # before any model work or output
        return args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"sparsemem {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
