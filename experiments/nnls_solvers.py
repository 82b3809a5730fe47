"""Speed and accuracy of the NNLS solvers of the beta fit, on the device at hand.

Problems shaped as Attention Matching poses them (`P` (layer, KV head) problems of `n` reference queries
and `t` kept keys: the keys' softmax weights A over a span of 10 t keys, the span's mass m), solved by
`sparsemem.modeling.attention_matching.nnls` with each method: "active-set" (block principal pivoting from
every entry), "fista" (batched projected gradient finished by the active set) and projected gradient
alone (`max_rounds=0`: no active-set round; it logs that it is unfinished, as it should). One JSON line
per (size, method): the median seconds of `--repeats` solves and the residual ||A w - m||^2 of the worst
problem relative to the active set's (0: as exact).

Writes the JSON lines of `reports/nnls-cpu/` (on a GPU: name the folder after it).

    OMP_NUM_THREADS=2 python experiments/nnls_solvers.py > reports/nnls-cpu/nnls.jsonl
    python experiments/nnls_solvers.py --device cuda > nnls-h100.jsonl
"""

import argparse
import json
import logging
import statistics
import time

import torch

from sparsemem.modeling.attention_matching import nnls

SIZES = [(90, 2048, 40), (90, 2048, 220), (3, 2048, 220)]
METHODS = {"active-set": {"method": "active-set"}, "fista": {"method": "fista"},
           "projected gradient alone": {"method": "fista", "max_rounds": 0}}


def problems(count, queries, kept, device, seed=0):
    """(A [P, n, t], m [P, n]) in fp32: softmax weights of `kept` of 10 * `kept` random keys."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(count, queries, 64, generator=generator)
    k = torch.randn(count, 10 * kept, 64, generator=generator) * 1.5
    logits = q @ k.transpose(1, 2) / 8
    phi = torch.exp(logits - logits.logsumexp(-1, keepdim=True))
    order = phi.pow(2).mean(1).topk(kept, dim=-1).indices  # the highest-attention keys, as AM keeps them
    a = phi.gather(-1, order[:, None, :].expand(-1, queries, -1))
    return a.to(device), phi.sum(-1).to(device)


def run(sizes, device, repeats=3):
    for count, queries, kept in sizes:
        a, mass = problems(count, queries, kept, device)
        gram = a.transpose(1, 2) @ a
        rhs = (a.transpose(1, 2) @ mass[..., None])[..., 0]
        residual = lambda w: ((a.double() @ w.double()[..., None])[..., 0] - mass.double()).pow(2).sum(-1)  # noqa: E731
        exact = None
        for name, options in METHODS.items():
            seconds = []
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                w = nnls(gram, rhs, **options)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds.append(time.perf_counter() - start)
            if exact is None:
                exact = residual(w)
            excess = float(((residual(w) - exact) / exact).max())
            yield {"device": str(device), "problems": count, "queries": queries, "kept": kept, "method": name,
                   "seconds": statistics.median(seconds), "residual_excess": excess}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    # projected gradient alone reports itself unfinished on every call: that is what it measures
    logging.getLogger("sparsemem.modeling.attention_matching").setLevel(logging.ERROR)
    for row in run(SIZES, device, args.repeats):
        print(json.dumps({**row, "seconds": round(row["seconds"], 4)}), flush=True)


if __name__ == "__main__":
    main()
