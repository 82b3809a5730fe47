"""MemoryBank: exactness against document-wise reading, persistence, resumable ingestion, integrity."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import ByteTokenizer, make_base_model
from sparsemem.memory_bank import BankIntegrityError, BankModelMismatchError, MemoryBank
from sparsemem.memory_recall import recall

CHUNK, PIECE, SINKS = 16, 64, 2


def _model(seed=0):
    model = make_base_model("llama", seed=seed, max_position_embeddings=512)
    model.config._attn_implementation = "sdpa"
    return model


def _documents():
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, 256, (n,), generator=generator) for n in (70, 33, 150, 9)]


def _bank(folder, model, **options):
    options = {"chunk_tokens": CHUNK, "piece_tokens": PIECE, "sink_tokens": SINKS, "shard_tokens": 100, **options}
    return MemoryBank.create(folder, model, ByteTokenizer(), **options)


@torch.no_grad()
def _reference_logits(model, documents, question):
    """Every piece read with its own positions (a block-diagonal causal mask), laid out one after the other,
    the question after them all: the plain transformers model with a 4D mask."""
    pieces = [p for d in documents for p in d.split(PIECE)]
    ids = torch.cat(pieces + [question[0]])
    total, start = ids.numel(), 0
    mask = torch.full((total, total), float("-inf"))
    for piece in pieces:
        n = piece.numel()
        mask[start : start + n, start : start + n] = torch.triu(torch.full((n, n), float("-inf")), 1)
        start += n
    q = question.shape[1]
    mask[start:, :start] = 0
    mask[start:, start:] = torch.triu(torch.full((q, q), float("-inf")), 1)
    out = model(ids[None], attention_mask=mask[None, None], position_ids=torch.arange(total)[None])
    return out.logits[:, start:]


@torch.no_grad()
def _bank_logits(bank, question, **options):
    found = recall(bank, question, top_k=None, **options)
    return bank.model(question, past_key_values=found.cache).logits


@pytest.mark.parametrize("store", [{}, {"store": "tokens", "reread": "separate", "reread_context": None}], ids=["kv", "tokens"])
def test_every_chunk_selected_equals_document_wise_reading(tmp_path, store):
    # a bank of token ids reading every chunk with its whole piece before it computes the same K/V again
    model, documents = _model(), _documents()
    bank = _bank(tmp_path / "bank", model, **store)
    stats = bank.add(documents, progress=False)
    assert stats["documents"] == 4 and stats["tokens"] == sum(d.numel() for d in documents)
    assert len(bank.meta["shards"]) > 1  # several shards, and a document longer than a piece
    question = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    reference = _reference_logits(model, documents, question)
    logits = _bank_logits(MemoryBank.open(tmp_path / "bank", model), question)
    assert (logits - reference).abs().max().item() <= 1e-4
    # the question alone differs: the memory is really read
    alone = model(question).logits
    assert (alone - reference).abs().max().item() > 1e-2


def test_slot_path_with_every_key_kept_is_exact(tmp_path):
    # ratio 1.01 keeps 16 of 16 keys per chunk: Attention Matching returns them unchanged (beta 0), so the
    # compacted layout (slots, their RoPE shift and positions) must give the full-resolution logits
    model, documents = _model(), _documents()
    full = _bank(tmp_path / "full", model)
    full.add(documents, progress=False)
    slots = _bank(tmp_path / "slots", model, ratio=1.01)
    slots.add(documents, progress=False)
    assert int(slots.chunk_table[:, 5].sum()) > 0  # some chunks are held as slots
    question = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(3))
    assert (_bank_logits(slots, question) - _bank_logits(full, question)).abs().max().item() <= 1e-4


def test_compacted_bank_is_smaller_and_reads(tmp_path):
    model, documents = _model(), _documents()
    full = _bank(tmp_path / "full", model)
    full.add(documents, progress=False)
    compact = _bank(tmp_path / "am", model, ratio=4)
    compact.add(documents, progress=False)
    # the K/V shrink; the routing keys (the same in both, on the device and on disk) do not
    kv_bytes = lambda bank: bank.info()["bytes"]["disk"] - bank.info()["bytes"]["device"]  # noqa: E731
    assert compact.info()["bytes"]["device"] == full.info()["bytes"]["device"] > 0
    assert kv_bytes(compact) < 0.6 * kv_bytes(full)
    question = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(3))
    reference = _bank_logits(full, question).log_softmax(-1)
    compacted = _bank_logits(compact, question).log_softmax(-1)
    alone = model(question).logits.log_softmax(-1)
    kl = lambda p, q: (p.exp() * (p - q)).sum(-1).mean().item()  # noqa: E731
    assert kl(reference, compacted) < kl(reference, alone)


def test_top_k_selection_and_generate_memory(tmp_path):
    model, documents = _model(), _documents()
    bank = _bank(tmp_path / "bank", model)
    bank.add(documents, progress=False)
    question = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(4))
    found = recall(bank, question, top_k=3)
    assert all(len(c) == 3 for c in found.chunks) and found.width <= 3 * CHUNK + 3 * SINKS
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with_cache = bank.model.generate(question, past_key_values=found.cache, **kwargs)
    bank.recall.top_k = 3
    with_memory = bank.model.generate(question, memory=bank, **kwargs)
    assert torch.equal(with_cache, with_memory)
    per_layer = MemoryBank.open(tmp_path / "bank", model, selection="per-layer")
    chosen = recall(per_layer, question, top_k=3).chunks
    assert len(chosen) == model.config.num_hidden_layers and all(len(c) == 3 for c in chosen)
    with pytest.raises(ValueError, match="refresh_every"):
        bank.ask("abc", refresh_every=0)


def test_add_text_files_and_dataset(tmp_path):
    import datasets

    model = _model()
    bank = _bank(tmp_path / "bank", model)
    source = Path(json.__file__)
    first = bank.add([source, "a string document " * 5], progress=False)
    again = bank.add([source], progress=False)  # already there: skipped, nothing written
    rows = bank.add(datasets.Dataset.from_dict({"text": ["row one " * 4, "row two " * 4]}), progress=False)
    assert (first["documents"], again["skipped"], rows["documents"]) == (2, 1, 2)
    assert [d["name"] for d in bank.documents][0] == str(source)
    with pytest.raises(ValueError, match="column"):
        bank.add(datasets.Dataset.from_dict({"body": ["x"]}), progress=False)


def test_interrupted_ingestion_resumes_without_duplicates(tmp_path, monkeypatch):
    model, documents = _model(), _documents()
    whole = _bank(tmp_path / "whole", model)
    whole.add(documents, progress=False)

    commits = {"count": 0}
    original = MemoryBank._commit_shard

    def dies_on_second_shard(self, tensors, docs):
        if commits["count"] == 1:
            # killed while writing: a partial shard file lies where the next shard goes
            (self.folder / "shard-00001.safetensors").write_bytes(b"half a shard")
            (self.folder / ".shard-00001.safetensors.999999999.tmp").write_bytes(b"a dead writer's")
            raise KeyboardInterrupt("killed")
        commits["count"] += 1
        original(self, tensors, docs)

    monkeypatch.setattr(MemoryBank, "_commit_shard", dies_on_second_shard)
    bank = _bank(tmp_path / "resumed", model)
    with pytest.raises(KeyboardInterrupt):
        bank.add(documents, progress=False)
    monkeypatch.setattr(MemoryBank, "_commit_shard", original)
    reader = MemoryBank.open(tmp_path / "resumed", model)  # sees the committed shard only
    assert len(reader.meta["shards"]) == 1 and len(reader.documents) < len(documents)
    resumed = MemoryBank.open(tmp_path / "resumed", model)
    stats = resumed.add(documents, progress=False)
    assert stats["skipped"] == len(reader.documents)
    assert not list((tmp_path / "resumed").glob(".shard-*"))
    reopened = MemoryBank.open(tmp_path / "resumed", model)
    assert [d["sha256"] for d in reopened.documents] == [d["sha256"] for d in whole.documents]
    assert torch.equal(reopened.chunk_table[:, :3], whole.chunk_table[:, :3])
    assert torch.equal(reopened.piece_global_document, whole.piece_global_document)
    question = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(5))
    assert (_bank_logits(reopened, question) - _bank_logits(whole, question)).abs().max().item() == 0


def test_corrupted_shard_and_other_model_are_named_errors(tmp_path):
    model = _model()
    bank = _bank(tmp_path / "bank", model)
    bank.add(_documents(), progress=False)
    with pytest.raises(BankModelMismatchError):
        MemoryBank.open(tmp_path / "bank", _model(seed=1))
    shard = tmp_path / "bank" / bank.meta["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(BankIntegrityError, match="corrupt"):
        MemoryBank.open(tmp_path / "bank", model)
    lazy = MemoryBank.open(tmp_path / "bank", model, verify=False)  # checked when a question reads the shard
    with pytest.raises(BankIntegrityError, match="corrupt"):
        recall(lazy, torch.tensor([[5, 6, 7]]), top_k=None)
    manifest = tmp_path / "bank" / "bank.json"
    meta = json.loads(manifest.read_text())
    meta["options"]["chunk_tokens"] = 8
    manifest.write_text(json.dumps(meta))
    with pytest.raises(BankIntegrityError, match="edited"):
        MemoryBank.open(tmp_path / "bank", model)


def test_reopen_in_a_fresh_process(tmp_path):
    model, documents = _model(), _documents()
    model.save_pretrained(tmp_path / "model")
    bank = _bank(tmp_path / "bank", model)
    bank.add(documents, progress=False)
    question = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(6))
    expected = _bank_logits(bank, question)
    script = textwrap.dedent(f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        from sparsemem.memory_bank import MemoryBank
        from sparsemem.memory_recall import recall
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r}, dtype=torch.float32, attn_implementation="sdpa").eval()
        bank = MemoryBank.open({str(tmp_path / 'bank')!r}, model)
        question = torch.tensor({question.tolist()})
        with torch.no_grad():
            logits = bank.model(question, past_key_values=recall(bank, question, top_k=None).cache).logits
        print(json.dumps(logits[0, -1].tolist()))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    child = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    assert (child - expected[0, -1]).abs().max().item() <= 1e-5


@torch.no_grad()
def _kv_of(model, ids: torch.Tensor) -> torch.Tensor:
    """K/V [n, L, 2, Hkv, D] of `ids` [n] read alone with positions from 0 (the plain model)."""
    from transformers import DynamicCache

    from sparsemem.modeling.modeling_sparsemem import CACHE_ARGUMENT

    cache = DynamicCache()
    model(ids[None], **{CACHE_ARGUMENT: cache}, use_cache=True)
    return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]).permute(3, 0, 1, 2, 4)


@torch.no_grad()
def test_token_bank_reads_chunks_again_with_bounded_context(tmp_path):
    from sparsemem.memory_recall import _Fetched

    model, documents = _model(), _documents()
    full = _bank(tmp_path / "kv", model)
    full.add(documents, progress=False)
    context = 5
    calls = [0] * model.config.num_hidden_layers
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(model.model.layers)]
    bank = _bank(tmp_path / "tokens", model, store="tokens", reread="separate", reread_context=context)
    bank.add(documents, progress=False)
    for hook in hooks:
        hook.remove()
    last = max(bank.routing_layers)
    # ingestion stops after the last routing layer, and its routing keys are the full-resolution bank's
    assert all(calls[: last + 1]) and not any(calls[last + 1 :])
    assert torch.equal(bank.routing, full.routing) and torch.equal(bank.routing_scale, full.routing_scale)
    assert bank.info()["bytes"]["disk"] < full.info()["bytes"]["disk"] / 5
    # the third document (150 tokens): piece 0 holds chunks 7..10 (starts 2, 18, 34, 50)
    piece_ids = documents[2][:PIECE]
    sinks = piece_ids[:SINKS]
    first_chunk = int((bank.piece_global_document[bank.chunk_global_piece] == 2).nonzero()[0])
    assert bank.chunk_table[first_chunk, 1] == SINKS
    chosen = torch.tensor([first_chunk + 1, first_chunk + 3])  # tokens 18..34 and 50..64
    fetched = _Fetched(bank, chosen)
    for chunk, start, end in ((first_chunk + 1, 18, 34), (first_chunk + 3, 50, 64)):
        reference = _kv_of(model, torch.cat([sinks, piece_ids[start - context : end]]))
        assert (fetched.exact[chunk] - reference[SINKS + context :]).abs().max().item() <= 1e-5
        assert fetched.first_position[chunk] == SINKS + context
    assert (fetched.sinks[int(bank.chunk_global_piece[first_chunk])] - reference[:SINKS]).abs().max().item() <= 1e-5
    # a hidden chunk is not read as context either: the chunk after it is read from its own start
    hidden = _Fetched(bank, chosen[:1], hidden=torch.tensor([first_chunk]))
    reference = _kv_of(model, torch.cat([sinks, piece_ids[18:34]]))
    assert (hidden.exact[first_chunk + 1] - reference[SINKS:]).abs().max().item() <= 1e-5
    # asked through recall, the layout puts the re-read keys where the stored ones would go: with the whole piece
    # as context the token bank answers as the full-resolution bank does, for a top-k choice too
    whole = _bank(tmp_path / "whole", model, store="tokens", reread="separate", reread_context=None)
    whole.add(documents, progress=False)
    question = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(4))
    expected = full.model(question, past_key_values=recall(full, question, top_k=3).cache).logits
    found = recall(whole, question, top_k=3)
    assert (whole.model(question, past_key_values=found.cache).logits - expected).abs().max().item() <= 1e-4


@torch.no_grad()
def test_joint_rereading_equals_reading_the_chunks_as_one_prompt(tmp_path):
    # reread="joint" (the default of a bank of token ids): the chosen chunks' tokens in bank order, then the
    # question, read by the plain model as one prompt
    model, documents = _model(), _documents()
    bank = _bank(tmp_path / "tokens", model, store="tokens")
    bank.add(documents, progress=False)
    assert bank.options.reread == "joint" and bank.options.reread_context is None
    question = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(4))
    found = recall(bank, question, top_k=3)
    chunks = found.chunks[0]
    assert len(chunks) == 3 and found.width == int(bank.chunk_table[chunks, 2].sum())  # no sinks
    memory = [bank.read_rows(int(bank.chunk_shard[c]), "ids", int(bank.chunk_table[c, 3]), int(bank.chunk_table[c, 2]))
              for c in chunks.tolist()]
    prompt = torch.cat([torch.cat(memory).long(), question[0]])[None]
    expected = model(prompt).logits[:, -question.shape[1]:]
    logits = bank.model(question, past_key_values=found.cache).logits
    assert (logits - expected).abs().max().item() <= 1e-4
    # generate(memory=bank) reads the same chunks again
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    bank.recall.top_k = 3
    with_memory = bank.model.generate(question, memory=bank, **kwargs)
    assert torch.equal(with_memory, model.generate(prompt, **kwargs)[:, -question.shape[1] - 3 :])


def test_token_bank_options_are_checked(tmp_path):
    model = _model()
    with pytest.raises(ValueError, match="ratio"):
        _bank(tmp_path / "a", model, store="tokens", ratio=4)
    with pytest.raises(ValueError, match="reread_context"):
        _bank(tmp_path / "b", model, store="tokens", reread="separate", reread_context=-1)
    with pytest.raises(ValueError, match="reread_context.*reread='separate'"):
        _bank(tmp_path / "c", model, reread_context=16)  # a K/V bank reads nothing again
    with pytest.raises(ValueError, match="reread_context.*reread='separate'"):
        _bank(tmp_path / "c2", model, store="tokens", reread_context=16)  # joint reading reads no context
    with pytest.raises(ValueError, match="reread.*store='tokens'"):
        _bank(tmp_path / "c3", model, reread="joint")
    with pytest.raises(ValueError, match="reread"):
        _bank(tmp_path / "c4", model, store="tokens", reread="together")
    with pytest.raises(ValueError, match="store"):
        _bank(tmp_path / "d", model, store="text")
    bank = _bank(tmp_path / "e", model, store="tokens", reread="separate")
    from sparsemem.memory_bank import REREAD_CONTEXT

    assert bank.options.reread_context == REREAD_CONTEXT
    assert MemoryBank.open(tmp_path / "e", model).options.store == "tokens"


@pytest.mark.slow
@pytest.mark.parametrize("storage", [[], ["--ratio", "8"], ["--store", "tokens"]], ids=["full", "am8", "tokens"])
def test_smollm2_bank_answers_a_needle_from_a_fresh_process(tmp_path, storage):
    """Real text (two standard-library sources, ~2.5K tokens, ~40 chunks) with a secret number inside, read
    from the top 2 chunks (routing must rank the needle's chunk first or second): ingested by the
    CLI in one process, asked by the CLI in another, which finds the bank's model by itself. Compacted 8x,
    the digits must still be read back (fitting each chunk to its own queries lost them)."""
    import difflib
    import string

    from sparsemem.corpus import needle_wording

    needle, question = needle_wording("secret-number")
    first = Path(string.__file__).read_text()
    second = Path(difflib.__file__).read_text()[:4000]
    cut = first.find("\n", len(first) // 2) + 1
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a_string.py").write_text(first[:cut] + needle.format(key=73914) + first[cut:])
    (tmp_path / "docs" / "b_difflib.py").write_text(second)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    run = lambda *args: subprocess.run([sys.executable, "-m", "sparsemem.cli", *args], capture_output=True, text=True,  # noqa: E731
                                       env=env, timeout=600)
    bank = str(tmp_path / "bank")
    ingest = run("memory", "ingest", "--bank", bank, "--device", "cpu", "--piece-tokens", "1024", "--batch-tokens", "4096",
                 *storage, str(tmp_path / "docs"))
    assert ingest.returncode == 0, ingest.stderr[-2000:]
    info = run("memory", "info", "--bank", bank, "--device", "cpu")
    assert info.returncode == 0, info.stderr[-2000:]
    facts = json.loads(info.stdout)
    assert facts["documents"] == 2 and facts["tokens"] > 2000
    full_resolution = facts["tokens"] * 46080  # 30 layers x 2 x 3 KV heads x 64 x 4 bytes (fp32)
    if "--ratio" in storage:  # the slots (with beta, position, head), sinks and each piece's last chunk exact, routing keys
        assert facts["bytes"]["disk"] < full_resolution / 4
    elif "--store" in storage:  # token ids and the routing keys (every key of one layer: 3 KV heads x (64 + 2) bytes)
        assert facts["bytes"]["disk"] < facts["tokens"] * 300
    else:
        assert facts["bytes"]["disk"] > full_resolution
    ask = run("memory", "ask", "--bank", bank, "--device", "cpu", "--top-k", "2", "--max-new-tokens", "8", question)
    assert ask.returncode == 0, ask.stderr[-2000:]
    answer, _, read = ask.stdout.partition("documents read:")
    assert "73914" in answer
    assert "a_string.py" in read


@torch.no_grad()
def _reference_scores(bank, question, pool, quantized=False):
    """Chunk scores computed the long way: every chunk's keys read back from the shards, rotated back to
    position 0, pooled, and met by the question's centred queries, one chunk and head at a time.
    `quantized`: the routing keys rounded as the bank stores them (int8 codes times their scale)."""
    from sparsemem.memory_bank import quantize_routing_keys
    from sparsemem.memory_recall import question_queries
    from sparsemem.modeling.rope import shift_keys

    queries = question_queries(bank.model, question)
    rotary, scaling = bank.model.model.rotary_emb, bank.model.model.layers[0].self_attn.scaling
    group = bank.model.config.num_attention_heads // bank.num_kv_heads
    rows = []
    for number, layer in enumerate(bank.routing_layers):
        q = queries[layer] - queries[layer].mean(dim=1, keepdim=True)  # [H, n, D]
        logits = torch.empty(q.shape[0], q.shape[1], bank.num_chunks)
        for chunk in range(bank.num_chunks):
            _, start, length, row, _, _ = bank.chunk_table[chunk].tolist()
            kv = bank.read_rows(int(bank.chunk_shard[chunk]), "kv", row, length)  # full resolution: exact rows
            keys = shift_keys(rotary, kv[:, layer, 0].transpose(0, 1).float(), -torch.arange(start, start + length))
            if pool == "mean":
                keys = keys.mean(1, keepdim=True)
            if quantized:  # [Hkv, n, D] keys of this routing layer, minus the bank's center, rounded
                center = bank.routing_center[number][:, None]
                codes, scale = quantize_routing_keys(keys, center)
                keys = codes.float() * scale.float()[..., None] + center
            for head in range(q.shape[0]):
                k = keys[head // group]
                logits[head, :, chunk] = (q[head] @ k.T * scaling).amax(-1)
        rows.append(torch.softmax(logits, dim=-1).sum(dim=(0, 1)))
    return torch.stack(rows)


@pytest.mark.parametrize("pool", ["max", "mean"])
def test_routing_scores_match_a_dense_reference(tmp_path, monkeypatch, pool):
    import sparsemem.memory_recall as memory_recall

    monkeypatch.setattr(memory_recall, "_ROUTING_BLOCK", 7)  # several blocks of routing keys per layer
    model, documents = _model(), _documents()
    bank = _bank(tmp_path / "bank", model, routing_layers=[1, 0], routing_pool=pool)
    bank.add(documents, progress=False)
    assert bank.routing_layers == [0, 1]
    tokens = sum(d.numel() for d in documents) - SINKS * bank.piece_table.shape[0]
    assert bank.routing.shape[2] == (tokens if pool == "max" else bank.num_chunks)
    question = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(7))
    queries = memory_recall.question_queries(bank.model, question)
    scores = memory_recall.chunk_scores(MemoryBank.open(tmp_path / "bank", model), queries, exclude=None)
    assert torch.allclose(scores, _reference_scores(bank, question, pool, quantized=True), atol=1e-5)
    # int8 routing keys (minus the center) score every chunk as the exact keys do to within 0.1%, and rank the
    # top three alike; the center is the mean routing key of the first pass, kept in the manifest
    stored = json.loads((tmp_path / "bank" / "bank.json").read_text())["routing_center"]
    assert bank.routing_center.shape == (2, bank.num_kv_heads, bank.head_dim)
    assert torch.equal(torch.tensor(stored), bank.routing_center)
    exact = _reference_scores(bank, question, pool)
    assert torch.allclose(scores, exact, rtol=1e-3, atol=0)
    assert torch.equal(scores.sum(0).topk(3).indices, exact.sum(0).topk(3).indices)
    assert bank.routing.dtype == torch.int8 and bank.routing_chunk.dtype == torch.int32
    # exclude and include: never read / always read, whatever the score
    best = int(scores.sum(0).argmax())
    worst = scores.sum(0).argsort()[:2].tolist()
    found = recall(bank, question, top_k=3, exclude=[best], include=worst, min_relative_score=0)
    assert best not in found.chunks[0].tolist() and set(worst) <= set(found.chunks[0].tolist())
    # per-layer: each layer reads the choice of its nearest routing layer (here: its own)
    per_layer = recall(bank, question, top_k=3, selection="per-layer", min_relative_score=0).chunks
    for layer in (0, 1):
        assert per_layer[layer].tolist() == sorted(scores[layer].topk(3).indices.tolist())
    # chunks under a fraction of the best score are left out: at 1, only the best is read
    assert recall(bank, question, top_k=3, min_relative_score=1).chunks[0].tolist() == [best]
    floor = 0.9 * scores.sum(0).max()
    expected = sorted(c for c in scores.sum(0).topk(3).indices.tolist() if scores.sum(0)[c] >= floor)
    assert recall(bank, question, top_k=3, min_relative_score=0.9).chunks[0].tolist() == expected
    with pytest.raises(ValueError, match="routing_layers"):
        _bank(tmp_path / "bad", model, routing_layers=[2])


def test_refresh_every_reroutes_on_the_answer_so_far(tmp_path):
    from sparsemem.memory_recall import generate_from_memory

    model, documents = _model(), _documents()
    bank = _bank(tmp_path / "bank", model)
    bank.add(documents, progress=False)
    question = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(8))
    # every chunk read: each round reads the same memory, so re-reading the answer so far changes nothing
    once, rounds, _ = generate_from_memory(bank, question, 6, top_k=None)
    refreshed, rounds, _ = generate_from_memory(bank, question, 6, refresh_every=2, top_k=None)
    assert len(rounds) == 3 and torch.equal(once, refreshed)
    # top 3 of 11 chunks: round r is routed by the question and the first 2r tokens of the answer, and
    # continues as a plain generate from that memory would
    answer, rounds, _ = generate_from_memory(bank, question, 6, refresh_every=2, top_k=3)
    assert answer.numel() == 6 and len(rounds) == 3
    for r, found in enumerate(rounds):
        prompt = torch.cat([question[0], answer[: 2 * r]])[None]
        expected = recall(bank, prompt, top_k=3)
        assert torch.equal(found.chunks[0], expected.chunks[0])
        step = bank.model.generate(prompt, past_key_values=expected.cache, max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert torch.equal(step[0, prompt.shape[1]:], answer[2 * r : 2 * r + 2])
    assert any(not torch.equal(rounds[0].chunks[0], found.chunks[0]) for found in rounds[1:])  # the memory did move


def _byte_level_tokenizer():
    """A real (fast) transformers tokenizer over the test models' 256-token vocabulary: one token per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    spare = iter(range(256, 512))
    chars = {b: chr(b if b in printable else next(spare)) for b in range(256)}  # byte-level BPE's alphabet
    tokenizer = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=chars[1], pad_token=chars[0])


def test_text_generation_pipeline_reads_the_bank(tmp_path):
    from transformers import pipeline

    tokenizer = _byte_level_tokenizer()
    assert tokenizer("abc é")["input_ids"] == list("abc é".encode())
    model = _model()
    bank = MemoryBank.create(tmp_path / "bank", model, tokenizer, chunk_tokens=CHUNK, piece_tokens=PIECE, sink_tokens=SINKS)
    bank.add(_documents(), progress=False)
    bank.recall.top_k = 3
    generator = pipeline("text-generation", model=bank.model, tokenizer=tokenizer)  # bank.model: the converted model
    prompt = "where is it?"
    out = generator(prompt, memory=bank, max_new_tokens=4, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = bank.model.generate(ids, past_key_values=recall(bank, ids, top_k=3).cache, max_new_tokens=4,
                                   do_sample=False, pad_token_id=0)
    alone = bank.model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert list(out) == expected[0].tolist() and not torch.equal(expected, alone)


@torch.no_grad()
def test_compacted_chunks_equal_attention_matching_on_the_reference_queries(tmp_path):
    """Each compacted chunk's slots, per layer and KV head, are what the bank's press makes of that chunk given
    its reference queries (the repetition pass's, `reference_window`, each over the piece, and the first
    reading's right after the chunk, `following_window`, each over the keys up to its own position, both
    computed here from the forward pass) and the budget the bank chose; the budgets spend the piece's slots
    exactly, and every (chunk, layer, KV head) keeps at least one slot."""
    from sparsemem.bank_compaction import REPEAT_PROMPT, chunk_press, following_window, reference_window, repeat_rows
    from sparsemem.query_sources import query_hook
    from sparsemem.modeling.attention_matching import SpanProblem
    from sparsemem.modeling.compaction import HeadSpan, group_queries

    model = _model()
    piece = _documents()[2][:PIECE]  # one piece: 2 sinks, 3 whole chunks of 16 and a shorter last one
    bank = _bank(tmp_path / "am", model, ratio=4)
    bank.add([piece], progress=False)
    sparse, hkv = bank.model, bank.num_kv_heads
    scaling = sparse.model.layers[0].self_attn.scaling
    prompt = torch.tensor(ByteTokenizer()(REPEAT_PROMPT)["input_ids"])
    captured = {}
    with query_hook(sparse, lambda layer, q: captured.__setitem__(layer, q)):
        out = sparse(repeat_rows([piece], prompt), use_cache=True)
    cache = out.past_key_values
    n, read = piece.numel(), PIECE + prompt.numel()
    compacted = (bank.chunk_table[:, 5] == 1).nonzero()[:, 0].tolist()
    assert len(compacted) == 3
    total = compared = 0
    for chunk in compacted:
        _, start, length, row, rows, _ = bank.chunk_table[chunk].tolist()
        stored = {name: bank.read_rows(0, name, row, rows) for name in ("slot_kv", "slot_beta", "slot_rope", "slot_head")}
        head_of = stored["slot_head"].long()
        total += rows
        window = reference_window(torch.tensor([start]), torch.tensor([n]), CHUNK)[0]
        following = following_window(torch.tensor([start]), torch.tensor([n]), prompt.numel(), CHUNK)[0]
        assert following.max() < read and following.min() == start + CHUNK
        # what each reference query reads: a repetition query the piece, a first-reading query the keys up to it
        seen = torch.cat([(torch.arange(read)[None] < n).expand(window.numel(), -1), torch.arange(read)[None] <= following[:, None]])
        for layer in range(model.config.num_hidden_layers):
            queries = torch.cat([captured[layer][:, :, read + window], captured[layer][:, :, following]], dim=2)
            keys, values = cache.layers[layer].keys[0, :, :read].float(), cache.layers[layer].values[0, :, :read].float()
            for head in range(hkv):
                budget = int((head_of == layer * hkv + head).sum())
                assert budget >= 1
                q = group_queries(queries, head, hkv)  # [1, G*Q, D]
                logits = (q @ keys[head].T * scaling).masked_fill(~seen.repeat(q.shape[1] // seen.shape[0], 1), float("-inf"))
                span = torch.arange(start, start + length)
                problem = SpanProblem(q, keys[head, span][None], values[head, span][None], torch.zeros(1, length),
                                      torch.logsumexp(logits, dim=-1), scaling)
                if budget >= length:
                    index, slot_keys, slot_values, beta = span[None] - start, problem.keys, problem.values, problem.key_bias
                else:
                    index, slot_keys, slot_values, beta = chunk_press().compact(
                        HeadSpan(problem, span, torch.full((q.shape[1],), -1), span[None]), budget)
                # sorted by position on both sides: the order slots are stored in carries no meaning
                expected = index[0].argsort()
                own = (head_of == layer * hkv + head).nonzero()[:, 0]
                got = own[stored["slot_rope"][own].long().argsort()]
                assert torch.equal(stored["slot_rope"][got].long(), start + index[0, expected])
                assert torch.allclose(stored["slot_kv"][got, 0].float(), slot_keys[0, expected], atol=1e-5)
                # the fits carry the two paths' float rounding (1e-7 in the attention weights) further: the NNLS of
                # the weights exp(beta) and the value fit are solved in differently composed batches (measured:
                # weights within 2.5%, values within 0.004; a slot of weight 0.01 has beta -4.46 or -4.32)
                assert torch.allclose(stored["slot_kv"][got, 1].float(), slot_values[0, expected], rtol=1e-2, atol=5e-3)
                assert torch.allclose(stored["slot_beta"][got].exp(), beta[0, expected].exp(), rtol=5e-2, atol=2e-3)
                compared += 1
    assert compared == len(compacted) * model.config.num_hidden_layers * hkv
    layers_heads = model.config.num_hidden_layers * hkv
    assert total == 3 * layers_heads * round(CHUNK / 4)
    assert torch.unique(bank.read_rows(0, "slot_head", 0, total).long()).numel() == layers_heads


def test_old_format_is_a_named_error(tmp_path):
    from sparsemem.memory_bank import BankFormatError, _meta_checksum

    model = _model()
    bank = _bank(tmp_path / "bank", model)
    bank.add(_documents()[:1], progress=False)
    manifest = tmp_path / "bank" / "bank.json"
    meta = json.loads(manifest.read_text())
    meta["format"] = "sparsemem-memory-bank/2"
    meta["checksum"] = _meta_checksum(meta)
    manifest.write_text(json.dumps(meta))
    with pytest.raises(BankFormatError, match="memory-bank/2"):
        MemoryBank.open(tmp_path / "bank", model)
    with pytest.raises(ValueError, match="tokenizer"):
        MemoryBank.create(tmp_path / "no-tokenizer", model, None, ratio=4)
    with pytest.raises(ValueError, match="whole_span_share"):
        _bank(tmp_path / "share", model, whole_span_share=0.5)  # without ratio


@torch.no_grad()
def test_repetition_queries_measure_their_attention_as_compact_does():
    """`RepeatedPieces.measure` on a padded batch of two pieces: each row's repetition queries, their
    log-sum-exp over the piece's keys, and their share against what they read besides the piece, computed
    as `compact` computes it for repeat queries (`causal_lse` with `REPEAT_REACH`); and the first reading's
    log-sum-exps at chosen offsets, each over the keys up to its own position."""
    from sparsemem.bank_compaction import REPEAT_PROMPT, RepeatedPieces, repeat_rows
    from sparsemem.query_sources import REPEAT_REACH, causal_lse, query_hook
    from sparsemem.conversion import convert

    model = convert(_model(), top_k_blocks=None, block_fraction=None, positions="logical")
    scaling = model.model.layers[0].self_attn.scaling
    prompt = torch.tensor(ByteTokenizer()(REPEAT_PROMPT)["input_ids"])
    pieces = [_documents()[2][:60], _documents()[0][:41]]
    captured = {}
    with query_hook(model, lambda layer, q: captured.__setitem__(layer, q)):
        cache = model(repeat_rows(pieces, prompt), use_cache=True).past_key_values
    keys = torch.stack([layer.keys for layer in cache.layers])
    measured = RepeatedPieces.measure(captured, keys, torch.tensor([60, 41]), prompt.numel(), scaling, block=16)
    # first-reading offsets of four chunks (two per row, in no order, sharing some), measured only there
    generator, p = torch.Generator().manual_seed(0), prompt.numel()
    rows = torch.tensor([0, 1, 0, 1])
    chosen = torch.stack([torch.randperm(n + p, generator=generator)[:24] for n in (60, 41, 60, 41)])
    following_lse = measured.following_lse(keys, rows, chosen, scaling, block=7)  # [c, L, H, F]
    for row, piece in enumerate(pieces):
        n, p = piece.numel(), prompt.numel()
        for layer in range(keys.shape[0]):
            q = captured[layer][row : row + 1, :, n + p : 2 * n + p]  # [1, H, n, D]
            k = keys[layer, row : row + 1]
            assert torch.equal(measured.queries[layer, row, :, :n], q[0])
            group = q.shape[1] // k.shape[1]
            piece_lse = torch.logsumexp(q @ k[:, :, :n].repeat_interleave(group, 1).transpose(-1, -2) * scaling, dim=-1)
            outside = causal_lse(q, k[:, :, n : 2 * n + p], p, scaling, reach=REPEAT_REACH)
            assert torch.allclose(measured.lse[layer, row, :, :n], piece_lse[0], atol=1e-5)
            assert torch.allclose(measured.share[layer, row, :, :n], torch.sigmoid(piece_lse - outside)[0], atol=1e-5)
            # the first reading (piece, then prompt): its queries, each over the keys up to its own position
            first = captured[layer][row, :, : n + p]  # [H, n + p, D]
            assert torch.equal(measured.following[layer, row, :, : n + p], first)
            logits = first @ k[0, :, : n + p].repeat_interleave(group, 0).transpose(-1, -2) * scaling
            causal = torch.triu(torch.full((n + p, n + p), float("-inf")), 1)
            expected = torch.logsumexp(logits + causal, dim=-1)  # [H, n + p]
            for chunk in (rows == row).nonzero()[:, 0].tolist():
                assert torch.allclose(following_lse[chunk, layer], expected[:, chosen[chunk]], atol=1e-5)


def _chunk_shares(bank, chunk: int, question: torch.Tensor, queries: dict) -> torch.Tensor:
    """[L, Hkv]: the share of the question's attention (`queries` {layer: [1, H, n, D]}, post-RoPE) that the one
    chunk `chunk` gets when it is read alone (its piece's sinks, then it) right before the question."""
    from sparsemem.memory_recall import build_cache

    cache, width = build_cache(bank, [torch.tensor([chunk])] * bank.num_layers)
    scaling = bank.model.model.layers[0].self_attn.scaling
    hkv = bank.num_kv_heads
    shares = []
    for layer, held in enumerate(cache.layers):
        q = queries[layer][0].float()  # [H, n, D]
        group = q.shape[0] // hkv
        own = held.positions >= int(bank.piece_table[bank.chunk_global_piece[chunk], 2])  # the chunk's exact entries
        logits = q @ held.keys[0].float().repeat_interleave(group, 0).transpose(-1, -2) * scaling  # [H, n, N]
        parts, chunk_parts = [logits], [logits[..., own]]
        if held.slots is not None:
            slots = held.slots
            slot_logits = q @ slots.keys[0].float().T * scaling + slots.beta[0]  # [H, n, S]
            mine = slots.head[None, :] == torch.arange(q.shape[0])[:, None] // group  # [H, S]
            slot_logits = slot_logits.masked_fill(~mine[:, None], float("-inf"))
            parts.append(slot_logits)
            chunk_parts.append(slot_logits)
        total = torch.logsumexp(torch.cat(parts, -1), -1)
        share = torch.exp(torch.logsumexp(torch.cat(chunk_parts, -1), -1) - total)  # [H, n] of the memory's attention
        shares.append(share.view(hkv, group, -1).mean(dim=(1, 2)))
    return torch.stack(shares)


def test_compacted_chunk_read_right_before_a_question_keeps_its_attention_share(tmp_path):
    """A chunk laid out right before a question gets a large share of the attention of heads that read
    their nearest tokens broadly; a compacted chunk must keep it in every (layer, KV head): each head keeps
    slots in every chunk, fitted also to the queries right after the chunk. Reference: the same chunk at full
    resolution, the same question queries (those of the full-resolution reading)."""
    from sparsemem.memory_recall import build_cache
    from sparsemem.query_sources import query_hook

    model, documents = _model(), _documents()
    full, compact = _bank(tmp_path / "full", model), _bank(tmp_path / "am", model, ratio=8)
    full.add(documents[:3], progress=False)
    compact.add(documents[:3], progress=False)
    question = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(5))
    worst = []
    for chunk in (compact.chunk_table[:, 5] == 1).nonzero()[:, 0].tolist():
        cache, _ = build_cache(full, [torch.tensor([chunk])] * full.num_layers)
        queries = {}
        with torch.no_grad(), query_hook(full.model, lambda layer, q: queries.__setitem__(layer, q)):
            full.model(question, past_key_values=cache)
        exact, slots = _chunk_shares(full, chunk, question, queries), _chunk_shares(compact, chunk, question, queries)
        worst.append((slots / exact).log().abs().max())
    assert max(worst) < 1
