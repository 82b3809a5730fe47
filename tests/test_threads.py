"""`prefill`, `compact` and query capture run in one thread leave other threads' passes on the same model
untouched (no global attention switch, no hooks other threads see)."""

import threading

import torch
from conftest import make_base_model

import sparsemem

OPTIONS = dict(block_size=8, sink_tokens=4, local_tokens=16, top_k_blocks=2, block_fraction=None)


def _decode(model, ids, steps=40):
    """Logits of a prefill then `steps` greedy decode steps through a SparseMemCache: [steps + 1, vocab]."""
    cache = sparsemem.SparseMemCache(model.config)
    logits = [model(ids, past_key_values=cache).logits[0, -1]]
    for _ in range(steps):
        token = logits[-1].argmax().view(1, 1)
        logits.append(model(token, past_key_values=cache).logits[0, -1])
    return torch.stack(logits)


@torch.no_grad()
def test_prefill_in_another_thread_leaves_generation_and_captures_unchanged():
    model = sparsemem.convert(make_base_model("llama"), **OPTIONS)
    ids = torch.randint(3, 256, (1, 120), generator=torch.Generator().manual_seed(0))
    document = torch.randint(3, 256, (1, 150), generator=torch.Generator().manual_seed(1))
    alone = _decode(model, ids)
    dense = make_base_model("llama")(ids).logits[0, -1]
    assert (alone[0] - dense).abs().max() > 1e-3  # a pass switched to dense attention would show
    _, queries_alone = sparsemem.prefill(model, document)

    done, captured, errors = threading.Event(), [], []

    def prefill_until_done():
        try:
            while not done.is_set():
                captured.append(sparsemem.prefill(model, document)[1])
        except Exception as error:  # surfaced by the main thread
            errors.append(error)

    worker = threading.Thread(target=prefill_until_done)
    worker.start()
    try:
        together = _decode(model, ids)
        started = len(captured)
        while len(captured) < started + 2 and worker.is_alive():  # captures made while this thread decodes too
            _decode(model, ids, steps=2)
    finally:
        done.set()
        worker.join()
    assert not errors, errors
    assert len(captured) >= 2
    assert torch.allclose(together, alone, atol=1e-5), (together - alone).abs().max()
    for queries in captured:  # the prefill recorded its own queries, none of the generating thread's
        for layer, (q, _) in queries_alone.items():
            assert queries[layer][0].shape == q.shape
            assert torch.allclose(queries[layer][0], q, atol=1e-5)
