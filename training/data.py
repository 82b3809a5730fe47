"""Calibration data: real text from local files, Python's own documentation and sources, or Hub datasets,
tokenised and packed into fixed-length sequences, with a held-out tail for evaluation.

Plain text files (and the built-in sources) need no extra package; `.jsonl`/`.json`/`.parquet` files and
Hub dataset names are read through `datasets`, imported only when such a source is named.
"""

import hashlib
import logging
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BUILTIN_SOURCES = ("python-docs", "python-stdlib")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text")
DATASET_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class DataSource:
    """One entry of a recipe's `data.train` / `data.eval`: a built-in name, a local file or a Hub dataset.

    Hub datasets are written `hub:owner/name` (optionally `hub:owner/name:config`); `split` and `text_field`
    apply to datasets; `max_chars` caps what is read from the source.
    """

    name: str
    split: str = "train"
    text_field: str = "text"
    max_chars: int | None = None

    def check(self) -> None:
        """Fail before any training step when the source cannot be read."""
        if self.name in BUILTIN_SOURCES or self.name.startswith("hub:"):
            return
        path = Path(self.name)
        if not path.is_file():
            raise FileNotFoundError(
                f"data source {self.name!r} is not a file; expected a text/jsonl/json/parquet file, "
                f"one of {BUILTIN_SOURCES}, or a Hub dataset as 'hub:owner/name'"
            )
        if path.suffix not in TEXT_SUFFIXES and path.suffix not in DATASET_SUFFIXES:
            raise ValueError(
                f"data source {self.name!r}: unsupported file type {path.suffix!r}; "
                f"expected one of {TEXT_SUFFIXES + tuple(DATASET_SUFFIXES)}"
            )

    def read(self) -> str:
        self.check()
        if self.name == "python-docs":
            from sparsemem.corpus import python_reference_docs

            text = python_reference_docs().text
        elif self.name == "python-stdlib":
            text = _python_stdlib_text(self.max_chars)
        elif self.name.startswith("hub:"):
            text = _dataset_text(self, hub=True)
        elif Path(self.name).suffix in DATASET_SUFFIXES:
            text = _dataset_text(self, hub=False)
        else:
            text = Path(self.name).read_text(encoding="utf-8", errors="replace")
        if self.max_chars is not None:
            text = text[: self.max_chars]
        if not text.strip():
            raise ValueError(f"data source {self.name!r} holds no text")
        return text


def _python_stdlib_text(max_chars: int | None) -> str:
    """The `.py` files of this interpreter's standard library, in sorted path order (tests excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).parts
        if "site-packages" in relative or "test" in relative or "tests" in relative or "idlelib" in relative:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(f"# {'/'.join(relative)}\n{text}")
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    if not texts:
        raise FileNotFoundError(f"no standard-library sources under {root} (python {sys.version.split()[0]})")
    return "\n\n".join(texts)


def _dataset_text(source: DataSource, hub: bool) -> str:
    try:
        import datasets
    except ImportError as error:
        raise ImportError(f"data source {source.name!r} needs the `datasets` package: pip install datasets") from error
    if hub:
        name, _, config = source.name[len("hub:") :].partition(":")
        dataset = datasets.load_dataset(name, config or None, split=source.split)
    else:
        dataset = datasets.load_dataset(DATASET_SUFFIXES[Path(source.name).suffix], data_files=source.name, split="train")
    if source.text_field not in dataset.column_names:
        raise ValueError(
            f"data source {source.name!r} has no field {source.text_field!r}; fields: {dataset.column_names} "
            "(set `text_field`)"
        )
    texts, total = [], 0
    for row in dataset:
        text = row[source.text_field]
        if isinstance(text, str) and text:
            texts.append(text)
            total += len(text)
            if source.max_chars is not None and total >= source.max_chars:
                break
    return "\n\n".join(texts)


@dataclass
class PackedData:
    """Token ids packed into `train` [N, L] sequences and a held-out `eval_ids` stream."""

    train: torch.Tensor
    eval_ids: torch.Tensor
    fingerprint: str

    def batch(self, seed: int, step: int, micro: int, rank: int, batch_size: int) -> torch.Tensor:
        """The micro-batch of optimizer step `step`: a pure function of its coordinates, so a resumed run
        sees exactly the batches the interrupted one would have seen."""
        generator = torch.Generator().manual_seed(hash_seed(seed, step, micro, rank))
        index = torch.randint(0, self.train.shape[0], (batch_size,), generator=generator)
        return self.train[index]


def hash_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)


def _tokenize(tokenizer, text: str) -> list[int]:
    # long texts in pieces: fast tokenizers are quadratic in nothing, but pieces keep memory bounded
    ids: list[int] = []
    piece = 1_000_000
    for start in range(0, len(text), piece):
        ids.extend(tokenizer(text[start : start + piece], add_special_tokens=False)["input_ids"])
    return ids


def build_data(tokenizer, train: list[DataSource], eval_source: DataSource | None, sequence_length: int,
               eval_tokens: int, max_train_tokens: int | None = None) -> PackedData:
    """Tokenise and pack. The last `eval_tokens` tokens of `eval_source` are held out: when that source is
    also a training source, training only sees the part before them."""
    held_out: list[int] = []
    streams = []
    for source in train:
        ids = _tokenize(tokenizer, source.read())
        if eval_source is not None and source == eval_source:
            if len(ids) <= eval_tokens + sequence_length:
                raise ValueError(f"data source {source.name!r}: {len(ids)} tokens cannot hold out {eval_tokens} "
                                 f"and still give a training sequence of {sequence_length}")
            ids, held_out = ids[:-eval_tokens], ids[-eval_tokens:]
        streams.extend(ids)
    if eval_source is not None and not held_out:
        ids = _tokenize(tokenizer, eval_source.read())
        if len(ids) < eval_tokens:
            raise ValueError(f"eval source {eval_source.name!r} has {len(ids)} tokens, fewer than eval_tokens={eval_tokens}")
        held_out = ids[-eval_tokens:]
    if max_train_tokens is not None:
        streams = streams[:max_train_tokens]
    count = len(streams) // sequence_length
    if count < 1:
        raise ValueError(f"training data has {len(streams)} tokens, fewer than one sequence of {sequence_length}")
    packed = torch.tensor(streams[: count * sequence_length], dtype=torch.long).view(count, sequence_length)
    digest = hashlib.sha256(packed.numpy().tobytes()).hexdigest()[:16]
    logger.info("calibration data: %d sequences of %d tokens, %d held out", count, sequence_length, len(held_out))
    return PackedData(packed, torch.tensor(held_out, dtype=torch.long), digest)
