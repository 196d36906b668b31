"""The corpus and the BPE tokenizer of bench/tokenization.py: a JSONL corpus of a given size cut from the embedded
corpus (the Python standard library's source), a byte-level BPE tokenizer.json trained on it, and a corpus's head."""

from __future__ import annotations

import json
import time
from pathlib import Path

MB = 1_000_000
BPE_VOCAB = 8192


def embedded_text(max_bytes: int) -> list[str]:
    from bigtrain.data.embedded import stdlib_documents, stdlib_files

    return list(stdlib_documents(stdlib_files(max_bytes)))


def make_corpus(path: Path, size: int) -> dict[str, int]:
    """A JSONL file of about `size` bytes: documents of 0.2-20 kB cut from the embedded corpus, each prefixed by its
    number (no two documents are the same); its bytes and documents."""
    import numpy as np

    text = "\n".join(embedded_text(32 * MB))
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(2500), 1.0, size=20_000), 200, 20_000).astype(int)
    pieces, pos = [], 0
    for n in lengths.tolist():
        if pos + n > len(text):
            pos = 0
        pieces.append(text[pos:pos + n])
        pos += n
    written = docs = 0
    with open(path, "w", encoding="utf-8") as out:
        while written < size:
            line = json.dumps({"text": f"# document {docs}\n" + pieces[docs % len(pieces)]}) + "\n"
            out.write(line)
            written += len(line.encode())
            docs += 1
    return {"bytes": written, "documents": docs}


def train_bpe(path: Path, train_bytes: int = 8 * MB) -> float:
    """A byte-level BPE tokenizer.json trained on the first `train_bytes` of the embedded corpus; seconds it took."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    started = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(embedded_text(train_bytes), trainer)
    tok.save(str(path))
    return time.perf_counter() - started


def head(path: Path, out: Path, size: int) -> int:
    """The first lines of `path` up to `size` bytes, into `out`; the bytes copied."""
    copied = 0
    with open(path, "rb") as src, open(out, "wb") as dst:
        for line in src:
            if copied >= size:
                break
            dst.write(line)
            copied += len(line)
    return copied
