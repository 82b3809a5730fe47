"""`MemoryBank`: a corpus far larger than the model's window, read once, kept on disk, queried many times.

Each document is read once by the model with document-wise positions: its positions start at 0, and a
document longer than `piece_tokens` (at most the trained context) is read in pieces that each start at 0.
Per piece the bank keeps
- its first `sink_tokens` entries exact (attention sinks, laid out ahead of any chunk of the piece that
  a question reads), and
- the rest in chunks of `chunk_tokens`, each either exact or, with `ratio`, compacted by Attention
  Matching into slots `(k, v, beta)`, `chunk_tokens / ratio` per layer and KV head on average, ranked over
  the piece's layers, heads and chunks and fitted to the queries of a pass that repeats the piece (see
  `bank_compaction.py`; the last, shorter chunk of a piece stays exact), and
- routing keys: at the routing layers (`routing_layers`), the chunk's keys rotated back to position 0,
  every one (`routing_pool="max"`: a question scores a chunk by its best-matching key) or their mean
  (`"mean"`: one key per chunk), so a question's queries (also at position 0) score every chunk with one
  matmul, position-free. They are stored as int8 with one fp16 scale per key and KV head (66 bytes per
  key and KV head rather than 128 in bf16), which ranks chunks as the exact keys do up to rounding.

Keys are stored as the model rotated them, at their position inside the piece (recorded), and moved to
wherever a question lays them out with one re-rotation (`rope.shift_keys`). See `memory_recall.py` for
asking.

A bank with `store="tokens"` keeps no K/V: per piece its token ids (sinks and chunks alike) and the routing
keys, and a question's chunks are read again by the model when it is asked (`memory_recall._Fetched`,
`reread`). Its ingestion needs only the routing keys, so the forward pass stops after the last routing layer.

On disk a bank is a folder with `bank.json` (format, model fingerprint, options, and per shard its file,
SHA-256, and the documents it holds) and shards `shard-NNNNN.safetensors`, each holding whole documents:
- `kv` [N, L, 2, Hkv, D]: exact entries, token-major so one chunk is one contiguous read (`store="tokens"`:
  `ids` [N] (int32) instead, a piece's tokens in order, and no slot tensors);
- `slot_kv` [S, 2, D], `slot_beta` [S] (fp32), `slot_rope` [S] (int32), `slot_head` [S] (int16: layer x
  KV heads + KV head): compacted chunks, each chunk's slots sorted by layer and KV head;
- `routing_keys` [R, Lr, Hkv, D] (int8), `routing_scale` [R, Lr, Hkv] (fp16) and `routing_chunk` [R]
  (the chunk each routing key belongs to);
  `chunks` [C, 6] (piece, start, length, row, rows, compacted) and `pieces`
  [P, 4] (document, sink row, sinks, piece index in its document), all rows local to the shard.
A shard is written under a temporary name and renamed, then `bank.json` is replaced atomically: a reader
sees only whole shards, and an ingestion killed at any point resumes with the same `add` call (documents
already in the bank, known by their token ids' SHA-256, are skipped; a shard file not in `bank.json` is
written over). Reading checks every shard's SHA-256 (`BankIntegrityError`), the model fingerprint
(`BankModelMismatchError`) and the format (`BankFormatError`: a bank of an older format is rebuilt, not
read). Shards are memory-mapped: only the chunks a question reads are paged in.
"""

import hashlib
import json
import logging
import math
import os
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as serialize
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from .atomic import recover, write_text
from .documents import model_fingerprint
from .modeling.modeling_sparsemem import CACHE_ARGUMENT
from .modeling.rope import shift_keys, trained_context

logger = logging.getLogger(__name__)

FORMAT = "sparsemem-memory-bank/3"
MANIFEST = "bank.json"
SHARD_NAME = "shard-{:05d}.safetensors"
# chunk table columns
PIECE, START, LENGTH, ROW, ROWS, COMPACTED = range(6)
# piece table columns
DOCUMENT, SINK_ROW, SINKS, PIECE_INDEX = range(4)
ROUTING_POOLS = ("max", "mean")
STORES = ("kv", "tokens")
REREADS = ("joint", "separate")
# tokens of a chunk's piece read again before it (reread="separate"): on SmolLM2, 6 needles in 32K tokens,
# 0 and 64 read 5 of 6 back, 256 all 6 (`reports/memory-bank-cpu/tokens/32k-separate`)
REREAD_CONTEXT = 256


def default_routing_layers(num_layers: int) -> list[int]:
    """The layer a sixth of the way up. Measured on SmolLM2-135M (30 layers; needles in 12K and 32K tokens of
    Python sources, every key of a chunk kept): the lower layers match the question's words to the
    chunk's, and layer 5 alone ranked the needle's chunk first for every needle; the upper half, where
    mean-pooled routing looked, ranked it 0-9th at 12K and worse at 32K."""
    return [num_layers // 6]


class BankIntegrityError(ValueError):
    """A bank's shard or manifest differs from what was written (truncated, corrupt or edited)."""


class BankModelMismatchError(ValueError):
    """A bank was built by a model whose weights or architecture differ from the one given."""


class BankFormatError(ValueError):
    """A bank was written in another on-disk format (an older sparsemem): rebuild it from its documents."""


@dataclass
class BankOptions:
    """How a bank reads and stores documents (fixed when the bank is created).

    chunk_tokens: tokens per chunk, the unit a question retrieves and the unit routing scores.
    piece_tokens: the longest span read in one pass with positions from 0; longer documents are read in
        pieces of this size. Default: the model's trained context, at most 4096 (with `ratio`: a piece and
        its repetition must fit the trained context).
    sink_tokens: first entries of every piece kept exact and laid out ahead of the piece's retrieved chunks
        (a model attends heavily to the first tokens it read; without them a retrieved chunk reads wrong).
    ratio: compact every whole chunk `ratio` times on average by Attention Matching (see
        `bank_compaction.py`: each piece is then read together with its repetition, about twice the tokens
        per forward pass); None keeps full resolution.
    whole_span_share: with `ratio`, a (layer, KV head) that wins this share of a piece's entries in the
        budget ranking keeps all of them exact (see `head_budgets.allocate_by_scores`); None: none.
        "auto": `head_budgets.WHOLE_SPAN_SHARE` with `ratio`, None without.
    batch_tokens: tokens (rows x longest piece) per forward pass while ingesting.
    shard_tokens: a shard is closed once it holds this many tokens (documents are never split across shards).
    routing_layers: layers whose keys route questions to chunks (their routing keys live on the model's
        device). None: `default_routing_layers`.
    routing_pool: "max" keeps every key of a chunk at the routing layers and scores the chunk by the best
        match (a needle is a few tokens of a chunk; a mean over 64 keys washes it out); "mean" keeps one
        mean key per chunk (`chunk_tokens` times fewer routing bytes).
    store: what the bank keeps of a chunk for reading it. "kv": its K/V as the model computed them (exact,
        23 KB per token for SmolLM2 in bf16, or compacted with `ratio`). "tokens": its token ids only (4 bytes
        per token); a question's chunks are read again when it is asked (see `reread`), and ingestion runs the
        model only up to the last routing layer, since it keeps nothing above it. A 10M-token bank then fits
        a disk and every chunk a question reads is exact, at the price of a forward pass over the chunks read
        per question.
    reread: with store="tokens", how the chosen chunks are read again. "joint": as one text, in bank order,
        the question right after (each chunk also sees the chunks chosen before it, as a retrieval-augmented
        prompt reads them). "separate": each chunk with its own piece's sink tokens and `reread_context`
        tokens before it, laid out as stored K/V would be (document-wise, the other chunks unseen). Measured
        on SmolLM2 (10 needles in 128K tokens of Python sources, top 8): the same chosen chunks answer 10 of
        10 read jointly, 8 of 10 read separately with 256 tokens of context. "auto": "joint" for a bank of
        token ids; a "kv" bank takes no other value.
    reread_context: with reread="separate", how many tokens of a chunk's piece before it are read again with
        it, after the piece's sink tokens. None: all of them, which gives exactly the K/V the "kv" store keeps
        (a forward over up to a whole piece per chunk read). "auto": `REREAD_CONTEXT` with reread="separate";
        otherwise nothing is read around a chunk, so it takes no other value.
    """

    chunk_tokens: int = 64
    piece_tokens: int | None = None
    sink_tokens: int = 4
    ratio: float | None = None
    batch_tokens: int = 32768
    shard_tokens: int = 262144
    routing_layers: list[int] | None = None
    routing_pool: str = "max"
    whole_span_share: float | str | None = "auto"
    store: str = "kv"
    reread: str | None = "auto"
    reread_context: int | str | None = "auto"

    def validate(self, model_config, repeat_prompt_tokens: int = 0) -> "BankOptions":
        """Checks the options and resolves the defaults; `repeat_prompt_tokens`: the length of the prompt
        between a piece and its repetition (compacted banks)."""
        for name in ("chunk_tokens", "batch_tokens", "shard_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        if not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
            raise ValueError(f"`sink_tokens` must be an integer >= 0, got {self.sink_tokens!r}")
        context = trained_context(model_config) or 4096
        # a compacted bank reads a piece, the prompt and the piece again in one pass
        longest = context if self.ratio is None else (context - repeat_prompt_tokens) // 2
        if self.piece_tokens is None:
            self.piece_tokens = min(4096, longest)
        if not isinstance(self.piece_tokens, int) or not self.sink_tokens < self.piece_tokens <= longest:
            reason = "the trained context" if self.ratio is None else "a piece read twice must fit the trained context"
            raise ValueError(f"`piece_tokens` must be an integer in ({self.sink_tokens}, {longest}] ({reason}), "
                             f"got {self.piece_tokens!r}")
        if self.store not in STORES:
            raise ValueError(f"`store` must be one of {STORES}, got {self.store!r}")
        if self.store == "tokens":
            if self.ratio is not None:
                raise ValueError("`ratio` compacts stored K/V: a bank with store='tokens' keeps token ids and reads "
                                 "its chunks again exactly; give one of them")
            if self.reread == "auto":
                self.reread = "joint"
            elif self.reread not in REREADS:
                raise ValueError(f"`reread` must be one of {REREADS} or 'auto', got {self.reread!r}")
        elif self.reread not in ("auto", None):
            raise ValueError(f"`reread` applies to banks with store='tokens' (a 'kv' bank reads nothing again), "
                             f"got {self.reread!r}")
        else:
            self.reread = None
        if self.reread == "separate":
            if self.reread_context == "auto":
                self.reread_context = REREAD_CONTEXT
            elif self.reread_context is not None and (isinstance(self.reread_context, bool)
                                                      or not isinstance(self.reread_context, int) or self.reread_context < 0):
                raise ValueError(f"`reread_context` must be an integer >= 0, None (the whole piece before a chunk) or "
                                 f"'auto', got {self.reread_context!r}")
        elif self.reread_context not in ("auto", None):
            raise ValueError(f"`reread_context` applies to banks with store='tokens' and reread='separate' (this bank "
                             f"reads nothing around a chunk), got {self.reread_context!r}")
        else:
            self.reread_context = None
        if self.ratio is not None:
            if not (isinstance(self.ratio, (int, float)) and math.isfinite(self.ratio) and self.ratio > 1):
                raise ValueError(f"`ratio` must be a finite number > 1 or None (full resolution), got {self.ratio!r}")
            if self.sink_tokens < 1:
                raise ValueError("a compacted bank needs `sink_tokens` >= 1: the exact entries a piece is read from")
            self.ratio = float(self.ratio)
        share = self.whole_span_share
        if share == "auto":
            from .bank_compaction import WHOLE_SPAN_SHARE

            share = WHOLE_SPAN_SHARE if self.ratio is not None else None
        elif share is not None:
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
                raise ValueError(f"`whole_span_share` must be a fraction in (0, 1], 'auto' or None, got {share!r}")
            if self.ratio is None:
                raise ValueError("`whole_span_share` applies to compacted banks: give `ratio` too, or leave it unset")
            share = float(share)
        self.whole_span_share = share
        layers = model_config.num_hidden_layers
        if self.routing_layers is None:
            self.routing_layers = default_routing_layers(layers)
        routing = self.routing_layers
        if (not isinstance(routing, (list, tuple)) or not routing or any(not isinstance(i, int) for i in routing)
                or len(set(routing)) != len(routing) or min(routing) < 0 or max(routing) >= layers):
            raise ValueError(f"`routing_layers` must be a non-empty list of distinct layer indices in [0, {layers}), "
                             f"got {routing!r}")
        self.routing_layers = sorted(routing)
        if self.routing_pool not in ROUTING_POOLS:
            raise ValueError(f"`routing_pool` must be one of {ROUTING_POOLS}, got {self.routing_pool!r}")
        if self.batch_tokens < self.read_tokens(self.piece_tokens, repeat_prompt_tokens):
            raise ValueError(f"`batch_tokens` ({self.batch_tokens}) must hold one piece's pass "
                             f"({self.read_tokens(self.piece_tokens, repeat_prompt_tokens)} tokens)")
        return self

    def read_tokens(self, piece: int, repeat_prompt_tokens: int) -> int:
        """Tokens of the forward pass that reads a piece of `piece` tokens (compacted: with its repetition)."""
        return piece if self.ratio is None else 2 * piece + repeat_prompt_tokens

    @property
    def slots_per_chunk(self) -> int:
        return max(1, round(self.chunk_tokens / self.ratio)) if self.ratio else self.chunk_tokens


def quantize_routing_keys(keys: torch.Tensor, center: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing keys [..., Lr, Hkv, D] -> (int8 codes [..., Lr, Hkv, D], fp16 scales [..., Lr, Hkv]) of the keys
    minus `center` [Lr, Hkv, D]: symmetric, one scale per key and head, so code * scale is the key minus the
    center to within half a step (max |key - center| / 254).

    The center is the bank's mean routing key per layer and KV head, fixed by its first forward pass. It
    changes no routing score: a question's logit for every key of a head moves by the same q . center, and
    scores are softmaxes over chunks. It takes out the part all keys share (on SmolLM2 layer 5: norm 14 of
    keys of norm 17), so the step is about half as large: with 6 needles and 3 code questions in 32K tokens,
    top-8 selections equal those of the exact keys for 9 of 9 questions (7 of 9 without the center; 9 of 9
    in bf16). At 10M tokens one routing layer of SmolLM2 takes 1.9 GiB of device memory, not 3.6 in bf16."""
    keys = keys.float() - center.to(keys.device, torch.float32)
    if not bool(torch.isfinite(keys).all()):
        raise FloatingPointError("routing keys hold non-finite values")
    scale = (keys.abs().amax(dim=-1) / 127).to(torch.float16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero key: codes 0 at any scale
    codes = (keys / scale[..., None]).round().clamp(-127, 127).to(torch.int8)
    return codes, scale.to(torch.float16)


class _StopForward(Exception):
    """Ends a forward pass once the layers it needs have run."""


@contextmanager
def _stop_after(model, layer: int | None):
    """Within it, a forward pass of `model` stops after decoder layer `layer` (None: runs to the end); the
    layers it ran have filled their caches by then."""
    if layer is None:
        yield
        return

    def stop(module, args, output):
        raise _StopForward

    handle = model.model.layers[layer].register_forward_hook(stop)
    try:
        yield
    except _StopForward:
        pass
    finally:
        handle.remove()


def _token_sha(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()[:32]


def _meta_checksum(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _sparsemem_model(model):
    """The model a bank reads with: `model` itself when it is a sparsemem model (its options are kept),
    else its dense-equivalent conversion (shares the weights)."""
    if getattr(model.config, "block_size", None) is not None:
        return model
    from .conversion import convert

    return convert(model, top_k_blocks=None, block_fraction=None, positions="logical")


class _ShardWriter:
    """Writes shards in a background thread, in order, each followed by the manifest that lists it; the
    forward passes of the next shard run meanwhile. At most `depth` shards wait in memory."""

    def __init__(self, bank: "MemoryBank", depth: int = 2):
        self.bank = bank
        self.jobs: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="sparsemem-bank-writer", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is None:
                try:
                    self.bank._commit_shard(*job)
                except BaseException as error:  # noqa: BLE001 - re-raised in the ingesting thread
                    self.error = error

    def put(self, tensors: dict, documents: list[dict]):
        self.check()
        self.jobs.put((tensors, documents))

    def check(self):
        if self.error is not None:
            raise self.error

    def close(self):
        self.jobs.put(None)
        self.thread.join()
        self.check()


class MemoryBank:
    """A memory bank in `folder` for one model. Make one with `MemoryBank.create`, reopen it (in any
    process) with `MemoryBank.open`, fill it with `add`, ask with `ask` or `model.generate(..., memory=bank)`."""

    def __init__(self, folder: Path, model, tokenizer, meta: dict, verify: bool = True, selection: str = "shared"):
        from .memory_recall import RecallOptions

        self.folder = Path(folder)
        # a plain model reads full-resolution documents with its own attention; compaction needs the
        # sparsemem model's query capture
        self._plain = None if getattr(model.config, "block_size", None) is not None else model
        self.model = _sparsemem_model(model)
        self.tokenizer = tokenizer
        self.meta = meta
        self.options = BankOptions(**meta["options"])
        self.repeat_prompt = torch.tensor(meta["repeat_prompt_ids"], dtype=torch.long)  # compacted banks' repetition pass
        config = self.model.config
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.recall = RecallOptions(selection=selection).validate(self.num_layers)
        self.routing_layers = self.options.routing_layers  # layers whose routing keys are on the device
        self._handles: dict[int, object] = {}
        self._lock = threading.Lock()
        self._load_tables(verify)

    # -- creation and opening ---------------------------------------------------------------------

    @classmethod
    def create(cls, folder, model, tokenizer=None, chunk_tokens: int = 64, ratio: float | None = None,
               piece_tokens: int | None = None, sink_tokens: int = 4, batch_tokens: int = 32768,
               shard_tokens: int = 262144, routing_layers: list[int] | None = None, routing_pool: str = "max",
               whole_span_share: float | str | None = "auto", store: str = "kv", reread: str | None = "auto",
               reread_context: int | str | None = "auto", exist_ok: bool = False, **open_options) -> "MemoryBank":
        """A new, empty bank in `folder` (created; an existing bank there is refused unless `exist_ok`,
        which opens it instead, checking that the options match). See `BankOptions` for the options; a
        compacted bank (`ratio`) needs the `tokenizer` (for the prompt of its repetition pass)."""
        folder = Path(folder)
        sparse = _sparsemem_model(model)
        repeat_prompt = []
        if ratio is not None:
            if tokenizer is None:
                raise ValueError("a compacted bank (`ratio`) reads each piece again after a prompt: pass the `tokenizer`")
            from .bank_compaction import REPEAT_PROMPT

            repeat_prompt = list(tokenizer(REPEAT_PROMPT, add_special_tokens=False)["input_ids"])
        options = BankOptions(chunk_tokens=chunk_tokens, piece_tokens=piece_tokens, sink_tokens=sink_tokens, ratio=ratio,
                              batch_tokens=batch_tokens, shard_tokens=shard_tokens, routing_layers=routing_layers,
                              routing_pool=routing_pool, whole_span_share=whole_span_share, store=store,
                              reread=reread, reread_context=reread_context).validate(sparse.config, len(repeat_prompt))
        if (folder / MANIFEST).exists():
            if not exist_ok:
                raise FileExistsError(f"{folder} already holds a memory bank; open it with MemoryBank.open")
            bank = cls.open(folder, model, tokenizer, **open_options)
            stored = asdict(bank.options)
            for name, value in asdict(options).items():
                if name not in ("batch_tokens",) and stored[name] != value:
                    raise ValueError(f"{folder} was created with {name}={stored[name]!r}, not {value!r}")
            return bank
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} is a non-empty folder without {MANIFEST}: refusing to make a bank in it")
        folder.mkdir(parents=True, exist_ok=True)
        config = sparse.config
        meta = {
            "format": FORMAT,
            "model_fingerprint": model_fingerprint(sparse),
            "model": str(getattr(config, "_name_or_path", "") or ""),
            "dtype": str(sparse.dtype).removeprefix("torch."),
            "num_layers": config.num_hidden_layers,
            "num_key_value_heads": config.num_key_value_heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            "options": asdict(options),
            "repeat_prompt_ids": repeat_prompt,
            "routing_center": None,
            "shards": [],
        }
        meta["checksum"] = _meta_checksum(meta)
        write_text(folder / MANIFEST, json.dumps(meta, indent=1))
        return cls(folder, model, tokenizer, meta, verify=False, **open_options)

    @classmethod
    def open(cls, folder, model, tokenizer=None, verify: bool = True, selection: str = "shared") -> "MemoryBank":
        """Open the bank in `folder` for `model` (the same weights it was built with, else
        `BankModelMismatchError`). `verify`: check every shard's SHA-256 now (reads the whole bank once);
        without it the routing tables are trusted and a shard is checked before a question first reads its chunks. `selection`: "shared"
        (one choice of chunks for all layers) or "per-layer" (see `memory_recall.RecallOptions`)."""
        folder = Path(folder)
        meta = read_manifest(folder)
        sparse = _sparsemem_model(model)
        fingerprint = model_fingerprint(sparse)
        if meta["model_fingerprint"] != fingerprint:
            raise BankModelMismatchError(
                f"{folder} was built with a different model (fingerprint {meta['model_fingerprint']}, this model "
                f"{fingerprint}{'; the bank names ' + meta['model'] if meta.get('model') else ''})"
            )
        config = sparse.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        for key, value in (("num_layers", config.num_hidden_layers), ("num_key_value_heads", config.num_key_value_heads),
                           ("head_dim", head_dim)):
            if meta.get(key) != value:
                raise BankModelMismatchError(f"{folder / MANIFEST}: {key} is {meta.get(key)}, the model has {value}")
        return cls(folder, model, tokenizer, meta, verify=verify, selection=selection)

    # -- tables -----------------------------------------------------------------------------------

    def _load_tables(self, verify: bool) -> None:
        """Chunk and piece tables of the whole bank (host), routing keys (model's device)."""
        self._verified: set[int] = set()
        self.chunk_table = torch.zeros(0, 6, dtype=torch.long)
        self.chunk_shard = torch.zeros(0, dtype=torch.long)
        self.piece_table = torch.zeros(0, 4, dtype=torch.long)
        self.piece_shard = torch.zeros(0, dtype=torch.long)
        self.chunk_global_piece = torch.zeros(0, dtype=torch.long)
        self.piece_global_document = torch.zeros(0, dtype=torch.long)
        self.routing = None  # [Lr, Hkv, R, D] routing keys (int8 codes), model's device
        self.routing_scale = None  # [Lr, Hkv, R] their scales (fp16)
        center = self.meta.get("routing_center")  # [Lr, Hkv, D], set by the first `add`
        self.routing_center = None if center is None else torch.tensor(center, device=self.model.device)
        self.routing_chunk = torch.zeros(0, dtype=torch.int32, device=self.model.device)  # [R] global chunk id
        self.documents: list[dict] = []
        self._known = set()
        for index, shard in enumerate(self.meta["shards"]):
            if verify:
                self._verify(index)
            self._append_tables(index, shard)

    def _append_tables(self, index: int, shard: dict) -> None:
        handle = self._handle(index, checked=False)  # `verify=False`: checked before its chunks are first read
        chunks, pieces = handle.get_tensor("chunks"), handle.get_tensor("pieces")
        device = self.model.device
        routing = handle.get_tensor("routing_keys").to(device).permute(1, 2, 0, 3).contiguous()  # [Lr, Hkv, R, D]
        scale = handle.get_tensor("routing_scale").to(device).permute(1, 2, 0).contiguous()  # [Lr, Hkv, R]
        self.routing = routing if self.routing is None else torch.cat([self.routing, routing], dim=2)
        self.routing_scale = scale if self.routing_scale is None else torch.cat([self.routing_scale, scale], dim=2)
        # int32: 4 bytes per routing key on the device (a bank holds fewer than 2**31 chunks)
        owner = (handle.get_tensor("routing_chunk").to(device) + self.chunk_table.shape[0]).to(torch.int32)
        self.routing_chunk = torch.cat([self.routing_chunk, owner])
        self.chunk_global_piece = torch.cat([self.chunk_global_piece, chunks[:, PIECE] + self.piece_table.shape[0]])
        self.piece_global_document = torch.cat([self.piece_global_document, pieces[:, DOCUMENT] + len(self.documents)])
        self.chunk_table = torch.cat([self.chunk_table, chunks])
        self.chunk_shard = torch.cat([self.chunk_shard, torch.full((chunks.shape[0],), index, dtype=torch.long)])
        self.piece_table = torch.cat([self.piece_table, pieces])
        self.piece_shard = torch.cat([self.piece_shard, torch.full((pieces.shape[0],), index, dtype=torch.long)])
        self.documents.extend(shard["documents"])
        self._known.update(d["sha256"] for d in shard["documents"])

    def _path(self, index: int) -> Path:
        return self.folder / self.meta["shards"][index]["file"]

    def _verify(self, index: int) -> None:
        shard = self.meta["shards"][index]
        path = self._path(index)
        if not path.is_file():
            raise BankIntegrityError(f"{path} is missing: {MANIFEST} lists it")
        if path.stat().st_size != shard["bytes"] or _file_sha256(path) != shard["sha256"]:
            raise BankIntegrityError(f"{path} is truncated or corrupt: its SHA-256 differs from the one in {MANIFEST}")
        self._verified.add(index)

    def _handle(self, index: int, checked: bool = True):
        """The shard's memory-mapped reader; `checked`: its SHA-256 verified first (once per shard)."""
        with self._lock:
            if checked and index not in self._verified:
                self._verify(index)
            if index not in self._handles:
                try:
                    self._handles[index] = safe_open(str(self._path(index)), framework="pt", device="cpu")
                except (SafetensorError, OSError) as error:
                    raise BankIntegrityError(f"{self._path(index)} cannot be read: {error}") from None
            return self._handles[index]

    # -- adding documents -------------------------------------------------------------------------

    def add(self, source, name: str | None = None, text_column: str = "text", progress: bool = True) -> dict:
        """Read documents into the bank. `source`: a string (one document's text), a `pathlib.Path` (a text
        file, or a folder: its files in sorted order), token ids (a list of ints or a 1-D tensor: one
        document), a `datasets.Dataset` (one document per row, `text_column`), or a list of any of these.
        Documents already in the bank (same token ids) are skipped, so repeating an interrupted `add`
        resumes it. Returns {"documents", "tokens", "skipped", "seconds", "tokens_per_second"}."""
        start = time.perf_counter()
        self._remove_dead_temporaries()
        stats = {"documents": 0, "tokens": 0, "skipped": 0}
        writer = _ShardWriter(self)
        pending: list[tuple[dict, torch.Tensor]] = []
        pending_tokens = 0
        bar = tqdm(desc="ingest", unit="tok", unit_scale=True, disable=not progress)
        try:
            for doc_name, ids in self._documents(source, name, text_column):
                if ids.numel() == 0:
                    continue
                sha = _token_sha(ids)
                if sha in self._known:
                    stats["skipped"] += 1
                    continue
                self._known.add(sha)
                pending.append(({"name": doc_name, "sha256": sha, "tokens": int(ids.numel())}, ids))
                pending_tokens += ids.numel()
                if pending_tokens >= self.options.shard_tokens:
                    self._ingest_shard(pending, writer, bar, stats)
                    pending, pending_tokens = [], 0
            if pending:
                self._ingest_shard(pending, writer, bar, stats)
        finally:
            bar.close()
            writer.close()
        stats["seconds"] = time.perf_counter() - start
        stats["tokens_per_second"] = stats["tokens"] / max(stats["seconds"], 1e-9)
        logger.info("ingested %d documents, %d tokens (%.0f tokens/s); %d already in the bank", stats["documents"],
                    stats["tokens"], stats["tokens_per_second"], stats["skipped"])
        return stats

    def _remove_dead_temporaries(self) -> None:
        """Shard files half-written by a process that died (`.shard-NNNNN.safetensors.PID.tmp`)."""
        from .atomic import _pid_alive

        for path in self.folder.glob(".shard-*.tmp"):
            pid = path.name.rsplit(".", 2)[-2]
            if pid.isdigit() and not _pid_alive(int(pid)):
                path.unlink(missing_ok=True)

    def _documents(self, source, name, text_column):
        """(name, token ids [n] int64 on the host) of every document in `source`."""
        if isinstance(source, (list, tuple)) and not (source and isinstance(source[0], int)):
            for index, item in enumerate(source):
                yield from self._documents(item, None if name is None else f"{name}[{index}]", text_column)
            return
        if isinstance(source, Path):
            if source.is_dir():
                for path in sorted(p for p in source.rglob("*") if p.is_file()):
                    yield from self._documents(path, None, text_column)
                return
            if not source.is_file():
                raise FileNotFoundError(f"document file {source} does not exist")
            yield name or str(source), self._encode(source.read_text(encoding="utf-8", errors="replace"))
            return
        if isinstance(source, str):
            yield name or f"text-{hashlib.sha256(source.encode()).hexdigest()[:12]}", self._encode(source)
            return
        if isinstance(source, torch.Tensor) or (isinstance(source, (list, tuple)) and source and isinstance(source[0], int)):
            ids = torch.as_tensor(source, dtype=torch.long).cpu()
            if ids.dim() == 2 and ids.shape[0] == 1:
                ids = ids[0]
            if ids.dim() != 1:
                raise ValueError(f"token ids must be one document: shape [n] or [1, n], got {tuple(ids.shape)}")
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.model.config.vocab_size):
                raise ValueError(f"token ids must lie in [0, {self.model.config.vocab_size}) (the model's vocabulary)")
            yield name or f"ids-{_token_sha(ids)[:12]}", ids
            return
        if hasattr(source, "column_names") and hasattr(source, "__iter__"):  # a datasets.Dataset
            if text_column not in source.column_names:
                raise ValueError(f"the dataset has no column {text_column!r} (columns: {source.column_names}); pass text_column=")
            for index, row in enumerate(source):
                yield f"{name or 'dataset'}[{index}]", self._encode(row[text_column])
            return
        raise ValueError(f"cannot add a {type(source).__name__}: give text (str), a pathlib.Path, token ids, "
                         "a datasets.Dataset or a list of these")

    def _encode(self, text: str) -> torch.Tensor:
        if self.tokenizer is None:
            raise ValueError("adding text needs the bank's tokenizer: pass tokenizer= to MemoryBank.create/open")
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def _pieces(self, documents):
        """(document index, piece index, ids) of every piece of the documents."""
        size = self.options.piece_tokens
        for doc_index, (_, ids) in enumerate(documents):
            for piece_index, start in enumerate(range(0, ids.numel(), size)):
                yield doc_index, piece_index, ids[start : start + size]

    @torch.no_grad()
    def _ingest_shard(self, documents, writer: _ShardWriter, bar, stats) -> None:
        pieces = list(self._pieces(documents))
        results = [None] * len(pieces)
        lengths = [self.options.read_tokens(piece.numel(), self.repeat_prompt.numel()) for _, _, piece in pieces]
        for batch in self.batches(lengths):
            for i, result in zip(batch, self._read_pieces([pieces[i][2] for i in batch])):
                results[i] = result
            bar.update(sum(pieces[i][2].numel() for i in batch))
        tensors = self._assemble(pieces, results)
        writer.put(tensors, [doc for doc, _ in documents])
        stats["documents"] += len(documents)
        stats["tokens"] += sum(doc["tokens"] for doc, _ in documents)

    def _read_pieces(self, pieces: list[torch.Tensor]) -> list[dict]:
        """One forward pass over right-padded pieces (padding comes after every real token, so causal
        attention never lets a real token see it); a compacted bank reads each piece, the repetition
        prompt and the piece again (`bank_compaction.py`). Per piece: stored rows (K/V or token ids), routing
        keys, slots."""
        from .bank_compaction import RepeatedPieces, compact_pieces, repeat_rows

        model = self.model
        lengths = torch.tensor([p.numel() for p in pieces])
        if self.options.ratio:
            ids = repeat_rows(pieces, self.repeat_prompt)
        else:
            ids = pad_sequence(pieces, batch_first=True)  # right-padded with 0
        queries: dict[int, torch.Tensor] = {}
        record = (lambda layer, q: queries.__setitem__(layer, q)) if self.options.ratio else None
        # a bank of token ids keeps nothing above its last routing layer
        last = max(self.options.routing_layers) if self.options.store == "tokens" else None
        keys, values = self.forward_kv(ids, record=record, last_layer=last)
        rotary = model.model.rotary_emb
        out, whole = [], []
        for row, piece in enumerate(pieces):
            n = piece.numel()
            k, v = keys[:, row, :, :n], values[:, row, :, :n]  # [L, Hkv, n, D]
            sinks = min(self.options.sink_tokens, n - 1)
            starts = list(range(sinks, n, self.options.chunk_tokens))
            lengths_of = [min(self.options.chunk_tokens, n - s) for s in starts]
            routing, routing_chunk = self._routing_keys(k, sinks, len(starts), rotary)
            # rows: what the bank stores per token, K/V [n, L, 2, Hkv, D] or token ids [n]
            rows = piece.to(torch.int32) if self.options.store == "tokens" else torch.stack([k, v], dim=1).permute(3, 0, 1, 2, 4)
            out.append({"rows": rows, "sinks": sinks, "starts": starts, "lengths": lengths_of, "routing": routing,
                        "routing_chunk": routing_chunk, "slots": {}})
            # the last, shorter chunk of a piece stays exact
            whole += [(row, chunk, start) for chunk, (start, length) in enumerate(zip(starts, lengths_of))
                      if length == self.options.chunk_tokens]
        if self.routing_center is None:  # the bank's first pass fixes it (see `quantize_routing_keys`)
            self.routing_center = torch.cat([piece["routing"] for piece in out]).float().mean(0)  # [Lr, Hkv, D]
            self.meta["routing_center"] = self.routing_center.tolist()
        for piece in out:
            piece["routing"], piece["routing_scale"] = quantize_routing_keys(piece["routing"], self.routing_center)
        if self.options.ratio and whole:
            scaling = model.model.layers[0].self_attn.scaling
            repeated = RepeatedPieces.measure(queries, keys, lengths, self.repeat_prompt.numel(), scaling)
            del queries
            slots = compact_pieces(keys, values, repeated, whole, self.options.chunk_tokens, self.options.slots_per_chunk,
                                   scaling, self.options.whole_span_share)
            for (row, chunk, _), chunk_slots in zip(whole, slots):
                out[row]["slots"][chunk] = chunk_slots
        return out

    def batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices of rows of `lengths` tokens in groups of at most `batch_tokens` padded tokens (rows x longest
        row), longest first so that each forward pass pads little; a row longer than `batch_tokens` goes alone."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        groups: list[list[int]] = []
        for i in order:
            if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= self.options.batch_tokens:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    @torch.no_grad()
    def forward_kv(self, ids: torch.Tensor, record=None, last_layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values), each [L, B, Hkv, T, D], of one forward pass over `ids` [B, T] with positions from 0:
        a plain model with its own attention, or the sparsemem model with dense SDPA (`record(layer, queries)`
        gets each layer's queries, for compaction). `last_layer`: stop after this layer (L = last_layer + 1)."""
        from transformers import DynamicCache

        from .query_sources import query_hook
        from .modeling.call_context import call_settings

        model = self.model
        ids = ids.to(model.device, non_blocking=True)
        cache = DynamicCache()
        plain = record is None and self._plain is not None
        with _stop_after(self._plain if plain else model, last_layer):
            if plain:
                self._plain(ids, **{CACHE_ARGUMENT: cache}, use_cache=True, logits_to_keep=1)  # its own (dense) attention
            else:
                with call_settings(model, attn_implementation="sdpa"), query_hook(model, record):
                    model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        layers = cache.layers if last_layer is None else cache.layers[: last_layer + 1]
        return torch.stack([layer.keys for layer in layers]), torch.stack([layer.values for layer in layers])

    def _routing_keys(self, k: torch.Tensor, sinks: int, chunks: int, rotary) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing keys of one piece's chunks (`k` [L, Hkv, n, D] as rotated at positions 0..n-1): at the
        routing layers, rotated back to position 0, token-major [R, Lr, Hkv, D] in the model's dtype, and the
        piece-local chunk each belongs to [R]."""
        n = k.shape[2]
        position = torch.arange(sinks, n, device=k.device)
        layers = torch.tensor(self.options.routing_layers, device=k.device)
        unrotated = shift_keys(rotary, k[layers, :, sinks:].float(), -position)  # [Lr, Hkv, n - sinks, D]
        chunk_of = (position - sinks) // self.options.chunk_tokens
        if self.options.routing_pool == "mean":
            pooled = torch.zeros(*unrotated.shape[:2], chunks, unrotated.shape[-1], device=k.device)
            pooled.index_add_(2, chunk_of, unrotated)
            pooled /= torch.bincount(chunk_of, minlength=chunks).float()[:, None]
            unrotated, chunk_of = pooled, torch.arange(chunks, device=k.device)
        return unrotated.permute(2, 0, 1, 3).to(k.dtype), chunk_of

    def _assemble(self, pieces, results) -> dict[str, torch.Tensor]:
        """The shard's tensors (on the host), pieces in document order."""
        kv, slot_parts, routing, routing_scale, routing_chunk, chunk_rows, piece_rows = [], [], [], [], [], [], []
        rows = slot_rows = 0
        for piece_number, ((doc_index, piece_index, _), result) in enumerate(zip(pieces, results)):
            sinks = result["sinks"]
            piece_rows.append([doc_index, rows, sinks, piece_index])
            kv.append(result["rows"][:sinks])
            rows += sinks
            slots = result["slots"]
            routing.append(result["routing"])
            routing_scale.append(result["routing_scale"])
            routing_chunk.append(result["routing_chunk"] + len(chunk_rows))
            for chunk, (start, length) in enumerate(zip(result["starts"], result["lengths"])):
                if chunk in slots:
                    part = slots[chunk]
                    slot_parts.append(part)
                    chunk_rows.append([piece_number, start, length, slot_rows, part.beta.shape[0], 1])
                    slot_rows += part.beta.shape[0]
                else:
                    kv.append(result["rows"][start : start + length])
                    chunk_rows.append([piece_number, start, length, rows, length, 0])
                    rows += length
        tensors = {}
        if self.options.store == "tokens":
            # a piece's rows are its tokens in order, so token t of a piece is row `sink row + t`
            tensors["ids"] = torch.cat(kv)
        else:
            first = results[0]["rows"]
            device = first.device
            cat = lambda name, empty: torch.cat([getattr(p, name) for p in slot_parts]) if slot_parts else empty  # noqa: E731
            tensors.update({
                "kv": torch.cat(kv),
                "slot_kv": cat("kv", first.new_zeros(0, 2, first.shape[-1])),
                "slot_beta": cat("beta", torch.zeros(0, device=device)),
                "slot_rope": cat("rope", torch.zeros(0, dtype=torch.long, device=device)).to(torch.int32),
                "slot_head": cat("head", torch.zeros(0, dtype=torch.long, device=device)).to(torch.int16),
            })
        tensors.update({
            "routing_keys": torch.cat(routing),
            "routing_scale": torch.cat(routing_scale),
            "routing_chunk": torch.cat(routing_chunk),
            "chunks": torch.tensor(chunk_rows, dtype=torch.long),
            "pieces": torch.tensor(piece_rows, dtype=torch.long),
        })
        # one copy to the host per shard; the writer thread serialises it
        return {name: t.to("cpu", non_blocking=False).contiguous() for name, t in tensors.items()}

    def _commit_shard(self, tensors: dict, documents: list[dict]) -> None:
        """Write one shard (temporary name, fsync, rename), then the manifest that lists it."""
        index = len(self.meta["shards"])
        name = SHARD_NAME.format(index)
        data = serialize(tensors, metadata={"format": FORMAT})
        path = self.folder / name
        temporary = self.folder / f".{name}.{os.getpid()}.tmp"
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)  # a shard file not yet in the manifest is written over by the next writer
        shard = {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                 "tokens": sum(d["tokens"] for d in documents), "chunks": int(tensors["chunks"].shape[0]),
                 "pieces": int(tensors["pieces"].shape[0]), "documents": documents}
        meta = {**self.meta, "shards": [*self.meta["shards"], shard]}
        meta["checksum"] = _meta_checksum(meta)
        write_text(self.folder / MANIFEST, json.dumps(meta, indent=1))
        self.meta = meta
        self._verified.add(index)
        self._append_tables(index, shard)

    # -- reading chunks ----------------------------------------------------------------------------

    def read_rows(self, shard: int, name: str, start: int, count: int) -> torch.Tensor:
        """Rows [start, start + count) of a shard tensor (memory-mapped read)."""
        return self._handle(shard).get_slice(name)[start : start + count]

    # -- reporting ---------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return sum(shard["tokens"] for shard in self.meta["shards"])

    @property
    def num_chunks(self) -> int:
        return int(self.chunk_table.shape[0])

    def info(self) -> dict:
        """Documents, tokens, chunks and bytes per tier: on disk (shards), on the host (tables; the shards
        are memory-mapped, so what the OS caches of them is not counted) and on the model's device
        (routing keys)."""
        disk = sum(shard["bytes"] for shard in self.meta["shards"]) + (self.folder / MANIFEST).stat().st_size
        host = sum(t.numel() * t.element_size() for t in (self.chunk_table, self.chunk_shard, self.piece_table,
                                                           self.piece_shard, self.chunk_global_piece, self.piece_global_document))
        device = sum(t.numel() * t.element_size() for t in (self.routing, self.routing_scale, self.routing_chunk) if t is not None)
        return {"folder": str(self.folder), "model": self.meta.get("model"), "documents": len(self.documents),
                "tokens": self.num_tokens, "chunks": self.num_chunks, "shards": len(self.meta["shards"]),
                "options": asdict(self.options), "selection": self.recall.selection,
                "bytes": {"disk": disk, "host": host, "device": device}}

    # -- asking ------------------------------------------------------------------------------------

    def cache_for(self, question_ids: torch.Tensor, model=None, **recall_options):
        """A `SparseMemCache` holding the chunks the question retrieves, laid out before it (see
        `memory_recall.recall`); `generate(question_ids, past_key_values=cache)` continues it."""
        from .memory_recall import recall

        return recall(self, question_ids, **recall_options).cache

    def ask(self, question: str, max_new_tokens: int = 64, refresh_every: int | None = None, **recall_options) -> dict:
        """Answer `question` from the bank: {"answer", "documents" (names, in the order read), "chunks",
        "seconds_to_first_token"}. `refresh_every`: re-select the chunks every this many generated tokens (see
        `memory_recall.generate_from_memory`). `recall_options` (top_k, selection, ...): see `memory_recall.RecallOptions`."""
        from .memory_recall import answer

        return answer(self, question, max_new_tokens=max_new_tokens, refresh_every=refresh_every, **recall_options)


def read_manifest(folder: Path) -> dict:
    folder = Path(folder)
    recover(folder / MANIFEST)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {folder} is not a sparsemem memory bank")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BankIntegrityError(f"{path} is not valid JSON: {error}") from None
    if meta.get("format") != FORMAT:
        raise BankFormatError(f"{path}: format {meta.get('format')!r}, this sparsemem reads {FORMAT!r}: build the bank "
                              "again from its documents (MemoryBank.create, then add)")
    if meta.get("checksum") != _meta_checksum(meta):
        raise BankIntegrityError(f"{path} was edited or corrupted: its checksum does not match its content")
    return meta
