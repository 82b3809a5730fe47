import copy, json, sys, importlib
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
import sparsemem
C = importlib.import_module("sparsemem.compact")
from sparsemem.corpus import load_corpus, needle_question, needle_wording, passkey_case
from sparsemem.default_model import resolve_model
from sparsemem.evaluation_compaction import _prefill
torch.set_grad_enabled(False)
path = resolve_model(None); tok = AutoTokenizer.from_pretrained(path)
model = sparsemem.convert(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), top_k_blocks=None, block_fraction=None)
corpus = load_corpus(None)
question = tok(needle_question("secret-number"), add_special_tokens=False).input_ids
scaling = model.model.layers[0].self_attn.scaling
LAYERS = [int(x) for x in sys.argv[1].split(",")]
press = sys.argv[2] if len(sys.argv) > 2 else "am"
from sparsemem.modeling.compaction import AttentionMatchingPress
if press.startswith("en"):
    press = AttentionMatchingPress(exact_newest=float(press[2:]))
for seed, depth in ((0, 0.25), (1, 0.25), (1, 0.5), (0, 0.75)):
    case = passkey_case(tok, corpus, 3000 + len(question), depth, seed=seed, wording="secret-number")
    ids = case.input_ids[: -len(question)]
    needle = tok(needle_wording("secret-number")[0].format(key=case.passkey), add_special_tokens=False).input_ids
    start = next(i for i in range(len(ids)) if ids[i:i + len(needle)] == needle)
    answer_ids = tok(" " + case.passkey + ".", add_special_tokens=False).input_ids
    doc = torch.tensor([ids]); full = _prefill(model, doc)
    refs = C.capture_reference_queries(model, doc, ("repeat",), tok)
    small = copy.deepcopy(full)
    C.compact(model, small, 10, method=press, queries=["repeat"], reference_queries=refs, input_ids=doc, tokenizer=tok)
    L0 = len(ids)
    q_ids = torch.tensor([question + answer_ids])
    with C.recording_queries(model) as cap:
        model(q_ids, past_key_values=copy.deepcopy(full), position_ids=torch.arange(L0, L0 + q_ids.shape[1])[None], use_cache=True)
    for L in LAYERS:
        q = torch.cat(cap[L], -2)[..., len(question) - 1:, :]  # queries that predict the answer tokens
        ref = C._layer_output(full.layers[L], q, scaling, model.config, L0)
        got = C._layer_output(small.layers[L], q, scaling, model.config, L0)
        err = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).mean(1)[0]  # [H]
        # attention share of the needle per query head (full)
        k = full.layers[L].keys.float()
        H = q.shape[1]; G = H // k.shape[1]
        att = torch.softmax((q @ k.repeat_interleave(G, 1).transpose(-1, -2)) * scaling, -1)
        share = att[0, :, :, start:start + len(needle)].sum(-1).mean(-1)
        print(json.dumps({"seed": seed, "depth": depth, "layer": L, "slots": small.compaction_info["slots_per_kv_head"][L],
                          "rel_err_per_qhead": [round(float(e), 3) for e in err], "needle_share": [round(float(s), 3) for s in share]}), flush=True)
