"""`bigtrain prepare` and the sharded token folders (issue 17 items 1 and 2): shards that do not depend on the worker
count, a killed build that resumes to identical shards without redoing finished ones, training that reads the
shards as the same token stream, one builder per job (2 ranks) and per host (a lock), every source kind (files,
save_to_disk folders, hf:NAME through datasets), and one-paragraph errors naming the key."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bigtrain.cli import main
from bigtrain.cli.train import SMOKE_CONFIG
from bigtrain.config import load_config
from bigtrain.config.schema import Config, DataConfig
from bigtrain.data import ByteTokenizer, build_datasets, build_tokenizer
from bigtrain.data.corpus import data_ready, load_corpus, prepare_corpus
from bigtrain.data.masked import chunk_table
from bigtrain.data.shards import ShardedTokens
from bigtrain.errors import DataError
from tests.conftest import DP_LAYOUT, REPO, launch_ranks, tiny_overrides
from tests.helpers.processes import wait_for_exit
from tests.test_data import _tiny_hf_tokenizer

BYTE = ByteTokenizer()
INJECT = REPO / "tests" / "helpers" / "prepare_inject.py"
SHARD = 16 << 10  # 16 KiB of input per shard: about ten shards of the corpus below
SHARD_MB = str(SHARD / (1 << 20))


def documents(n: int = 400) -> list[str]:
    """Texts of varied length (some longer than a shard), with non-ASCII characters and a few empty rows."""
    words = ["alpha", "beta", "gamma", "naïve", "café", "日本", "token", "shard"]
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(5 + (i * 37) % 90 + (3000 if i == 50 else 0)))
            if i % 53 else "" for i in range(n)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def expected_tokens(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The token stream (and document ends) of the texts: each non-empty text's bytes, then eos."""
    docs = [np.append(np.frombuffer(t.encode(), dtype=np.uint8).astype(np.uint16), BYTE.eos_id) for t in texts if t]
    return np.concatenate(docs), np.cumsum([len(d) for d in docs])


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", documents())


@pytest.fixture(scope="module")
def reference(corpus: Path, tmp_path_factory) -> Path:
    """The corpus prepared by one process (in this one): what every other run must reproduce byte for byte."""
    cfg = DataConfig(source=str(corpus), cache_dir=str(tmp_path_factory.mktemp("reference")))
    return prepare_corpus(cfg, BYTE, workers=1, shard_bytes=SHARD).folder


def test_two_workers_write_the_same_shards_as_one(corpus: Path, reference: Path, tmp_path: Path) -> None:
    cfg = DataConfig(source=str(corpus), cache_dir=str(tmp_path / "cache"))
    done = prepare_corpus(cfg, BYTE, workers=2, shard_bytes=SHARD)
    assert done.folder.name == reference.name and done.built == done.shards >= 8
    assert folder_bytes(done.folder) == folder_bytes(reference)
    index = json.loads((reference / "index.json").read_text())
    assert index["format"] == "bigtrain-tokens" and index["tokenizer"]["name"] == "byte"
    assert index["dtype"] == "uint16" and len(index["shards"]) == done.shards
    import hashlib

    for shard in index["shards"]:
        assert hashlib.sha256((reference / f"{shard['name']}.bin").read_bytes()).hexdigest() == shard["sha256"]
    tokens, ends = expected_tokens(documents())
    assert index["tokens"] == len(tokens) and index["documents"] == len(ends)


def test_a_killed_prepare_resumes_to_identical_shards(corpus: Path, reference: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = ["--workers", "2", "--shard-mb", SHARD_MB, f"data.source={corpus}", f"data.cache_dir={cache}"]
    pids = tmp_path / "worker-pids"
    proc = subprocess.run([sys.executable, str(INJECT), *args], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "BIGTRAIN_TEST_KILL_AFTER_SHARDS": "3",
                               "BIGTRAIN_TEST_WORKER_PIDS": str(pids)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    folder = cache / "tokens" / reference.name
    workers = [int(pid) for pid in pids.read_text().split()]
    assert len(workers) == 2 and not wait_for_exit(workers, timeout=60)  # orphaned workers notice and stop
    assert not (folder / "index.json").exists()
    finished = sorted(p.stem for p in folder.glob("shard_*.json"))
    assert len(finished) >= 3
    before = {name: (folder / f"{name}.bin").stat() for name in finished}

    cfg = DataConfig(source=str(corpus), cache_dir=str(cache))
    done = prepare_corpus(cfg, BYTE, workers=1, shard_bytes=SHARD)
    assert done.built == done.shards - len(finished)
    assert folder_bytes(folder) == folder_bytes(reference)  # no temporary file is left either
    for name, stat in before.items():  # finished shards were kept, not written again
        now = (folder / f"{name}.bin").stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)

    (folder / "shard_00002.bin").unlink()  # a lost shard is made again, alone
    again = prepare_corpus(cfg, BYTE, workers=1, shard_bytes=SHARD)
    assert again.built == 1 and folder_bytes(folder) == folder_bytes(reference)
    assert prepare_corpus(cfg, BYTE, workers=2, shard_bytes=SHARD).built == 0


def test_training_reads_the_prepared_shards_as_one_token_stream(corpus: Path, reference: Path) -> None:
    cfg = Config()
    cfg.data.source, cfg.data.cache_dir, cfg.data.seq_len = str(corpus), str(reference.parent.parent), 64
    assert data_ready(cfg, BYTE)
    loaded = load_corpus(cfg.data, BYTE)
    assert loaded.from_cache and loaded.folder == reference and loaded.shards >= 8
    assert isinstance(loaded.tokens, ShardedTokens) and loaded.path == reference / "shard_00000.bin"
    tokens, ends = expected_tokens(documents())
    assert len(loaded.tokens) == len(tokens) and np.array_equal(loaded.doc_ends, ends)
    assert np.array_equal(np.asarray(loaded.tokens), tokens)
    boundaries = loaded.tokens.starts[1:-1]
    b0, b1, b4 = int(boundaries[0]), int(boundaries[1]), int(boundaries[4])
    for a, b in [(0, 5), (b0 - 3, b0 + 3), (b1 - 100, b4)]:
        assert np.array_equal(loaded.tokens[a:b], tokens[a:b])
    assert np.array_equal(loaded.tokens[ends - 1], np.full(len(ends), BYTE.eos_id))

    train, heldout = build_datasets(cfg, BYTE)  # causal blocks, as from an unsharded cache
    L = cfg.data.seq_len
    crossing = [int(s) // L for s in boundaries[:3]]
    for i in [0, 1, *crossing, len(train) - 1]:
        assert train[i]["input_ids"].tolist() == tokens[i * L:i * L + L].tolist()
        assert train[i]["labels"].tolist() == tokens[i * L + 1:i * L + L + 1].tolist()
    assert len(train) + len(heldout) == (len(tokens) - 1) // L
    starts, lengths = chunk_table(loaded.doc_ends, L)  # masked chunks come from the same document ends
    assert np.array_equal(loaded.tokens[int(starts[-1]):int(starts[-1] + lengths[-1])],
                          tokens[starts[-1]:starts[-1] + lengths[-1]])

    cfg.data.cache_dir = str(reference.parent.parent / "elsewhere")
    assert not data_ready(cfg, BYTE)


def test_a_large_corpus_checks_ids_as_they_are_read(reference: Path, tmp_path: Path, monkeypatch) -> None:
    """Above EAGER_CHECK_BYTES the shards are not scanned at open (every rank would read the whole corpus before
    step one); each slice read is checked instead."""
    import shutil

    from bigtrain.data import shards

    copy = tmp_path / "copied"
    shutil.copytree(reference, copy)
    data = bytearray((copy / "shard_00003.bin").read_bytes())
    data[20:22] = b"\xff\xff"  # token 10 of shard 3: id 65535
    (copy / "shard_00003.bin").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard_00003\.bin.*token 10 has id 65535"):
        load_corpus(DataConfig(source=str(copy)), BYTE)  # small: checked at open
    monkeypatch.setattr(shards, "EAGER_CHECK_BYTES", 0)
    loaded = load_corpus(DataConfig(source=str(copy)), BYTE)
    start = int(loaded.tokens.starts[3])
    assert len(loaded.tokens[start - 50:start + 5]) == 55  # reads before the damage are fine
    with pytest.raises(DataError) as info:
        loaded.tokens[start - 50:start + 50]
    msg = str(info.value)
    assert "shard_00003.bin" in msg and "token 10 has id 65535" in msg and msg.startswith("data.source:")


def test_one_builder_per_host_the_others_wait(corpus: Path, tmp_path: Path) -> None:
    """Two processes on one cache (ranks of a node on a node-local disk): the first builds, holding the lock; the
    second waits for it, saying so, then finds the folder finished."""
    gate = tmp_path / "go"
    cache = tmp_path / "cache"
    args = [sys.executable, str(INJECT), "--workers", "1", f"data.source={corpus}", f"data.cache_dir={cache}"]
    env = {**os.environ, "BIGTRAIN_TEST_SHARD_GATE": str(gate), "PYTHONUNBUFFERED": "1"}
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    procs = []

    def wait_for(condition) -> None:
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [
                log.read_text() for log in logs if log.exists()]
            time.sleep(0.05)

    try:
        for log in logs:
            with open(log, "w") as out:
                procs.append(subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO))
            if len(procs) == 1:  # the first holds the lock (its file names it) before the second starts
                wait_for(lambda: any(p.read_text() for p in cache.glob("tokens/*.lock")))
        wait_for(lambda: "waiting for" in logs[1].read_text())
        gate.touch()
        assert [p.wait(timeout=60) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    first, second = (log.read_text() for log in logs)
    assert first.count("bigtrain: prepared '") == 1 and "bigtrain: prepared '" not in second
    assert f"waiting for host {os.uname().nodename} pid {procs[0].pid} to finish preparing" in second
    assert "already prepared" in second


@pytest.mark.launches
def test_two_ranks_on_unprepared_data_build_it_once(corpus: Path, tmp_path: Path) -> None:
    """Global rank 0 prepares while rank 1 waits at the barrier, then reads what rank 0 wrote."""
    run_dir = tmp_path / "run"
    proc = launch_ranks(2, tiny_overrides(run_dir, "causal", *DP_LAYOUT, f"data.source={corpus}", "data.seq_len=32",
                                          "train.steps=1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("bigtrain: preparing data.source") == 1
    assert proc.stdout.count("bigtrain: prepared '") == 1
    assert "bigtrain: rank 1: waiting for rank 0 to prepare data" in proc.stdout
    assert len(list((tmp_path / "cache" / "tokens").glob("*/index.json"))) == 1


# --- sources ------------------------------------------------------------------------------------------


def test_save_to_disk_folders_and_parquet_row_groups(tmp_path: Path) -> None:
    import datasets

    texts = documents(300)
    rows = [{"body": t or None, "n": i} for i, t in enumerate(texts)]
    tokens, _ = expected_tokens(texts)
    ds = datasets.Dataset.from_list(rows)
    with _quiet(datasets):
        ds.save_to_disk(str(tmp_path / "saved"))
        datasets.DatasetDict({"train": ds, "test": ds.select(range(5))}).save_to_disk(str(tmp_path / "dict"))
        datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "no_train"))
    ds.to_parquet(str(tmp_path / "rows.parquet"), batch_size=50)  # row groups of 50 rows
    for source, workers in (("saved", 2), ("dict", 1), ("rows.parquet", 2)):
        cfg = DataConfig(source=str(tmp_path / source), text_field="body", cache_dir=str(tmp_path / "cache"))
        done = prepare_corpus(cfg, BYTE, workers=workers, shard_bytes=SHARD)
        assert done.shards > 2, source
        assert np.array_equal(np.asarray(load_corpus(cfg, BYTE).tokens), tokens), source

    with pytest.raises(DataError) as info:
        load_corpus(DataConfig(source=str(tmp_path / "no_train"), text_field="body"), BYTE)
    assert "data.source" in str(info.value) and "'test'" in str(info.value) and "no_train/test" in str(info.value)
    with pytest.raises(DataError) as info:
        load_corpus(DataConfig(source=str(tmp_path / "saved"), text_field="content"), BYTE)
    assert "data.text_field" in str(info.value) and "'body'" in str(info.value) and "\n" not in str(info.value)


def test_hf_sources_go_through_load_dataset(tmp_path: Path, monkeypatch) -> None:
    import datasets

    texts = documents(120)
    data = tmp_path / "local_hub_dataset"
    data.mkdir()
    write_jsonl(data / "train.jsonl", texts)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")  # datasets' own cache
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    cfg = DataConfig(source=f"hf:{data}", cache_dir=str(tmp_path / "cache"))  # a path load_dataset accepts
    with _quiet(datasets):
        done = prepare_corpus(cfg, BYTE, workers=2, shard_bytes=SHARD)
    assert done.shards > 1 and (tmp_path / "hf_cache").is_dir()
    assert np.array_equal(np.asarray(load_corpus(cfg, BYTE).tokens), expected_tokens(texts)[0])
    half = DataConfig(source=f"hf:{data}@train[50%:]", cache_dir=str(tmp_path / "cache"))  # a view of its files
    with _quiet(datasets):
        prepare_corpus(half, BYTE, workers=2, shard_bytes=SHARD)  # read here, not reopened by workers
        assert np.array_equal(np.asarray(load_corpus(half, BYTE).tokens), expected_tokens(texts[60:])[0])

    calls = []
    real = datasets.load_dataset

    def fake(name, config=None, split=None, **kwargs):
        calls.append((name, config, split))
        if name == "missing/dataset":
            raise FileNotFoundError(f"Couldn't find '{name}' on the Hugging Face Hub\neither")
        return real(str(data), split="train")

    monkeypatch.setattr(datasets, "load_dataset", fake)
    with _quiet(datasets):
        load_corpus(DataConfig(source="hf:org/name:wikitext-2@validation", cache_dir=str(tmp_path / "cache")), BYTE)
        load_corpus(DataConfig(source="hf:org/name", cache_dir=str(tmp_path / "cache")), BYTE)
    assert calls == [("org/name", "wikitext-2", "validation"), ("org/name", None, "train")]
    for source, needle in (("hf:missing/dataset", "Couldn't find 'missing/dataset'"), ("hf:", "names no dataset")):
        with pytest.raises(DataError) as info:
            load_corpus(DataConfig(source=source, cache_dir=str(tmp_path / "cache")), BYTE)
        assert str(info.value).startswith("data.source:") and needle in str(info.value)
        assert "\n" not in str(info.value)


# --- the command and its errors ----------------------------------------------------------------------


def test_prepare_command_prints_where_and_how_much(corpus: Path, tmp_path: Path, capsys) -> None:
    base = [f"data.cache_dir={tmp_path}", "--shard-mb", SHARD_MB, "--workers", "1"]
    assert main(["prepare", *base, f"data.source={corpus}"]) == 0
    out = capsys.readouterr().out
    tokens, ends = expected_tokens(documents())
    assert f"data.source '{corpus}': {tmp_path}/tokens/" in out and f"{len(tokens):,} tokens (uint16)" in out
    assert f"{len(ends):,} documents" in out and "built " in out
    assert main(["prepare", *base, f"data.source={corpus}", "--verify"]) == 0
    assert "already prepared; checksums verified" in capsys.readouterr().out

    folder = next(p for p in (tmp_path / "tokens").iterdir() if (p / "index.json").is_file()
                  and json.loads((p / "index.json").read_text())["source"] == str(corpus))
    data = bytearray((folder / "shard_00001.bin").read_bytes())
    assert data[11] == 0  # token 5 is a byte of text (not eos)
    data[10] = ord("A") if data[10] != ord("A") else ord("B")  # still a valid id: only the checksum tells
    (folder / "shard_00001.bin").write_bytes(bytes(data))
    assert main(["prepare", *base, f"data.source={corpus}", "--verify"]) == 2
    err = capsys.readouterr().err
    assert "shard_00001.bin" in err and "SHA-256" in err and err.count("\n") == 1

    mixture = f"data.sources=[{{source: embedded, weight: 3}}, {{source: {corpus}}}]"
    assert main(["prepare", *base, "data.max_bytes=50000", mixture]) == 0
    out = capsys.readouterr().out
    assert "data.sources[0].source 'embedded'" in out and f"data.sources[1].source '{corpus}'" in out
    assert "total: " in out
    assert out.count("already prepared") == 1  # the JSONL source is the folder above


@pytest.mark.parametrize("source, needles", [
    ("s3://bucket/corpus.jsonl", ["data.source: 's3://bucket/corpus.jsonl'", "(s3://)", "hf:NAME", "save_to_disk"]),
    ("/no/such/corpus", ["data.source: '/no/such/corpus' does not exist", "hf:NAME", "save_to_disk"]),
    ("README.md", ["data.format", "data.source 'README.md'", "'.md'"]),
    ("hf:@train", ["data.source: 'hf:@train' names no dataset"]),
])
def test_bad_sources_are_one_paragraph_naming_the_key(source: str, needles: list[str], tmp_path: Path,
                                                      capsys) -> None:
    assert main(["prepare", f"data.source={source}", f"data.cache_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigtrain: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err
    mixture = f"data.sources=[{{source: embedded}}, {{source: '{source}'}}]"
    assert main(["prepare", mixture, f"data.cache_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bigtrain: error: data.sources[1].source='{source}': ") and err.count("\n") == 1
    assert not (tmp_path / "tokens").exists()  # every source is checked before any is prepared


def test_prepared_folder_of_another_tokenizer_is_refused(corpus: Path, reference: Path, tmp_path: Path) -> None:
    direct = DataConfig(source=str(reference))  # a prepared folder given as data.source is read as it is
    loaded = load_corpus(direct, BYTE)
    assert np.array_equal(np.asarray(loaded.tokens), expected_tokens(documents())[0])

    tokenizer_path = _tiny_hf_tokenizer(tmp_path / "tokenizer.json")
    other = build_tokenizer(DataConfig(tokenizer=str(tokenizer_path)))
    with pytest.raises(DataError) as info:
        load_corpus(DataConfig(source=str(reference), tokenizer=str(tokenizer_path)), other)
    msg = str(info.value)
    assert msg.startswith("data.tokenizer: the prepared data") and str(reference) in msg and "'byte'" in msg
    assert other.name in msg and "bigtrain prepare" in msg and "\n" not in msg

    # a cached folder whose index names another tokenizer (copied over, or edited) is to be deleted
    cfg = DataConfig(source=str(corpus), cache_dir=str(tmp_path / "cache"))
    folder = prepare_corpus(cfg, BYTE, workers=1, shard_bytes=SHARD).folder
    index = json.loads((folder / "index.json").read_text())
    index["tokenizer"]["name"] = "hf-0123456789abcdef"
    (folder / "index.json").write_text(json.dumps(index))
    pattern = rf"data\.tokenizer: .*'hf-0123456789abcdef'.*Delete '{re.escape(str(folder))}'"
    with pytest.raises(DataError, match=pattern):
        load_corpus(cfg, BYTE)


def test_a_prepared_folder_missing_a_shard_names_it(reference: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copied"
    shutil.copytree(reference, copy)
    (copy / "shard_00003.docs.npy").unlink()
    with pytest.raises(DataError) as info:
        load_corpus(DataConfig(source=str(copy)), BYTE)
    msg = str(info.value)
    assert msg.startswith("data.source: the prepared folder") and "shard_00003.docs.npy" in msg and "\n" not in msg


def _quiet(datasets):
    from bigtrain.data.source_datasets import _quiet as quiet

    return quiet(datasets)


def test_config_of_the_command_is_the_training_config(tmp_path: Path) -> None:
    """What `bigtrain prepare` builds is what training with the same config and overrides looks for."""
    cfg = load_config(SMOKE_CONFIG, [f"data.cache_dir={tmp_path}", "data.max_bytes=40000"])
    assert not data_ready(cfg, BYTE)
    assert main(["prepare", "--workers", "1", f"data.cache_dir={tmp_path}", "data.max_bytes=40000"]) == 0
    assert data_ready(cfg, BYTE) and load_corpus(cfg.data, BYTE).from_cache

