"""The learned consolidation press (`am-learned`) with several settings, one real document (CPU).

Run (arguments as kl_experiment.py's, then a JSON list of LearnedConsolidationPress keyword
arguments, each optionally with "ratios"):

    OMP_NUM_THREADS=1 python learned_experiment.py 3000 512 20000 5,10,20,50,100 '[{}]' > learned.jsonl
"""
import json
import sys

from document import Document

from sparsemem.modeling.consolidation import LearnedConsolidationPress

document = Document(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
ratios = [float(x) for x in sys.argv[4].split(",")]
for spec in json.loads(sys.argv[5]):
    for ratio in spec.pop("ratios", ratios):
        print(json.dumps({**spec, **document.measure(ratio, method=LearnedConsolidationPress(**spec))}), flush=True)
