"""Oracle: the needle's tokens kept in every head at 10x. Does AM then answer?"""
import copy, json, sys, time
from dataclasses import dataclass, field
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
import sparsemem
from sparsemem.compact import capture_reference_queries, compact
from sparsemem.corpus import load_corpus, needle_question, needle_wording, passkey_case
from sparsemem.default_model import resolve_model
from sparsemem.evaluation_compaction import _prefill
from sparsemem.modeling.compaction import AttentionMatchingPress
from sparsemem.modeling.attention_matching import attention_matching, select_by_attention

torch.set_grad_enabled(False)
wording = "secret-number"
path = resolve_model(None)
tok = AutoTokenizer.from_pretrained(path)
model = sparsemem.convert(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), top_k_blocks=None, block_fraction=None)
corpus = load_corpus(None)
question = tok(needle_question(wording), add_special_tokens=False, return_tensors="pt").input_ids
STATS = []

@dataclass
class Forced(AttentionMatchingPress):
    forced: tuple = ()
    force: bool = True
    def _fit(self, span, budget):
        pos = span.positions
        hit = torch.isin(pos, torch.tensor(self.forced))
        phi = span.problem.weights()
        score = torch.linalg.vector_norm(phi, dim=1)
        natural = score.topk(min(budget, score.shape[-1]), dim=-1).indices
        STATS.append((int(hit.sum()), int(hit[natural[0]].sum()) if hit.any() else 0))
        if self.force and hit.any():
            score = score.masked_fill(hit[None].expand_as(score), float("inf"))
        index = score.topk(min(budget, score.shape[-1]), dim=-1).indices.sort(dim=-1).values
        return attention_matching(span.problem, budget, key_selection=index, fit_bias=self.fit_bias,
                                  refit_values=self.refit_values, ridge=self.ridge, nnls_iterations=self.nnls_iterations)

def answer(cache):
    length = cache.get_seq_length()
    ids = torch.cat([torch.zeros(1, length, dtype=torch.long), question], dim=1)
    out = model.generate(ids, past_key_values=cache, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

specs = json.loads(sys.argv[1])
for seed in (0, 1):
    for depth in (0.25, 0.5, 0.75):
        case = passkey_case(tok, corpus, 3000 + question.shape[1], depth, seed=seed, wording=wording)
        ids = case.input_ids[: -question.shape[1]]
        needle = tok(needle_wording(wording)[0].format(key=case.passkey), add_special_tokens=False).input_ids
        start = next(i for i in range(len(ids)) if ids[i:i + len(needle)] == needle)
        forced = tuple(range(start - 1, start + len(needle) + 1))
        doc = torch.tensor([ids]); full = _prefill(model, doc)
        refs = capture_reference_queries(model, doc, ("repeat",), tok)
        for spec in specs:
            STATS.clear(); t = time.time()
            press = Forced(forced=forced, **spec.get("press", {}))
            cache = copy.deepcopy(full)
            compact(model, cache, spec.get("ratio", 10), method=press, queries=["repeat"], reference_queries=refs, input_ids=doc, tokenizer=tok, **spec.get("compact", {}))
            text = answer(cache)
            kept_nat = sum(s[1] for s in STATS); present = sum(s[0] for s in STATS)
            print(json.dumps({**spec, "seed": seed, "depth": depth, "key": case.passkey, "answer": text, "correct": case.passkey in text,
                              "needle_in_older": present, "naturally_kept": kept_nat, "s": round(time.time() - t, 1)}), flush=True)
