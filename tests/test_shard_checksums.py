"""The prepared shards against the SHA-256s of their index before training (issue 25): a shard changed in place
stops the run naming the file; a large corpus is checked on a stated random sample, and data.verify_shards=all
finds what the sample missed; the other ranks wait for rank 0's check without timing out."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from bigtrain.config.schema import DataConfig
from bigtrain.data.corpus import load_corpus, prepare_corpus
from bigtrain.errors import DataError
from tests.conftest import DP_LAYOUT, REPO, launch_ranks, tiny_overrides
from tests.test_prepare import BYTE, SHARD, documents, write_jsonl


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", documents())


@pytest.fixture(scope="module")
def reference(corpus: Path, tmp_path_factory) -> Path:
    """The corpus prepared into about ten shards."""
    cfg = DataConfig(source=str(corpus), cache_dir=str(tmp_path_factory.mktemp("reference")))
    return prepare_corpus(cfg, BYTE, workers=1, shard_bytes=SHARD).folder


def _change_in_place(path: Path) -> None:
    """Change one byte of text in a token file so that every id stays valid: only the checksum can tell."""
    data = bytearray(path.read_bytes())
    assert data[11] == 0 and data[10] != BYTE.eos_id  # token 5 is a byte of text
    data[10] = ord("A") if data[10] != ord("A") else ord("B")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("given", [True, False], ids=["data.source-folder", "data.cache_dir"])
def test_training_refuses_a_shard_changed_in_place(corpus: Path, reference: Path, tmp_path: Path, given) -> None:
    """A prepared shard altered after `bigtrain prepare` (ids still valid) stops the run before step one, naming the
    file and the fix: prepare it again, or copy (restore) it."""
    import shutil

    from bigtrain.train.trainer import Trainer
    from tests.conftest import tiny_config

    if given:  # a prepared folder as data.source
        folder = shutil.copytree(reference, tmp_path / "copied")
        source = [f"data.source={folder}"]
    else:  # the token cache of a JSONL source
        cache = shutil.copytree(reference.parent.parent, tmp_path / "cache")
        folder = cache / "tokens" / reference.name
        source = [f"data.source={corpus}", f"data.cache_dir={cache}"]
    _change_in_place(folder / "shard_00004.bin")
    with pytest.raises(DataError) as info:
        Trainer(tiny_config(tmp_path / "run", "causal", *source))
    msg = str(info.value)
    assert f"'{folder / 'shard_00004.bin'}'" in msg and "SHA-256" in msg and "\n" not in msg
    assert "bigtrain prepare" in msg and ("copy the folder" in msg if given else "Delete that file" in msg)


def test_a_large_corpus_is_checked_on_a_stated_sample_and_all_finds_the_rest(reference: Path, tmp_path: Path,
                                                                            monkeypatch, capsys) -> None:
    """Above the sampling threshold `auto` hashes a random sample of shards and says which fraction and how many
    bytes; a shard changed outside that sample is what the full check (data.verify_shards=all) still finds."""
    import shutil

    from bigtrain.data import shard_checksums
    from bigtrain.data.shard_checksums import choose_shards, shard_bytes, verify_shards

    folder = shutil.copytree(reference, tmp_path / "copied")
    index = json.loads((folder / "index.json").read_text())
    sizes = shard_bytes(index)
    budget = int(2.5 * sizes.mean())
    monkeypatch.setattr(shard_checksums, "SAMPLE_BYTES", budget)

    load_corpus(DataConfig(source=str(folder)), BYTE, verify=True)
    out = capsys.readouterr().out
    match = re.search(r"checked the SHA-256 of a random ([\d.]+)% of .*\((\d+) of (\d+) shards, ([\d.]+) of ([\d.]+) "
                      r"GB; another draw at each start\): all match\. data\.verify_shards=all checks every shard", out)
    assert match, out
    percent, chosen, total, gb, total_gb = match.groups()
    assert int(total) == len(sizes) >= 8 and 1 <= int(chosen) < len(sizes)
    assert float(total_gb) == pytest.approx(sizes.sum() / 1e9, abs=0.01) and float(gb) * 1e9 <= budget + 5e6
    assert 0 < float(percent) < 100 * budget / sizes.sum() + 1

    sample = choose_shards(sizes, "auto", budget, np.random.default_rng(0))
    missed = next(k for k in range(len(sizes)) if k not in sample)
    _change_in_place(folder / f"shard_{missed:05d}.bin")
    checked = verify_shards(folder, index, "auto", budget=budget, rng=np.random.default_rng(0))
    assert checked.sampled and checked.shards == len(sample)  # the sample missed it
    with pytest.raises(DataError, match=rf"shard_{missed:05d}\.bin' is corrupt: its SHA-256 is"):
        load_corpus(DataConfig(source=str(folder), verify_shards="all"), BYTE, verify=True)
    assert "every shard" not in capsys.readouterr().out


@pytest.mark.launches
def test_the_other_ranks_wait_for_rank_0_to_check_the_shards(reference: Path, corpus: Path, tmp_path: Path) -> None:
    """2 ranks on a prepared cache: rank 0 checks every shard (data.verify_shards=all) for longer than
    parallel.collective_timeout while rank 1 waits on the long host group; nobody times out, and only rank 0
    hashes."""
    import shutil

    cache = shutil.copytree(reference.parent.parent, tmp_path / "cache")
    proc = launch_ranks(2, tiny_overrides(tmp_path / "run", "causal", *DP_LAYOUT, f"data.source={corpus}",
                                          f"data.cache_dir={cache}", "data.verify_shards=all", "train.steps=1",
                                          "parallel.collective_timeout=3"),
                        script=REPO / "tests" / "helpers" / "inject.py", env={"BIGTRAIN_TEST_SLOW_VERIFY": "6"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"data: the SHA-256 of every shard of '{cache / 'tokens' / reference.name}' matches") == 1
