"""Which layers' compaction costs the needle? Teacher-forced answer log-prob with one layer restored.

    python layers.py [RATIO] [COMPACT_KWARGS_JSON]     e.g. python layers.py 10 '{"whole_span_share": 0.5}'
"""
import copy, json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
import sparsemem
from sparsemem.compact import capture_reference_queries, compact
from sparsemem.corpus import load_corpus, needle_question, passkey_case
from sparsemem.default_model import resolve_model
from sparsemem.evaluation_compaction import _prefill

torch.set_grad_enabled(False)
wording = "secret-number"
path = resolve_model(None)
tok = AutoTokenizer.from_pretrained(path)
model = sparsemem.convert(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), top_k_blocks=None, block_fraction=None)
corpus = load_corpus(None)
question = tok(needle_question(wording), add_special_tokens=False).input_ids
ratio = float(sys.argv[1]) if len(sys.argv) > 1 else 10
extra = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}

def logprob(cache, answer_ids):
    length = cache.get_seq_length()
    ids = torch.tensor([question + answer_ids])
    pos = torch.arange(length, length + ids.shape[1])[None]
    out = model(ids, past_key_values=copy.deepcopy(cache), position_ids=pos, use_cache=True)
    lp = out.logits[0, len(question) - 1 : -1].log_softmax(-1)
    return float(lp.gather(-1, torch.tensor(answer_ids)[:, None]).sum())

for seed in (0, 1):
    for depth in (0.25, 0.5, 0.75):
        case = passkey_case(tok, corpus, 3000 + len(question), depth, seed=seed, wording=wording)
        ids = case.input_ids[: -len(question)]
        answer_ids = tok(" " + case.passkey + ".", add_special_tokens=False).input_ids
        doc = torch.tensor([ids]); full = _prefill(model, doc)
        refs = capture_reference_queries(model, doc, ("repeat",), tok)
        small = copy.deepcopy(full)
        compact(model, small, ratio, method="am", queries=["repeat"], reference_queries=refs, input_ids=doc, tokenizer=tok, **extra)
        row = {**extra, "seed": seed, "depth": depth, "full": logprob(full, answer_ids), "compact": logprob(small, answer_ids),
               "phys": small.physical_lengths()}
        restored, only = [], []
        for L in range(len(full.layers)):
            c = copy.copy(small); c.layers = list(small.layers); c.layers[L] = full.layers[L]
            restored.append(round(logprob(c, answer_ids), 2))
            c = copy.copy(full); c.layers = list(full.layers); c.layers[L] = small.layers[L]
            only.append(round(logprob(c, answer_ids), 2))
        row.update(restored=restored, only=only)
        print(json.dumps(row), flush=True)
