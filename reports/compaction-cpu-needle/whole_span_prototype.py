import sys, json, importlib, runpy
from pathlib import Path
C = importlib.import_module("sparsemem.compact")
orig = C.allocate_by_scores
SPEC = {"threshold": 0.5}
def protected(scores, total, minimum=1):
    counts = orig(scores, total, minimum)
    sizes = [int(s.numel()) for s in scores]
    full = [c >= SPEC["threshold"] * n for c, n in zip(counts, sizes)]
    extra = sum(n - c for c, n, f in zip(counts, sizes, full) if f)
    rest = [c for c, f in zip(counts, full) if not f]
    pool = sum(rest)
    scale = max(0.0, (pool - extra) / pool)
    out = [n if f else max(minimum, int(c * scale)) for c, n, f in zip(counts, sizes, full)]
    print(json.dumps({"protected": sum(full), "extra": extra, "total": total, "new_total": sum(out)}), file=sys.stderr)
    return out
C.allocate_by_scores = protected
SPEC["threshold"] = float(sys.argv.pop(1))
sys.argv = ["exacttop.py"] + sys.argv[1:]
runpy.run_path(str(Path(__file__).with_name("exacttop.py")), run_name="__main__")
