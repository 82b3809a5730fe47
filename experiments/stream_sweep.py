"""Which online-compaction settings keep a constant-memory stream's loss lowest past the trained window.

One stream per configuration over the same real text (the standard library's sources) through
`sparsemem.stream.stream` with SmolLM2-135M-Instruct as a dense-equivalent sparsemem model (every held
entry attended exactly; the compaction is the only approximation). A configuration is a JSON object:
`method` (a compaction press name), `online` (fields of `sparsemem.OnlineCompaction`, e.g.
`{"num_queries": 1024}`) and `press` (fields of the method's press, e.g. `{"exact_newest": 0.9}`). Each
row: the stream's summary means (`loss_within_window`, `loss_beyond_window`, `no_memory_loss_beyond_window`),
tokens/s and where the seconds went, and pass keys when `--passkeys` are given.

    python experiments/stream_sweep.py --device cuda --dtype bfloat16 --tokens 65536 \
        --configs '[{"method": "streaming-llm"}, {"method": "am"}, {"method": "am", "online": {"num_queries": 1024}}]' \
        > reports/stream-sweep-h100/sweep.jsonl
"""

import argparse
import json
import time

import torch

import sparsemem
from harness import online_compaction, parse_json
from sparsemem.machine import device_name
from sparsemem.stream import stream

SUMMARY_KEYS = ("tokens", "tokens_per_second", "loss_within_window", "loss_beyond_window", "no_memory_loss_within_window",
                "no_memory_loss_beyond_window", "compaction_seconds", "layout_seconds", "forward_seconds", "seconds",
                "physical_max", "budget_respected", "stopped")


def load(device: str, dtype: str, positions: str):
    """SmolLM2-135M-Instruct on `device` in `dtype` as a dense-equivalent sparsemem model, and its tokenizer."""
    from sparsemem.default_model import load_model

    _, tokenizer, base = load_model(None, device, dtype)
    return sparsemem.convert(base, top_k_blocks=None, block_fraction=None, positions=positions), tokenizer


def run(model, tokenizer, config: dict, tokens: int, chunk: int, budget: int, passkeys=None, time_limit=None) -> dict:
    """One stream under `config`; the summary's comparable fields."""
    method = config.get("method", "am")
    online = online_compaction(config, budget, model.config.sink_tokens)
    start = time.perf_counter()
    result, _ = stream(model, tokenizer, tokens, chunk=chunk, budget=budget, method=method, progress=False, online=online,
                       passkeys=passkeys, time_limit=time_limit)
    summary = result.summary
    row = {"config": config, **{key: summary.get(key) for key in SUMMARY_KEYS}, "wall_seconds": round(time.perf_counter() - start, 1)}
    if "passkeys" in summary:
        row["passkeys"] = [{k: case[k] for k in ("distance", "correct", "answer")} for case in summary["passkeys"]]
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=4096)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--positions", default="auto", choices=["auto", "cache", "logical"])
    parser.add_argument("--passkeys", type=int, nargs="*", default=None, help="pass-key distances (tokens before the end)")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds per configuration")
    parser.add_argument("--configs", type=lambda text: parse_json(text, "--configs", list), default=[{"method": "streaming-llm"}, {"method": "am"}],
                        help="JSON list of configurations (see the module's description)")
    args = parser.parse_args(argv)
    model, tokenizer = load(args.device, args.dtype, args.positions)
    for config in args.configs:
        print(json.dumps(run(model, tokenizer, config, args.tokens, args.chunk, args.budget, args.passkeys, args.time_limit)),
              flush=True)
    print(json.dumps({"device": device_name(args.device), "torch": torch.__version__, "dtype": args.dtype, "tokens": args.tokens,
                      "chunk": args.chunk, "budget": args.budget}), flush=True)


if __name__ == "__main__":
    main()
