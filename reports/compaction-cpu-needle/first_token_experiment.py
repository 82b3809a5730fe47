"""Teacher-forced log-probability of each pass key after compaction (default AM, repeat queries), for
the six cases of needle_experiment.py at 1x (full cache), 5x, 10x and 20x: the first answer token (the
space before the digits) and each digit, with the top-1 first token. Output: first_token.txt.

    OMP_NUM_THREADS=2 python first_token_experiment.py > first_token.txt
"""
import copy

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
import sparsemem
from sparsemem.compact import capture_reference_queries, compact
from sparsemem.corpus import PASSKEY_QUESTION, load_corpus, passkey_case
from sparsemem.default_model import resolve_model
from sparsemem.evaluation_compaction import _prefill
torch.set_grad_enabled(False)
path = resolve_model(None)
tok = AutoTokenizer.from_pretrained(path)
model = sparsemem.convert(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), top_k_blocks=None, block_fraction=None)
corpus = load_corpus(None)
q = tok(PASSKEY_QUESTION, add_special_tokens=False, return_tensors="pt").input_ids
for seed in (0, 1):
  for depth in (0.25, 0.5, 0.75):
    case = passkey_case(tok, corpus, 3000 + q.shape[1], depth, seed=seed)
    doc = torch.tensor([case.input_ids[: -q.shape[1]]])
    answer = tok(" " + case.passkey, add_special_tokens=False, return_tensors="pt").input_ids
    full = _prefill(model, doc)
    refs = capture_reference_queries(model, doc, ("repeat",), tok)
    row = []
    for ratio in [1, 5, 10, 20]:
        cache = copy.deepcopy(full)
        if ratio > 1:
            compact(model, cache, ratio, queries=["repeat"], reference_queries=refs)
        L = cache.get_seq_length()
        ids = torch.cat([q, answer], 1)
        pos = torch.arange(L, L + ids.shape[1])[None]
        out = model(ids, past_key_values=cache, position_ids=pos, attention_mask=torch.ones(1, L + ids.shape[1], dtype=torch.long))
        lp = out.logits[0, q.shape[1] - 1 : -1].log_softmax(-1)
        tgt = lp.gather(-1, answer[0][:, None])[:, 0]
        first_top = tok.decode([int(lp[0].argmax())])
        row.append(f"x{ratio}: sum {tgt.sum():.2f} first {tgt[0]:.2f} per-digit {[round(float(t),2) for t in tgt[1:]]} top1 {first_top!r}")
    print(seed, depth, case.passkey, *row, sep="\n  ", flush=True)
