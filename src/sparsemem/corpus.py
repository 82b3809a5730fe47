"""Real text for evaluation: files named by the user, or the Python reference documentation that every
CPython installation carries (`pydoc_data.topics`), or the system's documentation files."""

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Corpus:
    text: str
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


def python_reference_docs() -> Corpus:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name].strip() for name in sorted(topics))
    return Corpus(text, "pydoc_data.topics (Python reference documentation)")


def load_corpus(paths: list[str] | None = None) -> Corpus:
    """Concatenate the given text files, or fall back to the Python reference documentation."""
    if not paths:
        return python_reference_docs()
    texts = []
    for path in paths:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"corpus file {path!r} does not exist")
        texts.append(file.read_text(encoding="utf-8", errors="replace"))
    return Corpus("\n\n".join(texts), ", ".join(paths))


def token_window(tokenizer, corpus: Corpus, num_tokens: int, offset: int = 0) -> list[int]:
    """`num_tokens` consecutive token ids of the corpus starting at token `offset` (wrapping around)."""
    ids = tokenizer(corpus.text, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise ValueError(f"corpus {corpus.source!r} is empty")
    out = []
    position = offset % len(ids)
    while len(out) < num_tokens:
        out.extend(ids[position : position + num_tokens - len(out)])
        position = 0
    return out


PASSKEY_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n\n"
)
PASSKEY_NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"
# (needle, question) per wording. In a haystack of Python documentation "pass" is also a keyword, and a
# small model may answer "The pass key is a ..." with no memory loss at all; "secret-number" avoids that.
NEEDLE_WORDINGS = {
    "pass-key": (PASSKEY_NEEDLE, PASSKEY_QUESTION),
    "secret-number": ("\n\nThe secret number is {key}. Remember it. {key} is the secret number.\n\n",
                      "\n\nWhat is the secret number? The secret number is"),
}


def needle_wording(wording: str = "pass-key") -> tuple[str, str]:
    """(needle template, question) of one of `NEEDLE_WORDINGS`."""
    if wording not in NEEDLE_WORDINGS:
        raise ValueError(f"needle wording must be one of {sorted(NEEDLE_WORDINGS)}, got {wording!r}")
    return NEEDLE_WORDINGS[wording]


def needle_question(wording: str = "pass-key") -> str:
    return needle_wording(wording)[1]


@dataclass
class PasskeyCase:
    input_ids: list[int]
    passkey: str
    depth: float
    length: int


def passkey_case(tokenizer, corpus: Corpus, length: int, depth: float, seed: int = 0, wording: str = "pass-key") -> PasskeyCase:
    """A prompt of about `length` tokens with a random 5-digit pass key at relative `depth` of the haystack
    (`wording`: one of `NEEDLE_WORDINGS`)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    needle_text, question_text = needle_wording(wording)
    rng = random.Random(f"{seed}-{length}-{depth}")
    key = str(rng.randint(10000, 99999))
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    intro, needle, question = encode(PASSKEY_INTRO), encode(needle_text.format(key=key)), encode(question_text)
    budget = length - len(intro) - len(needle) - len(question)
    if budget < 16:
        raise ValueError(f"length {length} is too short for a pass key prompt")
    hay = token_window(tokenizer, corpus, budget, offset=rng.randint(0, 10**6))
    cut = int(round(depth * budget))
    return PasskeyCase(intro + hay[:cut] + needle + hay[cut:] + question, key, depth, length)
