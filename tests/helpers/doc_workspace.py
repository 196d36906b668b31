"""The working folder a doc command runs in (tests/test_doc_commands.py): a fresh copy of what a clone holds next to
the package (configs/, launch/, bench/, slurm/, docs/, Makefile, pyproject.toml), the placeholder files the shipped
configs name (data/corpus.jsonl, data/tokenizer.json), and, where the command names one, a finished run.

The runs are made once per session (`Finished.make`) and put in place per command: `runs/smoke` is `make smoke`'s
run (configs/smoke.yaml, 140 steps, finished) at one sequence per step, so a doc command that would resume it is
caught as it would be after `make smoke`; the others are tiny runs of the published architectures.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import GPT2_OPTIONS, REPO, T5_OPTIONS, tiny_config

CLONE = ("configs", "launch", "bench", "slurm", "docs", "Makefile", "pyproject.toml")
BIN = Path(sys.executable).parent
# `make smoke` at one sequence per step (the global batch may change on a resume, so the run still counts as the
# smoke run's), evaluated on 8 sequences, one checkpoint at the last step: about 20 s on 2 cores.
SMOKE = ("train.global_batch_size=1", "train.micro_batch_size=1", "train.eval_samples=8", "train.sample_tokens=0",
         "checkpoint.every=140", "log.tensorboard=false")
TINY_RUN = ("train.steps=4", "checkpoint.every=4", "train.eval_every=4")
TINY_CONFIG = """\
# run.yaml of docs/data.md: a tiny causal model on data/corpus.jsonl (made by tests/helpers/doc_workspace.py)
model: {family: causal, d_model: 32, n_layers: 2, n_heads: 4, d_ff: 64, max_seq_len: 64}
data: {source: data/corpus.jsonl, tokenizer: byte, seq_len: 32}
train: {steps: 4, global_batch_size: 4, micro_batch_size: 4}
run: {dir: runs/tiny}
"""


def command_env() -> dict[str, str]:
    """The environment of a doc command: .venv/bin first on PATH (as `source .venv/bin/activate` does), and this
    checkout's bigtrain imported."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1", "VIRTUAL_ENV": str(BIN.parent)}


def tiny_tokenizer(path: Path, texts: list[str]) -> None:
    """A byte-level BPE tokenizer.json of 300 ids (the configs' GPT-2 BPE placeholder)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["[PAD]"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))


def link_or_copy(src: str, dst: str) -> None:
    """Weights are linked (every writer replaces a file atomically, never writes into one); the rest is copied."""
    if src.endswith((".pt", ".safetensors")):
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


@dataclass
class Finished:
    """What the session made once: the finished runs, the placeholder data, the shared token cache."""

    root: Path

    @classmethod
    def make(cls, root: Path) -> Finished:
        made = cls(root)
        rng = random.Random(0)
        words = "the quick brown fox jumps over a lazy dog while data flows through every layer".split()
        texts = [" ".join(rng.choice(words) for _ in range(80)) for _ in range(300)]
        (root / "data").mkdir(parents=True)
        (root / "data" / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        tiny_tokenizer(root / "data" / "tokenizer.json", texts)
        smoke = root / "smoke"
        made.clone(smoke)
        proc = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/smoke.yaml", *SMOKE],
                              cwd=smoke, env=command_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and "done: step 140" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
        from bigtrain.train.trainer import train

        # GPT-2 small's 12 layers (the docs' `--layers 0,11`), 32 wide
        train(tiny_config(root / "gpt2" / "run", "causal", *GPT2_OPTIONS, *TINY_RUN, "model.n_layers=12"))
        train(tiny_config(root / "t5" / "run", "seq2seq", *T5_OPTIONS, *TINY_RUN))
        return made

    @property
    def runs(self) -> dict[str, Path]:
        """Each run.dir a doc command names -> the finished run put there (the substitution table's runs)."""
        gpt2, t5 = self.root / "gpt2" / "run", self.root / "t5" / "run"
        return {"runs/smoke": self.root / "smoke" / "runs" / "smoke", "runs/gpt2": gpt2, "runs/gpt": gpt2,
                "runs/big": gpt2, "runs/t5": t5}

    def clone(self, folder: Path) -> None:
        """`folder` as a fresh clone of the repository (outside the package) with the configs' placeholder data
        and the session's token cache (`.cache`: data.cache_dir's default)."""
        folder.mkdir(parents=True, exist_ok=True)
        for name in CLONE:
            src = REPO / name
            if src.is_dir():
                shutil.copytree(src, folder / name, ignore=shutil.ignore_patterns("__pycache__", "logs"))
            else:
                shutil.copy2(src, folder / name)
        (folder / "slurm" / "logs").mkdir(exist_ok=True)
        shutil.copytree(self.root / "data", folder / "data")
        (self.root / "cache").mkdir(exist_ok=True)
        (folder / ".cache").symlink_to(self.root / "cache")

    def workspace(self, folder: Path, command: str) -> Path:
        """A fresh working folder for `command`: the clone, the runs it names, run.yaml and a hostfile."""
        self.clone(folder)
        for name, run in self.runs.items():  # runs/smoke always: every command runs right after `make smoke`
            if name == "runs/smoke" or name in command.split() or f"{name}/" in command:
                shutil.copytree(run, folder / name, copy_function=link_or_copy)
        (folder / "run.yaml").write_text(TINY_CONFIG)
        (folder / "hostfile").write_text("node1 slots=4\nnode2 slots=4\n")
        return folder
