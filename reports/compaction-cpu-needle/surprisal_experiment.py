"""Does keeping the context's most surprising tokens exact (highest -log p under the model's own prefill,
e.g. the digits of a random number) save the needle at 10x? Secret-number wording, the six cases of
`needle_experiment.py`.

    OMP_NUM_THREADS=2 python surprisal_experiment.py 0.01 0.03 > surprisal.jsonl
"""
import copy
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sparsemem
from sparsemem.compact import capture_reference_queries, compact
from sparsemem.corpus import load_corpus, needle_question, passkey_case
from sparsemem.default_model import resolve_model
from sparsemem.evaluation_compaction import _prefill
from sparsemem.modeling.compaction import AttentionMatchingPress, HeadSpan, SpanProblem


class ProtectingPress(AttentionMatchingPress):
    """AM whose spans keep the `protected` positions exact, besides the newest share."""

    protected: torch.Tensor = torch.empty(0, dtype=torch.long)

    def compact_after_span(self, span, budget):
        total = span.problem.keys.shape[1]
        keep = self.exact_count(budget, total)
        protect = torch.isin(span.positions, self.protected.to(span.positions.device))
        if not bool(protect.any()) or budget >= total:
            return super().compact_after_span(span, budget)
        newest = torch.zeros(total, dtype=torch.bool, device=span.positions.device)
        newest[span.positions.sort(stable=True).indices[total - keep:]] = True
        exact = newest | protect
        if int(exact.sum()) >= budget:  # too small a budget: protect the most recent share only
            return super().compact_after_span(span, budget)
        p = span.problem
        rest = HeadSpan(SpanProblem(p.queries, p.keys[:, ~exact], p.values[:, ~exact], p.key_bias[:, ~exact],
                                    p.context_lse, p.scaling), span.positions[~exact], span.query_positions)
        saved, self.exact_newest = self.exact_newest, 0.0
        try:
            index, keys, values, beta = self._fit(rest, budget - int(exact.sum()))
        finally:
            self.exact_newest = saved
        index = (~exact).nonzero()[:, 0][index]
        pick = lambda t: t[:, exact]  # noqa: E731
        return (torch.cat([index, exact.nonzero()[:, 0].expand(index.shape[0], -1)], 1), torch.cat([keys, pick(p.keys)], 1),
                torch.cat([values, pick(p.values)], 1), torch.cat([beta, pick(p.key_bias)], 1))


torch.set_grad_enabled(False)
path = resolve_model(None)
tokenizer = AutoTokenizer.from_pretrained(path)
model = sparsemem.convert(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
                          top_k_blocks=None, block_fraction=None)
corpus = load_corpus(None)
question = tokenizer(needle_question("secret-number"), add_special_tokens=False, return_tensors="pt").input_ids
for share in map(float, sys.argv[1:]):
    for index, (seed, depth) in enumerate((s, d) for s in (0, 1) for d in (0.25, 0.5, 0.75)):
        case = passkey_case(tokenizer, corpus, 3000 + question.shape[1], depth, seed=seed, wording="secret-number")
        doc = torch.tensor([case.input_ids[: -question.shape[1]]])
        logits = model(doc, use_cache=False).logits[0, :-1].float()
        surprisal = -torch.log_softmax(logits, -1).gather(-1, doc[0, 1:, None])[:, 0]
        top = surprisal.topk(int(share * doc.shape[1])).indices + 1
        press = ProtectingPress()
        press.protected = top
        cache = _prefill(model, doc)
        queries = capture_reference_queries(model, doc, ("repeat",), tokenizer)
        compact(model, cache, 10, method=press, queries=["repeat"], reference_queries=queries, input_ids=doc, tokenizer=tokenizer)
        length = cache.get_seq_length()
        ids = torch.cat([torch.zeros(1, length, dtype=torch.long), question], dim=1)
        out = model.generate(ids, past_key_values=cache, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        needle_at = [i for i in range(doc.shape[1] - 5) if tokenizer.decode(doc[0, i:i + 5]).replace(" ", "").startswith(case.passkey[:3])]
        print(json.dumps({"protect_share": share, "ratio": 10, "case": index, "depth": depth, "key": case.passkey,
                          "answer": text, "correct": case.passkey in text,
                          "needle_tokens_protected": int(sum(int(i) in set(top.tolist()) for i in range(needle_at[0], needle_at[0] + 5))) if needle_at else None}),
              flush=True)
