"""Attention Matching's split of each budget, one real document (CPU): `exact_newest` (the share of each
head's slot budget kept as its newest entries, exact) and `recent_shares` (the shares of the layer's
budget kept as exact recent tokens that compact() chooses among by trial fits), at several ratios.

Run (arguments as kl_experiment.py's, then a JSON list of {"en": exact_newest, "shares": [...],
"ratios": [...]}; defaults: the shares 0.25/0.5/0.75 and the ratios argument):

    OMP_NUM_THREADS=1 python split_experiment.py 3000 512 20000 50,100 '[{"en":0.75,"shares":[0.25]}]' > split.jsonl
"""
import json
import sys

from document import Document

from sparsemem.modeling.compaction import AttentionMatchingPress

document = Document(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
ratios = [float(x) for x in sys.argv[4].split(",")]
for spec in json.loads(sys.argv[5]):
    en, shares = spec["en"], tuple(spec.get("shares", (0.25, 0.5, 0.75)))
    for ratio in spec.get("ratios", ratios):
        row = document.measure(ratio, method=AttentionMatchingPress(exact_newest=en), recent_shares=shares)
        print(json.dumps({"exact_newest": en, "shares": shares, **row}), flush=True)
