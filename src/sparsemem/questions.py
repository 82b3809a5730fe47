"""One document, many questions: read (and compact) a context once, answer every question from that cache.

Each answer is generated on top of the document's cache and cropped off again, so the questions never
see each other and the document is neither read twice nor copied per question (the first answer moves
it into an append buffer once; the later ones write over the previous answer's room).
"""

import logging
from pathlib import Path

import torch

from .cache_compaction import compact, prefill
from .query_sources import ContextQueries, query_sources_for
from .documents import save_document
from .modeling.cache import SparseMemCache

logger = logging.getLogger(__name__)


def read_document(model, tokenizer, context, ratio: float | None = None, method: str = "am", save_to=None,
                  **compact_options) -> SparseMemCache:
    """A `SparseMemCache` holding `context` (text or token ids [1, n]), compacted `ratio` times with
    `method` when `ratio` is given (from the queries of the same pass, or as `compact_options` say),
    and saved as a document at `save_to` when given (`load_document` reads it back)."""
    if isinstance(context, str):
        ids = tokenizer(context, return_tensors="pt").input_ids
    elif isinstance(context, torch.Tensor) and context.dim() == 2 and context.shape[0] == 1:
        ids = context
    else:
        raise ValueError("`context` must be text or token ids of shape [1, n]")
    if ids.shape[1] == 0:
        raise ValueError("`context` is empty")
    if ratio is None and compact_options:
        raise ValueError(f"compaction options {sorted(compact_options)} given without a `ratio`")
    ids = ids.to(model.device)
    cache, queries = prefill(model, ids)
    if ratio is not None:
        if "queries" in compact_options or query_sources_for(method) != (ContextQueries(),):
            # other reference queries (given, or the press's own, e.g. KVzip's repeat pass): a pass of their own
            compact_options.setdefault("input_ids", ids)
        else:
            compact_options.setdefault("reference_queries", queries)
        compact(model, cache, ratio, method=method, tokenizer=tokenizer, **compact_options)
    if save_to is not None:
        save_document(cache, model, Path(save_to))
    return cache


@torch.no_grad()
def ask(model, tokenizer, context, questions, ratio: float | None = None, method: str = "am", save_to=None,
        compact_options: dict | None = None, **generate_kwargs) -> list[str]:
    """Answers to `questions` (a string or a list of them) about `context`.

    `context`: text or token ids [1, n], read once (and compacted `ratio` times with `method`, saved at
    `save_to`; see `read_document`), or a `SparseMemCache` already holding the document (e.g. from
    `load_document`), which is answered from and left as it was. Each question is tokenized without
    special tokens and continues the document; `generate_kwargs` go to `model.generate`
    (default: greedy, 64 new tokens).
    """
    single = isinstance(questions, str)
    questions = [questions] if single else list(questions)
    if not questions or not all(isinstance(q, str) and q for q in questions):
        raise ValueError("`questions` must be a non-empty string or a list of non-empty strings")
    if isinstance(context, SparseMemCache):
        if ratio is not None or save_to is not None or compact_options:
            raise ValueError("`context` is already a cache: `ratio`, `save_to` and `compact_options` apply to text or ids")
        cache = context
    else:
        cache = read_document(model, tokenizer, context, ratio, method, save_to, **(compact_options or {}))
    if getattr(cache, "online", None) is not None:
        raise ValueError("answering several questions needs a cache without online compaction (`max_kv_tokens`)")
    for name in ("past_key_values", "cache", "max_kv_tokens"):
        if name in generate_kwargs:
            raise ValueError(f"`{name}` cannot be given to ask(): every answer reads the document's cache")
    for name in ("num_beams", "num_return_sequences"):
        if generate_kwargs.get(name, 1) != 1:
            raise ValueError(f"ask() answers one sequence per question from one cache: `{name}` must be 1")
    generate_kwargs.setdefault("max_new_tokens", 64)
    generate_kwargs.setdefault("do_sample", False)
    if generate_kwargs.get("pad_token_id") is None and getattr(model.generation_config, "pad_token_id", None) is None:
        generate_kwargs["pad_token_id"] = tokenizer.eos_token_id
    length = cache.get_seq_length()
    answers = []
    for question in questions:
        ids = tokenizer(question, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
        try:
            out = model.generate(ids, past_key_values=cache, **generate_kwargs)
        finally:
            cache.crop(length)  # back to the document alone, for the next question
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        logger.info("answered %d of %d questions", len(answers), len(questions))
    return answers[0] if single else answers
