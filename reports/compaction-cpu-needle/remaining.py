"""The needles the default still misses at 10x (eight-document H200 harness), diagnosed on the CPU.

    OMP_NUM_THREADS=2 python remaining.py answers '[[3,0.5],[4,0.5]]' '[{}, {"method": "am-peak"}, {"take": 0.75}]'
    OMP_NUM_THREADS=2 python remaining.py restore '[[5,0.5],[7,0.25],[3,0.5]]'
    OMP_NUM_THREADS=2 python remaining.py copy-scores '[[5,0.5]]'

Cases are [haystack seed, depth] of `sparsemem eval compaction --documents 8 --needle-wording secret-number`
(seed = document number). `answers`: greedy answer and teacher-forced answer log-prob after 10x compaction
with each config ("method", "take" = `WHOLE_SPAN_TAKE`, other keys go to `compact`). `restore`: the answer
log-prob with one layer's full cache put back into the default 10x cache, per layer, and the heads made
whole. `copy-scores`: per KV head, the largest mean attention a query head gives, during the repeat pass,
to the original of the token it reads (echo) and to the token after it (induction); 14 best.
A third argument names the haystack text file (default: Python's reference docs, as on the GPU).
"""
import copy
import importlib
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sparsemem
from sparsemem.corpus import load_corpus, needle_question, passkey_case
from sparsemem.default_model import resolve_model
from sparsemem.evaluation_compaction import _answer, _prefill
from sparsemem.modeling.compaction import LayerAttention

C = importlib.import_module("sparsemem.compact")  # the module: `sparsemem.compact` is also the function
torch.set_grad_enabled(False)
mode, cases = sys.argv[1], json.loads(sys.argv[2])
path = resolve_model(None)
tok = AutoTokenizer.from_pretrained(path)
model = sparsemem.convert(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), top_k_blocks=None, block_fraction=None)
corpus = load_corpus([sys.argv[-1]] if len(sys.argv) > (4 if mode == "answers" else 3) else None)
question = tok(needle_question("secret-number"), add_special_tokens=False, return_tensors="pt").input_ids
scaling = model.model.layers[0].self_attn.scaling


def answer_logprob(cache, answer):
    n = cache.get_seq_length()
    ids = torch.tensor([question[0].tolist() + answer])
    logits = model(ids, past_key_values=copy.deepcopy(cache), position_ids=torch.arange(n, n + ids.shape[1])[None]).logits
    logprobs = logits[0, question.shape[1] - 1 : -1].log_softmax(-1)
    return round(float(logprobs.gather(-1, torch.tensor(answer)[:, None]).sum()), 2)


for seed, depth in cases:
    case = passkey_case(tok, corpus, 3000 + question.shape[1], depth, seed=seed, wording="secret-number")
    doc = torch.tensor([case.input_ids[: -question.shape[1]]])
    full = _prefill(model, doc)
    refs = C.capture_reference_queries(model, doc, ("repeat",), tok)
    answer = tok(" " + case.passkey + ".", add_special_tokens=False).input_ids
    row = {"seed": seed, "depth": depth, "key": case.passkey}
    if mode == "answers":
        for config in json.loads(sys.argv[3]):
            kwargs = dict(config)
            C.WHOLE_SPAN_TAKE = kwargs.pop("take", 0.5)
            small = copy.deepcopy(full)
            C.compact(model, small, kwargs.pop("ratio", 10), method=kwargs.pop("method", "am"), queries=["repeat"],
                      reference_queries=refs, input_ids=doc, tokenizer=tok, **kwargs)
            text = _answer(model, tok, copy.deepcopy(small), question, case, seed)["answer"]
            print(json.dumps({**row, **config, "correct": case.passkey in text, "answer": text,
                              "logprob": answer_logprob(small, answer)}), flush=True)
    elif mode == "restore":
        small = copy.deepcopy(full)
        C.compact(model, small, 10, queries=["repeat"], reference_queries=refs, input_ids=doc, tokenizer=tok)
        restored = []
        for index in range(len(full.layers)):
            mixed = copy.copy(small)
            mixed.layers = list(small.layers)
            mixed.layers[index] = full.layers[index]
            restored.append(answer_logprob(mixed, answer))
        info = small.compaction_info
        span = [doc.shape[1] - info["keep_first"] - last for last in info["keep_last"]]
        whole = [(layer, head) for layer, counts in enumerate(info["slots_per_kv_head"]) for head, n in enumerate(counts) if n == span[layer]]
        print(json.dumps({**row, "full": answer_logprob(full, answer), "compacted": answer_logprob(small, answer),
                          "restored": restored, "whole": whole}), flush=True)
    elif mode == "copy-scores":
        n, rows = doc.shape[1], []
        index = torch.arange(0, n - 1, 4)  # every 4th repeat query; query j reads the copy of context token j
        for layer_index, layer in enumerate(full.layers):
            attention = LayerAttention.measure(layer, refs[layer_index][0][..., index, :], scaling)
            for head, phi in enumerate(attention.phi):
                phi = phi[0].view(-1, index.numel(), phi.shape[-1])[..., :n]  # [G, queries, context]
                echo = phi[:, torch.arange(index.numel()), index].mean(-1).max()
                induction = phi[:, torch.arange(index.numel()), index + 1].mean(-1).max()
                rows.append([layer_index, head, round(float(echo), 3), round(float(induction), 3)])
        rows.sort(key=lambda r: -max(r[2], r[3]))
        print(json.dumps({**row, "layer_head_echo_induction": rows[:14]}), flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}: answers, restore or copy-scores")
