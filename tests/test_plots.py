"""Every evaluation suite writes a PNG next to its JSON and markdown (with the `plot` extra)."""

import pytest

pytest.importorskip("matplotlib", reason="the `plot` extra")

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 1000


def test_every_suite_writes_its_png(tmp_path):
    from sparsemem.evaluation import ModelReport, PasskeyResult, write_reports
    from sparsemem.evaluation_compaction import CompactionResult, OnlineResult, write_compaction_report, write_online_report
    from sparsemem.plots import plot_scorer

    passkeys = [PasskeyResult(n, d, "123", "123" if d < 0.5 else "9", d < 0.5) for n in (1000, 2000) for d in (0.0, 0.5)]
    write_reports([ModelReport("dense", 7.1, 100, None, passkeys), ModelReport("sparsemem", 7.3, 100, 0.25, passkeys)],
                  {"model": "m"}, tmp_path / "retrieval")
    assert _is_png(tmp_path / "retrieval" / "eval.png")
    rows = [CompactionResult("full", 1, 0.0, 7.0, 100, 1.0, 0.0, 1.0)]
    rows += [CompactionResult(m, r, 0.01 * r, 7 + r / 10, 100 // r, r, 0.1, 0.5) for m in ("am", "kvzip") for r in (2, 5)]
    paths = write_compaction_report(rows, {"model": "m"}, tmp_path / "compaction")
    assert _is_png(tmp_path / "compaction" / "compaction.png") and paths[-1].name == "compaction.png"
    online = [OnlineResult("full", 0, 0.0, 7.0, 600, 0, 0.0)]
    online += [OnlineResult(m, b, 0.4, 13.0, b, 4, 1.0) for m in ("am", "h2o") for b in (256, 512)]
    paths = write_online_report(online, {"context_tokens": 3000, "decoded_tokens": 512}, tmp_path / "online")
    assert _is_png(tmp_path / "online" / "online.png") and paths[-1].name == "online.png"
    scorer = [{"model": m, "length": n, "nll_gap": 0.01 * i, "density": 0.2} for i, m in enumerate(("dense", "learned"))
              for n in (1024, 2048)]
    assert _is_png(plot_scorer(scorer, tmp_path / "scorer.png"))
    assert not list(tmp_path.rglob("*.tmp.png"))
