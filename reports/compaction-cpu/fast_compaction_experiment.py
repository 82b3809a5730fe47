"""Fast CPU compaction experiment: KL on a continuation + pass-key accuracy, per method and ratio."""
import argparse, copy, json, math, sys, time
import torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM, AutoTokenizer
import sparsemem
from sparsemem import convert
from sparsemem.default_model import resolve_model
from sparsemem.corpus import load_corpus, token_window, passkey_case, PASSKEY_QUESTION
from sparsemem.compact import capture_reference_queries, compact
from sparsemem.evaluation_compaction import _prefill, _continuation_logprobs, _answer, _queries_for
from sparsemem.modeling import compaction as C

p = argparse.ArgumentParser()
p.add_argument("--length", type=int, default=1200)
p.add_argument("--cont", type=int, default=256)
p.add_argument("--ratios", type=float, nargs="+", default=[5, 10, 20])
p.add_argument("--methods", nargs="+", default=list(("am", "am-no-beta", "am-no-refit", "streaming-llm", "h2o", "snapkv", "kvzip", "random")))
p.add_argument("--needle", type=int, default=0, help="number of needle depths (0: none)")
p.add_argument("--queries", nargs="+", default=["context", "repeat"])
p.add_argument("--head-budgets", default="uniform")
p.add_argument("--extra", default="{}", help="json kwargs for compact()")
p.add_argument("--offsets", type=int, nargs="+", default=[20000, 120000])
p.add_argument("--tag", default="")
p.add_argument("--ctx-from", type=float, default=0.0, help="keep context queries at positions >= this fraction")
a = p.parse_args()

path = resolve_model(None)
tok = AutoTokenizer.from_pretrained(path)
base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
model = convert(base, top_k_blocks=None, block_fraction=None)
corpus = load_corpus(["/work/main/.wt/lead/pydoc_topics_py311.txt"])
docs = []
for off in a.offsets:
    ids = torch.tensor([token_window(tok, corpus, a.length + a.cont, offset=off)])
    ctx, cont = ids[:, :a.length], ids[:, a.length:]
    full = _prefill(model, ctx)
    docs.append((ctx, cont, full, _continuation_logprobs(model, copy.deepcopy(full), cont)))
extra = json.loads(a.extra)
qcache = {}
def refq(sources, doc, key):
    if (sources, key) not in qcache:
        rq = capture_reference_queries(model, doc, tuple(dict.fromkeys(("context", *sources))), tok)
        if a.ctx_from > 0:
            cut = a.ctx_from * doc.shape[1]
            rq = {l: (q[..., (pos < 0) | (pos >= cut), :], pos[(pos < 0) | (pos >= cut)]) for l, (q, pos) in rq.items()}
        qcache[(sources, key)] = rq
    return qcache[(sources, key)]
question = tok(PASSKEY_QUESTION, add_special_tokens=False, return_tensors="pt").input_ids
needles = []
depths = [0.2, 0.5, 0.8, 0.35, 0.65][: a.needle]
for d in depths:
    case = passkey_case(tok, corpus, a.length + question.shape[1], d)
    doc = torch.tensor([case.input_ids[: -question.shape[1]]])
    needles.append((case, doc, _prefill(model, doc)))
if needles:
    fullacc = sum(_answer(model, tok, copy.deepcopy(c), question, case) for case, _, c in needles) / len(needles)
    print(f"full needle {fullacc:.2f}", flush=True)
for method in a.methods:
    name = method
    if "=" in method:  # name=python expression building a Press
        name, expr = method.split("=", 1)
        method = eval(expr, {"C": C, "torch": torch, **vars(C)})
        sources = tuple(a.queries)
    else:
        sources = _queries_for(method, a.queries)
    for ratio in a.ratios:
        kls = []
        t0 = time.perf_counter()
        for di, (ctx, cont, full, ref) in enumerate(docs):
            cache = copy.deepcopy(full)
            compact(model, cache, ratio, method=method, queries=sources, head_budgets=a.head_budgets, reference_queries=refq(sources, ctx, f"doc{di}"), **extra)
            lp = _continuation_logprobs(model, cache, cont)
            kls.append((ref.exp() * (ref - lp)).sum(-1).mean().item())
        sec = (time.perf_counter() - t0) / len(docs)
        kl = sum(kls) / len(kls)
        acc = None
        if needles:
            ok = 0
            for i, (case, doc, nf) in enumerate(needles):
                nc = copy.deepcopy(nf)
                compact(model, nc, ratio, method=method, queries=sources, head_budgets=a.head_budgets, reference_queries=refq(sources, doc, f"n{i}"), **extra)
                ok += _answer(model, tok, nc, question, case)
            acc = ok / len(needles)
        info = cache.compaction_info
        last = info["keep_last"]
        print(json.dumps({"tag": a.tag, "method": name, "ratio": ratio, "kl": round(kl, 4), "kls": [round(k, 4) for k in kls], "needle": acc, "sec": round(sec, 1),
                          "last_mean": round(sum(last) / len(last), 1), "slots": info["slots_per_head"][0] if len(set(info["slots_per_head"])) == 1 else "var"}), flush=True)
