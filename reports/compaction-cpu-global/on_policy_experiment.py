"""Attention Matching fitted off-policy (every layer to the full cache's repeat queries) and on-policy
(`compact(on_policy=True)`: each layer to the repeat queries of a pass whose lower layers are already
compacted), on the document of this folder, at 10x, 20x and 50x (CPU).

    OMP_NUM_THREADS=2 python on_policy_experiment.py > kl_on_policy.jsonl
"""
import json

from document import Document

document = Document(3000, 512, 20000)
for ratio in (10, 20, 50):
    for on_policy in (False, True):
        row = document.measure(ratio, on_policy=on_policy, input_ids=document.context, tokenizer=document.tokenizer)
        print(json.dumps({"on_policy": on_policy, **row}), flush=True)
