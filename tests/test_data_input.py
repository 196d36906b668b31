"""Input text is what the user gave: undecodable bytes, binary files, corrupt caches, leftovers of killed
builds and a full disk each stop with a DataError naming the file and the fix, or are handled visibly."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bigtrain.config.schema import DataConfig
from bigtrain.data import ByteTokenizer, cache_writes, shard_build
from bigtrain.data.corpus import load_corpus
from bigtrain.errors import DataError

BYTE = ByteTokenizer()


def data_cfg(tmp_path: Path, source: Path, **data) -> DataConfig:
    cfg = DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"))
    for key, value in data.items():
        setattr(cfg, key, value)
    return cfg


def tokens_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "tokens"


def test_latin1_text_strict_names_offset_and_replace_warns_with_count(tmp_path: Path, capsys) -> None:
    path = tmp_path / "latin1.txt"
    text = "plain ascii, then café and naïve résumé\n"
    path.write_bytes(text.encode("latin-1"))
    offset = text.index("é")
    with pytest.raises(DataError) as info:
        load_corpus(data_cfg(tmp_path, path), BYTE)
    msg = str(info.value)
    assert "latin1.txt" in msg and f"offset {offset}" in msg and "0xe9" in msg and "\n" not in msg
    assert "data.encoding_errors=replace" in msg

    corpus = load_corpus(data_cfg(tmp_path, path, encoding_errors="replace"), BYTE)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning" in err and "latin1.txt" in err and "had 4 undecodable bytes" in err
    trained = BYTE.decode(corpus.tokens.tolist())
    assert trained.count("\ufffd") == 4 and "caf\ufffd and" in trained
    with pytest.raises(DataError, match=f"offset {offset}"):  # strict does not reuse the replaced cache
        load_corpus(data_cfg(tmp_path, path), BYTE)


@pytest.mark.parametrize("mode", ["strict", "replace"])
def test_binary_file_named_txt_is_refused(tmp_path: Path, mode: str) -> None:
    png = tmp_path / "picture.txt"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    with pytest.raises(DataError) as info:
        load_corpus(data_cfg(tmp_path, png, encoding_errors=mode), BYTE)
    msg = str(info.value)
    assert "picture.txt" in msg and "binary" in msg and "offset 8" in msg and "PNG" in msg and "\n" not in msg

    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("fine text " * 50)
    (folder / "b.txt").write_bytes(b"looks like text" + b"\x00" * 10)  # no signature, only a NUL
    with pytest.raises(DataError, match=r"b\.txt.*binary.*offset 15"):
        load_corpus(data_cfg(tmp_path, folder, encoding_errors=mode), BYTE)
    assert not list(tokens_dir(tmp_path).glob("*.bin"))


def test_corrupt_token_cache_is_refused_naming_the_file(tmp_path: Path) -> None:
    source = tmp_path / "doc.txt"
    source.write_text("some text for the cache " * 40)
    cfg = data_cfg(tmp_path, source)
    path = load_corpus(cfg, BYTE).path
    assert load_corpus(cfg, BYTE).from_cache
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 4)  # ids 0xffff, beyond the byte tokenizer's 260
    with pytest.raises(DataError) as info:
        load_corpus(cfg, BYTE)
    msg = str(info.value)
    assert str(path) in msg and "token 50" in msg and "65535" in msg and "Delete" in msg and "\n" not in msg

    path.write_bytes(path.read_bytes()[:-2])  # a truncated file no longer matches the document ends
    with pytest.raises(DataError, match=r"docs\.npy.*ends at token"):
        load_corpus(cfg, BYTE)
    path.unlink()  # a missing file is simply rebuilt
    assert not load_corpus(cfg, BYTE).from_cache


def test_stale_temporaries_are_removed_but_live_writers_kept(tmp_path: Path) -> None:
    folder = tokens_dir(tmp_path)
    folder.mkdir(parents=True)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid is now free: a writer killed mid-build
    tag = cache_writes._writer_tag()
    dead = folder / f"abc.uint16.bin.{tag}.{child.pid}.k3j4h5g6.tmp"
    live = folder / f"abc.uint16.bin.{tag}.{os.getpid()}.a1b2c3d4.tmp"
    elsewhere = folder / f"abc.docs.npy.otherhost-1.{child.pid}.zz99yy88.tmp"
    for path in (dead, live, elsewhere):
        path.write_bytes(b"partial")
    source = tmp_path / "doc.txt"
    source.write_text("hello " * 50)
    load_corpus(data_cfg(tmp_path, source), BYTE)
    left = {p.name for p in folder.glob("*.tmp")}
    assert left == {live.name, elsewhere.name}


def test_disk_full_while_writing_cache_is_a_data_error(tmp_path: Path, monkeypatch) -> None:
    source = tmp_path / "folder"
    source.mkdir()
    for i in range(3):
        (source / f"{i}.txt").write_text(f"document {i} " * 100)
    calls = []

    def full_disk(out, data: bytes) -> None:
        if calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        calls.append(len(data))
        out.write(data)

    monkeypatch.setattr(shard_build, "_write_chunk", full_disk)
    with pytest.raises(DataError) as info:
        load_corpus(data_cfg(tmp_path, source), BYTE)
    msg = str(info.value)
    assert "No space left on device" in msg and ".bin" in msg and "\n" not in msg
    assert f"after {calls[0]} bytes written" in msg and "needs about" in msg and "data.cache_dir" in msg
    assert not list(tokens_dir(tmp_path).iterdir())  # no temporary and no partial cache is left
