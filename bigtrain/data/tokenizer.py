"""Tokenizers: a byte-level one that needs no files, and a wrapper around a Hugging Face tokenizer.json.

Both expose the same small surface (`Tokenizer`): the special ids the data pipeline and the models
need (`pad_id`, `eos_id` between documents, `mask_id` for masked LM, `bos_id` to start a seq2seq
decoder), `encode`/`decode`, and a `name` that changes whenever the id mapping could change, so that
it can key caches of tokenized corpora.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

import numpy as np

from bigtrain.config.schema import DataConfig
from bigtrain.errors import DataError


class Tokenizer(Protocol):
    """What the data pipeline, the trainer and generation need from a tokenizer."""

    name: str
    vocab_size: int
    pad_id: int
    eos_id: int
    mask_id: int
    bos_id: int
    special_ids: tuple[int, ...]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Encode many texts at once (the corpus builder's fast path)."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then pad 256, eos 257, mask 258, bos 259."""

    name = "byte"
    vocab_size = 260
    pad_id, eos_id, mask_id, bos_id = 256, 257, 258, 259
    special_ids = (256, 257, 258, 259)

    def encode(self, text: str) -> list[int]:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).tolist()

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


# Spellings of each special token in common tokenizers, in order of preference; the first is added
# when none is present.
_SPECIALS = {
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
    "eos": ("</s>", "<|endoftext|>", "[SEP]", "<eos>", "<|eos|>"),
    "mask": ("<mask>", "[MASK]", "<|mask|>"),
    "bos": ("<s>", "[CLS]", "<bos>", "<|bos|>", "<|startoftext|>"),
}


class HFTokenizer:
    """A `tokenizers.Tokenizer` loaded from a tokenizer.json, with the specials found or added.

    `encode` adds no special tokens (no post-processor [CLS]/[SEP]); the pipeline places its own.
    """

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"data.tokenizer: the tokenizer file '{path}' does not exist. Set data.tokenizer to the "
                f"path of a Hugging Face tokenizer.json, or to 'byte' for the built-in byte tokenizer.")
        try:
            raw = path.read_bytes()
            self._tok = RustTokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:  # OSError, UnicodeDecodeError, or tokenizers' bare Exception
            raise DataError(
                f"data.tokenizer: '{path}' is not a readable Hugging Face tokenizer.json ({exc}). Point "
                f"data.tokenizer at a file saved by `tokenizers` / `transformers` (tokenizer.json), or "
                f"use 'byte'.") from exc
        # Text that happens to spell a special token ("</s>" in a corpus) stays ordinary text.
        self._tok.encode_special_tokens = True
        ids = {role: self._find_or_add(names) for role, names in _SPECIALS.items()}
        self.pad_id, self.eos_id, self.mask_id, self.bos_id = (
            ids["pad"], ids["eos"], ids["mask"], ids["bos"])
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        added = self._tok.get_added_tokens_decoder()
        self.special_ids = tuple(sorted(set(ids.values()) | {i for i, t in added.items() if t.special}))
        self.name = "hf-" + hashlib.sha256(raw).hexdigest()[:16]

    def _find_or_add(self, names: tuple[str, ...]) -> int:
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        self._tok.add_special_tokens([names[0]])
        return self._tok.token_to_id(names[0])

    def save(self, path: Path) -> None:
        """Write the tokenizer as bigtrain uses it (special tokens it added included) as a tokenizer.json."""
        self._tok.save(str(path))

    def token(self, token_id: int) -> str | None:
        """The text of token `token_id` (None when the vocabulary has no such id)."""
        return self._tok.id_to_token(token_id)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def build_tokenizer(cfg: DataConfig) -> Tokenizer:
    """`data.tokenizer`: 'byte', or the path of a tokenizer.json."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    return HFTokenizer(cfg.tokenizer)
