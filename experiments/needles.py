"""Pass-key recall after compaction, the cases of `sparsemem eval compaction --documents 2` (3000-token
haystacks of Python's pydoc topics, depths 0.25/0.5/0.75, haystack seeds 0 and 1), on the CPU.

Each spec is a JSON object: "press" (AttentionMatchingPress fields), "compact" (compact() arguments),
"queries" (sources, default ["repeat"]), "ratios". One JSON line per (spec, ratio, case) with the answer.

    OMP_NUM_THREADS=2 python needle_experiment.py '[{"press": {"exact_newest": 0.75}, "ratios": [10]}]' > needles.jsonl

A second argument "secret-number" words the needle and the question as a secret number instead of a
pass key (the haystack is Python documentation, where "pass" is a keyword).
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
from sparsemem.modeling.compaction import AttentionMatchingPress, make_press

torch.set_grad_enabled(False)
wording = sys.argv[2] if len(sys.argv) > 2 else "pass-key"
PASSKEY_QUESTION = needle_question(wording)
path = resolve_model(None)
tokenizer = AutoTokenizer.from_pretrained(path)
model = sparsemem.convert(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
                          top_k_blocks=None, block_fraction=None)
corpus = load_corpus(None)
question = tokenizer(PASSKEY_QUESTION, add_special_tokens=False, return_tensors="pt").input_ids
cases = []
for seed in (0, 1):
    for depth in (0.25, 0.5, 0.75):
        case = passkey_case(tokenizer, corpus, 3000 + question.shape[1], depth, seed=seed, wording=wording)
        doc = torch.tensor([case.input_ids[: -question.shape[1]]])
        cases.append((case, doc, _prefill(model, doc), {}))


def answer(cache):
    length = cache.get_seq_length()
    ids = torch.cat([torch.zeros(1, length, dtype=torch.long), question], dim=1)
    out = model.generate(ids, past_key_values=cache, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                         do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


for spec in json.loads(sys.argv[1]):
    sources = tuple(spec.get("queries", ["repeat"]))
    method = spec.get("method", "am")
    press = AttentionMatchingPress(**spec["press"]) if "press" in spec else make_press(method)
    for ratio in spec.get("ratios", [10]):
        for index, (case, doc, full, captured) in enumerate(cases):
            if sources not in captured:
                captured[sources] = capture_reference_queries(model, doc, sources, tokenizer)
            cache = copy.deepcopy(full)
            if ratio > 1:
                compact(model, cache, ratio, method=press, queries=list(sources), reference_queries=captured[sources],
                        input_ids=doc, tokenizer=tokenizer,
                        **spec.get("compact", {}))
            text = answer(cache)
            print(json.dumps({**{k: v for k, v in spec.items() if k != "ratios"}, "ratio": ratio, "case": index,
                              "depth": case.depth, "key": case.passkey, "answer": text,
                              "correct": case.passkey in text}), flush=True)
