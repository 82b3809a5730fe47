"""The atomic folder writer: never loses the old copy, never replaces a foreign folder, cleans after dead
writers, keeps the umask's modes; and a document overwrite killed at random points leaves a whole one."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sparsemem.atomic import recover, staged_directory, write_text


def _write(target, text, marker="kind.json"):
    with staged_directory(target, marker=marker) as staging:
        (staging / marker).write_text(json.dumps({"text": text}))
        (staging / "data.bin").write_bytes(text.encode() * 1000)


def test_replaces_a_folder_of_its_kind_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "out"
    _write(target, "old")
    _write(target, "new")
    assert json.loads((target / "kind.json").read_text()) == {"text": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_refuses_a_folder_of_another_kind_and_a_file(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="without kind.json"):
        _write(foreign, "new")
    assert (foreign / "holiday.jpg").read_bytes() == b"precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        _write(tmp_path / "file", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "photos"]
    empty = tmp_path / "empty"
    empty.mkdir()
    _write(empty, "new")  # an empty folder holds nothing to lose
    assert (empty / "kind.json").is_file()


def test_a_writer_that_forgets_its_marker_replaces_nothing(tmp_path):
    target = tmp_path / "out"
    _write(target, "old")
    with pytest.raises(RuntimeError, match="did not write kind.json"):
        with staged_directory(target, marker="kind.json") as staging:
            (staging / "data.bin").write_bytes(b"x")
    assert json.loads((target / "kind.json").read_text()) == {"text": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_cleans_stale_staging_and_restores_a_copy_set_aside(tmp_path):
    dead = _dead_pid()
    # a writer killed while staging step-2, and one killed between setting `doc` aside and renaming in
    (tmp_path / f".step-2.sparsemem-staging-{dead}-abc").mkdir()
    aside = tmp_path / f".doc.sparsemem-old-{dead}-xyz"
    aside.mkdir()
    (aside / "kind.json").write_text(json.dumps({"text": "old"}))
    # a live writer's staging folder (this process) and a folder the writer does not own stay
    live = tmp_path / f".other.sparsemem-staging-{os.getpid()}-q"
    live.mkdir()
    (tmp_path / ".doc.abcdef").mkdir()
    recover(tmp_path / "doc")
    assert json.loads((tmp_path / "doc" / "kind.json").read_text()) == {"text": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".doc.abcdef", live.name, "doc"]
    (tmp_path / f".step-3.sparsemem-staging-{dead}-abc").mkdir()
    _write(tmp_path / "step-1", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".doc.abcdef", live.name, "doc", "step-1"]


def test_modes_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        _write(tmp_path / "out", "x")
        write_text(tmp_path / "report.md", "hello")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "kind.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == 0o644
    previous = os.umask(0o077)
    try:
        _write(tmp_path / "private", "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o700


# A server process builds two different documents once, then per run forks a child that overwrites the
# document again and again (alternating the two) until the server kills it with SIGKILL at a random
# moment (odd runs without the atomic exchange); it then loads what is there, writes once more and lists the folder.
_KILL_LOOP = r"""
import json, os, random, signal, sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[2])
from conftest import prefilled
from sparsemem import atomic
from sparsemem.documents import load_document, save_document

root, runs = sys.argv[1], int(sys.argv[3])
model, ids, first = prefilled("llama", 120, 100, top_k_blocks=None)
_, _, second = prefilled("llama", 120, 60, top_k_blocks=None)
docs = {100: first, 60: second}
path = os.path.join(root, "doc")
save_document(first, model, path)
rng = random.Random(0)
results = []
for run in range(runs):
    child = os.fork()
    if child == 0:
        if run % 2:  # odd runs: the portable swap (set aside, rename in, remove), as without renameat2
            atomic._exchange = lambda first, second: False
        try:
            while True:
                for doc in (second, first):
                    save_document(doc, model, path, overwrite=True)
        finally:
            os._exit(0)
    time.sleep(rng.uniform(0.0, 0.08))
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    loaded = load_document(path, model)
    length = loaded.get_seq_length()
    whole = all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
                for a, b in zip(loaded.layers, docs[length].layers))
    save_document(docs[length], model, path, overwrite=True)
    results.append({"length": length, "whole": whole, "left": sorted(os.listdir(root))})
print(json.dumps(results))
"""


def test_kill_during_overwrite_leaves_a_whole_document(tmp_path):
    runs = 24
    result = subprocess.run(
        [sys.executable, "-c", _KILL_LOOP, str(tmp_path), str(Path(__file__).parent), str(runs)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(results) == runs
    assert all(r["whole"] for r in results)
    assert all(r["left"] == ["doc"] for r in results), [r["left"] for r in results]
    # the kills landed while either copy was current: both the old and the new document were found
    assert {r["length"] for r in results} == {60, 100}
