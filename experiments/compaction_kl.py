"""Next-token KL to the full cache after compaction, one real document, several methods and budgets (CPU).

Run (one process at a time; each config is a JSON object of `sparsemem.compact` arguments):

    OMP_NUM_THREADS=2 python kl_experiment.py 3000 512 20000 5,10,20,50,100 \
        '{"method":"am","head_budgets":"global"}' '{"method":"kvzip","head_budgets":"global"}' ... > kl.jsonl

Arguments: context tokens, continuation tokens, corpus offset, ratios, configs. The document is the
evaluation's (`sparsemem eval compaction`: Python's pydoc_data.topics at offset 20000, 3000 + 512
tokens; `document.py`). Each method takes the query sources the evaluation gives it unless the config
names them (AM and KVzip the repeat pass, H2O and SnapKV the context).
"""
import json
import sys

from document import Document

from sparsemem.evaluation_compaction import _queries_for

document = Document(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
ratios = [float(x) for x in sys.argv[4].split(",")]
for config in (json.loads(c) for c in sys.argv[5:]):
    tag = config.pop("tag", "")
    config.setdefault("queries", list(_queries_for(config["method"], ("repeat",))))
    for ratio in ratios:
        print(json.dumps({"tag": tag, **config, **document.measure(ratio, **config)}), flush=True)
