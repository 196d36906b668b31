"""Data pipeline: tokenizers, cached corpora, family datasets, batch order, collation and data errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from bigtrain.config.schema import Config
from bigtrain.data import (
    ByteTokenizer,
    GlobalBatchSampler,
    HFTokenizer,
    build_datasets,
    build_tokenizer,
)
from bigtrain.data.collate import collate
from bigtrain.data.corpus import load_corpus
from bigtrain.errors import DataError

BYTE = ByteTokenizer()


def make_cfg(tmp_path: Path, family: str = "causal", **data) -> Config:
    cfg = Config()
    cfg.model.family = family
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.max_bytes = 200_000
    cfg.data.seq_len = 64
    cfg.data.holdout_fraction = 0.05
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


class FakeDataset:
    def __init__(self, lengths: np.ndarray) -> None:
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.lengths)


# --- tokenizers ---------------------------------------------------------------------------------------

def test_byte_tokenizer_round_trip_and_specials() -> None:
    text = "def f(x):\n    return 'héllo wörld ✓ 日本'\n"
    ids = BYTE.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert BYTE.decode(ids) == text
    assert BYTE.vocab_size == 260
    assert (BYTE.pad_id, BYTE.eos_id, BYTE.mask_id, BYTE.bos_id) == (256, 257, 258, 259)
    assert BYTE.decode([BYTE.bos_id, *ids[:3], BYTE.eos_id, BYTE.pad_id, BYTE.mask_id]) == text[:3]
    assert BYTE.decode([0xE6]) == "\ufffd"  # a cut multi-byte character is replaced, not an error


def _tiny_hf_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[PAD]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox", "jumps over the lazy dog", "def main(): pass"] * 20,
                            trainer)
    tok.save(str(path))
    return path


def test_hf_tokenizer_finds_or_adds_specials(tmp_path: Path) -> None:
    path = _tiny_hf_tokenizer(tmp_path / "tokenizer.json")
    cfg = make_cfg(tmp_path, tokenizer=str(path))
    tok = build_tokenizer(cfg.data)
    assert isinstance(tok, HFTokenizer)
    assert tok.pad_id == 0  # "[PAD]" was in the file
    specials = {tok.pad_id, tok.eos_id, tok.mask_id, tok.bos_id}
    assert len(specials) == 4 and max(specials) < tok.vocab_size
    text = "the lazy fox jumps: ünïcode"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
    assert tok.eos_id not in tok.encode("a </s> in the text is plain text")
    assert tok.name == HFTokenizer(path).name and tok.name.startswith("hf-")


def test_hf_tokenizer_trains_causal_from_jsonl(tmp_path: Path) -> None:
    path = _tiny_hf_tokenizer(tmp_path / "tokenizer.json")
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"the quick brown fox {i} jumps over the lazy dog " * 5,
                                        "id": i}) + "\n" for i in range(40)))
    cfg = make_cfg(tmp_path, source=str(data), tokenizer=str(path), seq_len=16)
    tok = build_tokenizer(cfg.data)
    train, heldout = build_datasets(cfg, tok)
    assert len(train) > 0 and len(heldout) > 0
    corpus = load_corpus(cfg.data, tok)
    assert corpus.from_cache and int(np.sum(corpus.tokens == tok.eos_id)) == 40
    assert "quick brown fox" in tok.decode(train[0]["input_ids"].tolist())


# --- causal -------------------------------------------------------------------------------------------

def test_causal_blocks_are_contiguous_shifts(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    train, heldout = build_datasets(cfg, BYTE)
    corpus = load_corpus(cfg.data, BYTE)
    L = cfg.data.seq_len
    for i in (0, 1, len(train) - 1):
        s = train[i]
        assert s["input_ids"].shape == s["labels"].shape == (L,) and s["input_ids"].dtype == torch.int64
        assert torch.equal(s["input_ids"][1:], s["labels"][:-1])
        assert s["input_ids"].tolist() == corpus.tokens[i * L:(i + 1) * L].tolist()
    assert torch.equal(train[0]["labels"][-1], train[1]["input_ids"][0])
    assert train.lengths.tolist() == [L] * len(train)
    with pytest.raises(IndexError):
        train[len(train)]


def test_causal_split_is_disjoint_and_at_the_end(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    train, heldout = build_datasets(cfg, BYTE)
    n_blocks = (len(load_corpus(cfg.data, BYTE).tokens) - 1) // cfg.data.seq_len
    assert len(train) + len(heldout) == n_blocks
    assert len(heldout) == int(np.ceil(cfg.data.holdout_fraction * n_blocks))
    train_starts = {train.first + i for i in range(len(train))}
    held_starts = {heldout.first + i for i in range(len(heldout))}
    assert not train_starts & held_starts and min(held_starts) == max(train_starts) + 1
    assert torch.equal(heldout[0]["input_ids"][0], train[len(train) - 1]["labels"][-1])


def test_token_cache_written_once_and_reused(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    first = load_corpus(cfg.data, BYTE)
    assert not first.from_cache and first.tokens.dtype == np.uint16
    mtime = first.path.stat().st_mtime_ns
    second = load_corpus(cfg.data, BYTE)
    assert second.from_cache and second.path == first.path and second.path.stat().st_mtime_ns == mtime
    assert np.array_equal(first.tokens, second.tokens)
    files = sorted(p.name for p in (tmp_path / "cache" / "tokens").iterdir())
    assert len(files) == 2 and not any(f.endswith(".tmp") for f in files)
    cfg.data.max_bytes = 100_000  # a different corpus gets its own file
    assert not load_corpus(cfg.data, BYTE).from_cache


def test_embedded_corpus_is_deterministic_and_capped(tmp_path: Path) -> None:
    a = load_corpus(make_cfg(tmp_path / "a").data, BYTE)
    b = load_corpus(make_cfg(tmp_path / "b").data, BYTE)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.doc_ends, b.doc_ends)
    n_docs = len(a.doc_ends)
    assert n_docs > 5 and len(a.tokens) == 200_000 + n_docs  # the cap in bytes, plus one eos per file
    assert BYTE.decode(a.tokens[:a.doc_ends[0]].tolist()).strip()


# --- sampler ------------------------------------------------------------------------------------------

def test_sampler_is_a_pure_function_of_step() -> None:
    ds = FakeDataset(np.ones(50, dtype=np.int64))
    fresh = GlobalBatchSampler(ds, 8, seed=7)
    forward = [fresh.indices(k) for k in range(40)]
    shuffled = GlobalBatchSampler(ds, 8, seed=7)
    order = np.random.default_rng(0).permutation(40)
    backward = {int(k): shuffled.indices(int(k)) for k in order}
    assert all(backward[k] == forward[k] for k in range(40))
    assert all(fresh.indices(k) == forward[k] for k in (39, 0, 17))
    assert GlobalBatchSampler(ds, 8, seed=8).indices(0) != forward[0]


def test_sampler_covers_each_epoch_once() -> None:
    n, g = 50, 8  # batches straddle epoch boundaries
    sampler = GlobalBatchSampler(FakeDataset(np.ones(n, dtype=np.int64)), g, seed=3)
    stream = [i for k in range(3 * n // g + 1) for i in sampler.indices(k)]
    for epoch in range(3):
        assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert stream[:n] != stream[n:2 * n]
    big = GlobalBatchSampler(FakeDataset(np.ones(5, dtype=np.int64)), 12, seed=3)  # G > dataset size
    stream = big.indices(1) + big.indices(2)  # positions 12..35: epochs 3..6 complete at 15..35
    assert all(sorted(stream[3 + 5 * e:8 + 5 * e]) == list(range(5)) for e in range(4))


def test_sampler_bucketing_keeps_windows_and_groups_lengths() -> None:
    lengths = np.random.default_rng(0).integers(8, 128, size=200)
    ds, g, b = FakeDataset(lengths), 8, 4
    plain = GlobalBatchSampler(ds, g, seed=5)
    bucketed = GlobalBatchSampler(ds, g, seed=5, bucket_size=b)
    spread_plain, spread_bucketed = [], []
    for window in range(3):
        steps = range(window * b, (window + 1) * b)
        batches = [bucketed.indices(k) for k in steps]
        assert all(len(x) == g for x in batches)
        assert Counter(i for x in batches for i in x) == Counter(i for k in steps for i in plain.indices(k))
        ranges = sorted((lengths[x].min(), lengths[x].max()) for x in batches)
        assert all(prev[1] <= nxt[0] for prev, nxt in zip(ranges, ranges[1:], strict=False))
        spread_bucketed += [np.ptp(lengths[x]) for x in batches]
        spread_plain += [np.ptp(lengths[plain.indices(k)]) for k in steps]
    assert np.mean(spread_bucketed) < 0.5 * np.mean(spread_plain)
    again = GlobalBatchSampler(ds, g, seed=5, bucket_size=b)
    assert [again.indices(k) for k in (9, 2, 5)] == [bucketed.indices(k) for k in (9, 2, 5)]


# --- masked -------------------------------------------------------------------------------------------

def test_masked_samples_are_deterministic_and_bert_like(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, family="masked")
    train, heldout = build_datasets(cfg, BYTE)
    assert len(train) > 100 and len(heldout) > 0
    assert train.lengths.max() <= cfg.data.seq_len and train.lengths.min() >= 8
    again, _ = build_datasets(cfg, BYTE)
    for i in (0, 5, len(train) - 1):
        assert all(torch.equal(train[i][k], again[i][k]) for k in ("input_ids", "labels"))
    cfg.train.seed += 1
    other, _ = build_datasets(cfg, BYTE)
    assert not torch.equal(train[0]["labels"], other[0]["labels"])

    selected = masked = kept = total = 0
    for i in range(300):
        s = train[i]
        inp, lab = s["input_ids"], s["labels"]
        sel = lab != -100
        assert sel.any() and len(inp) == train.lengths[i]
        assert (inp[~sel] != BYTE.mask_id).all()
        assert (lab[sel] < 256).all()  # labels are the original (non-special) ids
        selected, total = selected + int(sel.sum()), total + len(inp)
        masked += int((inp[sel] == BYTE.mask_id).sum())
        kept += int((inp[sel] == lab[sel]).sum())
    assert abs(selected / total - cfg.data.mask_prob) < 0.02
    assert abs(masked / selected - 0.8) < 0.05 and 0.05 < kept / selected < 0.2


# --- seq2seq ------------------------------------------------------------------------------------------

def test_seq2seq_reverse_task(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, family="seq2seq", source="reverse", task_samples=500)
    train, heldout = build_datasets(cfg, BYTE)
    assert len(train) + len(heldout) == 500 and len(heldout) == 25
    for i in range(20):
        s = train[i]
        src, lab, dec = s["input_ids"].tolist(), s["labels"].tolist(), s["decoder_input_ids"].tolist()
        assert src[-1] == BYTE.eos_id and lab[-1] == BYTE.eos_id
        source, target = BYTE.decode(src), BYTE.decode(lab)
        assert target == source[::-1] and source.isalpha() and source.islower()
        assert cfg.data.task_min_len <= len(source) <= cfg.data.task_max_len
        assert dec == [BYTE.bos_id] + lab[:-1]
    again, _ = build_datasets(cfg, BYTE)
    assert torch.equal(again[3]["input_ids"], train[3]["input_ids"])


def test_seq2seq_sort_task_and_jsonl_pairs(tmp_path: Path) -> None:
    train, _ = build_datasets(make_cfg(tmp_path, family="seq2seq", source="sort", task_samples=100), BYTE)
    source = BYTE.decode(train[0]["input_ids"].tolist())
    assert BYTE.decode(train[0]["labels"].tolist()) == "".join(sorted(source))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"en": f"hello {i}", "fr": f"bonjour {i}"}) + "\n" for i in range(30)))
    cfg = make_cfg(tmp_path, family="seq2seq", source=str(data), source_field="en", target_field="fr")
    train, heldout = build_datasets(cfg, BYTE)
    assert len(train) + len(heldout) == 30
    assert BYTE.decode(train[2]["input_ids"].tolist()) == "hello 2"
    assert BYTE.decode(train[2]["labels"].tolist()) == "bonjour 2"


# --- collate ------------------------------------------------------------------------------------------

def test_pad_stack_equal_lengths_matches_padding_path() -> None:
    """Equal lengths take a single stack (fixed-length causal blocks); same values, dtype and mask as padding."""
    from bigtrain.data.collate import pad_stack

    seqs = [torch.arange(6, dtype=torch.int32) + i for i in range(3)]
    out, mask = pad_stack(seqs, value=-1)
    assert out.dtype == torch.long and torch.equal(out, torch.stack(seqs).long()) and mask.all()
    out, mask = pad_stack(seqs, value=-1, multiple=4)  # 6 -> 8: the padding path
    assert out.shape == (3, 8) and (out[:, 6:] == -1).all() and mask.sum().item() == 18


def test_collate_all_families(tmp_path: Path) -> None:
    causal, _ = build_datasets(make_cfg(tmp_path), BYTE)
    batch = collate([causal[i] for i in range(4)], "causal", BYTE.pad_id)
    assert set(batch) == {"input_ids", "labels"} and batch["input_ids"].shape == (4, 64)

    masked, _ = build_datasets(make_cfg(tmp_path, family="masked"), BYTE)
    idx = [int(np.argmin(masked.lengths)), int(np.argmax(masked.lengths))]
    short, long_ = (int(masked.lengths[i]) for i in idx)
    assert short < long_
    batch = collate([masked[i] for i in idx], "masked", BYTE.pad_id)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, long_)
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["attention_mask"].sum(1).tolist() == [short, long_]
    assert (batch["input_ids"][0, short:] == BYTE.pad_id).all() and (batch["labels"][0, short:] == -100).all()

    s2s, _ = build_datasets(make_cfg(tmp_path, family="seq2seq", source="reverse", task_samples=200), BYTE)
    samples = [s2s[i] for i in range(8)]
    batch = collate(samples, "seq2seq", BYTE.pad_id)
    assert set(batch) == {"input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask",
                          "labels"}
    longest = max(len(s["input_ids"]) for s in samples)
    assert batch["input_ids"].shape == (8, longest) and batch["labels"].shape == batch["decoder_input_ids"].shape
    for row, s in enumerate(samples):
        n = len(s["labels"])
        assert batch["decoder_attention_mask"][row].sum() == n
        assert torch.equal(batch["labels"][row, :n], s["labels"]) and (batch["labels"][row, n:] == -100).all()
        assert (batch["decoder_input_ids"][row, n:] == BYTE.pad_id).all()


# --- local files --------------------------------------------------------------------------------------

def test_local_text_files_and_directory(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, word in (("b.txt", "beta"), ("a.txt", "alpha"), ("skip.csv", "nope")):
        (folder / name).write_text(f"{word} " * 200)
    cfg = make_cfg(tmp_path, source=str(folder), seq_len=32)
    train, heldout = build_datasets(cfg, BYTE)
    corpus = load_corpus(cfg.data, BYTE)
    assert len(corpus.doc_ends) == 2  # one document per .txt file, in sorted order
    text = BYTE.decode(corpus.tokens.tolist())
    assert text.startswith("alpha") and "beta" in text and "nope" not in text
    single = make_cfg(tmp_path, source=str(folder / "a.txt"), seq_len=32)
    assert len(build_datasets(single, BYTE)[0]) > 0


def test_local_jsonl_and_parquet(tmp_path: Path) -> None:
    rows = [{"body": f"document number {i}: " + "words " * 30} for i in range(20)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_cfg(tmp_path, source=str(jsonl), text_field="body", seq_len=32)
    train, _ = build_datasets(cfg, BYTE)
    corpus = load_corpus(cfg.data, BYTE)
    assert len(corpus.doc_ends) == 20
    assert BYTE.decode(train[0]["input_ids"].tolist()).startswith("document number 0")

    import datasets

    parquet = tmp_path / "docs.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    pq = load_corpus(make_cfg(tmp_path, source=str(parquet), text_field="body").data, BYTE)
    assert np.array_equal(np.asarray(pq.tokens), np.asarray(corpus.tokens))


# --- errors -------------------------------------------------------------------------------------------

def _error(cfg: Config, tokenizer=BYTE) -> str:
    with pytest.raises(DataError) as info:
        build_datasets(cfg, tokenizer)
    return str(info.value)


def test_errors_name_the_key(tmp_path: Path) -> None:
    msg = _error(make_cfg(tmp_path, source=str(tmp_path / "missing.txt")))
    assert "data.source" in msg and "does not exist" in msg

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "data.source" in _error(make_cfg(tmp_path, source=str(empty)))
    empty_jsonl = tmp_path / "empty.jsonl"
    empty_jsonl.write_text("")
    assert "no text" in _error(make_cfg(tmp_path, source=str(empty_jsonl)))

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"content": "hello"}) + "\n")
    msg = _error(make_cfg(tmp_path, source=str(jsonl)))
    assert "data.text_field" in msg and "'content'" in msg

    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short")
    assert "data.seq_len" in _error(make_cfg(tmp_path, source=str(tiny)))
    assert "data.holdout_fraction" in _error(make_cfg(tmp_path, source=str(tiny), seq_len=8))

    assert "data.format" in _error(make_cfg(tmp_path, source=str(Path(__file__))))
    msg = _error(make_cfg(tmp_path, family="seq2seq"))
    assert "data.source" in msg and "reverse" in msg

    with pytest.raises(DataError, match="data.tokenizer"):
        build_tokenizer(make_cfg(tmp_path, tokenizer=str(tmp_path / "nope.json")).data)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="data.tokenizer"):
        build_tokenizer(make_cfg(tmp_path, tokenizer=str(bad)).data)
