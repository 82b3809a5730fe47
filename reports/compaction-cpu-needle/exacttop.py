import copy, json, sys, importlib
from dataclasses import dataclass
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
import sparsemem
C = importlib.import_module("sparsemem.compact")
from sparsemem.corpus import load_corpus, needle_question, passkey_case
from sparsemem.default_model import resolve_model
from sparsemem.evaluation_compaction import _prefill
from sparsemem.modeling.compaction import AttentionMatchingPress, HeadSpan, _stack
from sparsemem.modeling.attention_matching import SpanProblem
torch.set_grad_enabled(False)

@dataclass
class ExactTop(AttentionMatchingPress):
    exact_by: str = "peak"   # peak | newest
    def compact_after_span(self, span, budget):
        if self.exact_by == "newest":
            return super().compact_after_span(span, budget)
        total = span.problem.keys.shape[1]
        keep = self.exact_count(budget, total)
        if not keep:
            return self._fit(span, budget)
        p = span.problem
        phi = p.weights()
        score = phi.amax(1) if self.exact_by == "peak" else torch.linalg.vector_norm(phi, dim=1)
        outs = []
        for b in range(p.keys.shape[0]):
            top = torch.zeros(total, dtype=torch.bool); top[score[b].topk(keep).indices] = True
            sub = lambda t: t[b:b+1]
            older = HeadSpan(SpanProblem(sub(p.queries), sub(p.keys)[:, ~top], sub(p.values)[:, ~top], sub(p.key_bias)[:, ~top],
                                         sub(p.context_lse), p.scaling, phi=sub(phi)[..., ~top]), span.positions[~top], span.query_positions)
            index, keys, values, beta = self._fit(older, budget - keep)
            index = (~top).nonzero()[:, 0][index]
            outs.append((torch.cat([index, top.nonzero()[:, 0][None]], 1), torch.cat([keys, sub(p.keys)[:, top]], 1),
                         torch.cat([values, sub(p.values)[:, top]], 1), torch.cat([beta, sub(p.key_bias)[:, top]], 1)))
        return tuple(torch.cat(parts) for parts in zip(*outs))

path = resolve_model(None); tok = AutoTokenizer.from_pretrained(path)
model = sparsemem.convert(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), top_k_blocks=None, block_fraction=None)
corpus = load_corpus(None)
question = tok(needle_question("secret-number"), add_special_tokens=False).input_ids
def answer(cache):
    length = cache.get_seq_length()
    ids = torch.cat([torch.zeros(1, length, dtype=torch.long), torch.tensor([question])], dim=1)
    out = model.generate(ids, past_key_values=cache, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
def logprob(cache, answer_ids):
    length = cache.get_seq_length()
    ids = torch.tensor([question + answer_ids]); pos = torch.arange(length, length + ids.shape[1])[None]
    lp = model(ids, past_key_values=copy.deepcopy(cache), position_ids=pos, use_cache=True).logits[0, len(question) - 1 : -1].log_softmax(-1)
    return float(lp.gather(-1, torch.tensor(answer_ids)[:, None]).sum())
specs = json.loads(sys.argv[1])
cases = [(s, d) for s in (0, 1) for d in (0.25, 0.5, 0.75)]
if len(sys.argv) > 2: cases = [(s, d) for s in range(int(sys.argv[2]), int(sys.argv[3])) for d in (0.25, 0.5, 0.75)]
for seed, depth in cases:
        case = passkey_case(tok, corpus, 3000 + len(question), depth, seed=seed, wording="secret-number")
        ids = case.input_ids[: -len(question)]
        answer_ids = tok(" " + case.passkey + ".", add_special_tokens=False).input_ids
        doc = torch.tensor([ids]); full = _prefill(model, doc)
        refs = C.capture_reference_queries(model, doc, ("repeat",), tok)
        for spec in specs:
            small = copy.deepcopy(full)
            C.compact(model, small, spec.get("ratio", 10), method=ExactTop(**spec.get("press", {})), queries=["repeat"], reference_queries=refs, input_ids=doc, tokenizer=tok, **spec.get("compact", {}))
            text = answer(copy.deepcopy(small))
            print(json.dumps({**spec, "seed": seed, "depth": depth, "lp": round(logprob(small, answer_ids), 2), "answer": text, "correct": case.passkey in text, "bytes": small.storage_bytes()}), flush=True)
