"""Tokenizing speed and memory of `bigtrain prepare` (docs/data.md), against Hugging Face `datasets`' own
`Dataset.from_json(...).map(tokenize, batched=True, num_proc=2)`, and the time to the first training step on
prepared data.

A JSONL corpus of `--size-mb` megabytes (1 GB by default) is generated under a temporary folder from the embedded
corpus (the Python standard library's source, cut into documents of 0.2-20 kB). A byte-level BPE tokenizer.json
(8192 entries) is trained with `tokenizers` on the first 8 MB of the embedded corpus (`--bpe-train-mb`). Then,
each in a process of its own (so that its memory is its own):

- `prepare` at each `--workers` count for the byte tokenizer and for the BPE tokenizer.json (`--bpe-mb`: only the
  first MB of the corpus for the BPE rows, the baseline's included; BPE tokenizes at about 8 MB/s on 2 cores):
  seconds inside `prepare_corpus` (spawning included), tokens/s, MB/s of JSONL input, and the peak resident set
  (VmHWM) of the main process and of the largest worker;
- the baseline: `Dataset.from_json` (its Arrow conversion) then `.map(batched=True, num_proc=2)` storing the ids
  (uint16 / uint32), timed in two parts, with the same peaks (the main process, the largest of the map's workers);
- the time from the start of a training process (before `import torch`) to the end of its first training step on the
  prepared byte-level corpus (tiny model, one step, no evaluation), and the part of it that opens the shards.

Run: python bench/tokenization.py [--size-mb 1000] [--bpe-mb MB] [--workers 1,2] [--no-baseline] [--wait-quiet S]
     [--out FILE] [--keep DIR]
     writes bench/results/tokenization.json and prints a markdown table
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from bench.corpus import BPE_VOCAB, MB, head, make_corpus, train_bpe  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=1000.0, help="JSONL corpus size in MB (default 1000)")
    parser.add_argument("--bpe-mb", type=float, help="the BPE runs (bigtrain's and the baseline's) read the first MB "
                        "of the corpus only (default: all of it; BPE tokenizes at about 8 MB/s on 2 cores)")
    parser.add_argument("--bpe-train-mb", type=float, default=8.0, help="MB of the embedded corpus the BPE "
                        "tokenizer.json is trained on (default 8)")
    parser.add_argument("--workers", default="1,2", help="worker counts of bigtrain prepare, comma-separated")
    parser.add_argument("--no-baseline", action="store_true", help="skip the datasets baseline")
    parser.add_argument("--wait-quiet", type=float, default=0.0, help="before each run, wait up to this many "
                        "seconds for other processes to leave the CPU idle (a shared machine); each run records the "
                        "share of the CPU others took while it ran")
    parser.add_argument("--out", type=Path, help="JSON path (default: bench/results/tokenization.json)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary folder)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measured run, JSON on stdout
    return parser.parse_args(argv)


# --- measured runs, each in a process of its own ------------------------------------------------------


def vm_hwm(pid: int | str = "self") -> int:
    """Peak resident set of a process (VmHWM, bytes; kept per address space, so not inherited from the bench's own
    process the way ru_maxrss is across fork and exec); 0 when unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class Peaks:
    """The peak resident set of this process and of the largest of its descendants (polled every 0.1 s)."""

    def __init__(self) -> None:
        import threading

        self.worker = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(0.1):
            try:
                children = me.children(recursive=True)
            except psutil.Error:
                continue
            for child in children:
                self.worker = max(self.worker, vm_hwm(child.pid))

    def result(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return {"rss_main": vm_hwm(), "rss_worker": self.worker}


def child_prepare(spec: dict[str, Any]) -> dict[str, Any]:
    from bigtrain.config.schema import DataConfig
    from bigtrain.data.corpus import prepare_corpus
    from bigtrain.data.tokenizer import build_tokenizer

    cfg = DataConfig(source=spec["source"], tokenizer=spec["tokenizer"], cache_dir=spec["cache"])
    tokenizer = build_tokenizer(cfg)
    peaks = Peaks()
    started = time.perf_counter()
    done = prepare_corpus(cfg, tokenizer, workers=spec["workers"])
    return {"seconds": time.perf_counter() - started, "tokens": done.tokens, "documents": done.documents,
            "shards": done.shards, "input_bytes": done.input_bytes, "folder": str(done.folder), **peaks.result()}


def child_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    import datasets
    import numpy as np

    datasets.disable_progress_bars()
    import pyarrow.compute as pc

    datasets.disable_progress_bars()
    if spec["tokenizer"] == "byte":
        def encode(texts: list[str]) -> list:
            return [np.frombuffer(t.encode(), dtype=np.uint8).astype(np.uint16) for t in texts]
    else:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(spec["tokenizer"])

        def encode(texts: list[str]) -> list:
            return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = encode(batch["text"])
        return {"ids": ids, "n": [len(x) for x in ids]}

    features = datasets.Features({"ids": datasets.Sequence(datasets.Value("uint16")), "n": datasets.Value("int32")})
    peaks = Peaks()
    started = time.perf_counter()
    ds = datasets.Dataset.from_json(spec["source"], cache_dir=spec["cache"])
    loaded = time.perf_counter()
    ds = ds.map(tokenize, batched=True, num_proc=2, remove_columns=ds.column_names, features=features)
    mapped = time.perf_counter()
    tokens = pc.sum(ds.data.column("n")).as_py()
    return {"seconds": mapped - started, "from_json_s": loaded - started, "map_s": mapped - loaded,
            "tokens": tokens, "rows": len(ds), **peaks.result()}


def child_first_step(spec: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()  # before torch and bigtrain are imported
    from bigtrain.config import load_config
    from bigtrain.data.corpus import load_corpus
    from bigtrain.data.tokenizer import ByteTokenizer
    from bigtrain.train.trainer import Trainer

    overrides = [f"data.source={spec['source']}", f"data.cache_dir={spec['cache']}", "model.d_model=64",
                 "model.n_layers=2", "model.n_heads=4", "model.d_ff=256", "model.max_seq_len=128", "data.seq_len=128",
                 "train.steps=2", "train.global_batch_size=8", "train.micro_batch_size=8", "train.eval_every=0",
                 "train.sample_tokens=0", "checkpoint.every=0", "checkpoint.resume=false", "log.tensorboard=false",
                 "log.progress=false", f"run.dir={spec['run_dir']}"]
    cfg = load_config(None, overrides)
    imported = time.perf_counter()
    corpus = load_corpus(cfg.data, ByteTokenizer())
    opened = time.perf_counter() - imported
    assert corpus.from_cache, "the corpus was not prepared"
    import contextlib

    class Stop(Exception):
        """Raised as the second step starts: the first one is done."""

    marks: list[float] = []
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        trainer = Trainer(cfg)
        built = time.perf_counter()
        real_step = trainer.engine.train_step

        def first_step_only(*args: Any, **kwargs: Any) -> Any:
            if marks:
                raise Stop
            out = real_step(*args, **kwargs)
            marks.append(time.perf_counter())
            return out

        trainer.engine.train_step = first_step_only
        with contextlib.suppress(Stop):
            trainer.run()
    return {"seconds": marks[0] - started, "imports_s": imported - started, "trainer_build_s": built - imported,
            "first_step_s": marks[0] - built, "open_corpus_s": opened, "tokens": len(corpus.tokens),
            "shards": corpus.shards, "rss_main": vm_hwm(), "rss_anon_end": _status("RssAnon"),
            "rss_file_end": _status("RssFile")}


def _status(field: str) -> int:
    """A /proc/self/status size in bytes (0 when unknown)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


CHILDREN = {"prepare": child_prepare, "baseline": child_baseline, "first_step": child_first_step}


def run_child(kind: str, spec: dict[str, Any], wait_quiet: float = 0.0) -> dict[str, Any]:
    """One measured run in a fresh process: its result, its wall time (start-up included) and the share of the
    machine's CPU that other processes took meanwhile (after waiting up to `wait_quiet` s for a quiet machine)."""
    from bench.harness import ForeignLoad, wait_for_quiet

    quiet = wait_for_quiet(wait_quiet) if wait_quiet > 0 else None
    started = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with ForeignLoad() as load:
        proc = subprocess.run([sys.executable, "-m", "bench.tokenization", "--child",
                               json.dumps({"kind": kind, **spec})], capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} run failed ({proc.returncode}): {proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(wall_s=time.perf_counter() - started, foreign_cpu_share=load.share, quiet=quiet)
    return result


# --- the benchmark ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(CHILDREN[spec.pop("kind")](spec)))
        return None
    from bench.harness import RESULTS, machine, write_json

    work = args.keep or Path(tempfile.mkdtemp(prefix="bigtrain-tokenize-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = _bench(args, work)
        result["machine"] = machine()
        result["command"] = "python bench/tokenization.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(table(result))
    write_json(args.out or RESULTS / "tokenization.json", result)
    return result


def _bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    corpus = work / "corpus.jsonl"
    started = time.perf_counter()
    made = make_corpus(corpus, int(args.size_mb * MB))
    print(f"corpus: {made['bytes'] / MB:.0f} MB, {made['documents']:,} documents in "
          f"{time.perf_counter() - started:.0f} s ({corpus})", flush=True)
    bpe = work / "tokenizer.json"
    bpe_s = train_bpe(bpe, int(args.bpe_train_mb * MB))
    print(f"BPE tokenizer.json ({BPE_VOCAB} entries) trained in {bpe_s:.1f} s", flush=True)
    sources = {"byte": (corpus, made["bytes"])}
    if args.bpe_mb is not None and args.bpe_mb < args.size_mb:
        bpe_corpus = work / "corpus-head.jsonl"
        sources["bpe"] = (bpe_corpus, head(corpus, bpe_corpus, int(args.bpe_mb * MB)))
    else:
        sources["bpe"] = sources["byte"]
    tokenizers = {"byte": "byte", "bpe": str(bpe)}
    workers = [int(w) for w in args.workers.split(",")]
    rows: list[dict[str, Any]] = []
    byte_cache = work / "cache-byte"  # the byte-level shards of the first run, kept for the training start
    for name, tokenizer in tokenizers.items():
        source, _ = sources[name]
        for n in workers:
            keep = name == "byte" and n == workers[0]
            cache = byte_cache if keep else work / f"cache-{name}-{n}"
            r = run_child("prepare", {"source": str(source), "tokenizer": tokenizer, "cache": str(cache),
                                      "workers": n}, args.wait_quiet)
            rows.append({"tool": "bigtrain prepare", "tokenizer": name, "workers": n, **r})
            print(_row(rows[-1]), flush=True)
            if not keep:
                shutil.rmtree(cache, ignore_errors=True)  # keep the disk use down
    if not args.no_baseline:
        for name, tokenizer in tokenizers.items():
            source, nbytes = sources[name]
            cache = work / f"hf-{name}"
            r = run_child("baseline", {"source": str(source), "tokenizer": tokenizer, "cache": str(cache)},
                          args.wait_quiet)
            rows.append({"tool": "datasets from_json + map", "tokenizer": name, "workers": 2, "input_bytes": nbytes,
                         **r})
            print(_row(rows[-1]), flush=True)
            shutil.rmtree(cache, ignore_errors=True)
    step = run_child("first_step", {"source": str(corpus), "cache": str(byte_cache), "run_dir": str(work / "run")},
                     args.wait_quiet)
    print(f"start to first step on prepared data: {step['seconds']:.1f} s (opening {step['shards']} shards: "
          f"{step['open_corpus_s']:.2f} s)", flush=True)
    return {"figure": "tokenize", "corpus_bytes": made["bytes"], "corpus_documents": made["documents"],
            "bpe_bytes": sources["bpe"][1], "bpe_vocab": BPE_VOCAB, "bpe_train_s": bpe_s, "rows": rows,
            "first_step": step}


def _row(r: dict[str, Any]) -> str:
    return (f"{r['tool']}, {r['tokenizer']}, {r['workers']} worker(s): {r['seconds']:.1f} s, "
            f"{r['input_bytes'] / MB / r['seconds']:.1f} MB/s, peak RSS {r['rss_main'] / 2**20:.0f} MiB main / "
            f"{r['rss_worker'] / 2**20:.0f} MiB worker")


def _share(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.0f}%"


def table(result: dict[str, Any]) -> str:
    """The markdown table of a result."""
    m = result["machine"]
    lines = [f"Corpus: {result['corpus_bytes'] / MB:,.0f} MB of JSONL, {result['corpus_documents']:,} documents; "
             f"machine: {m['cpu']}, {m['cpus']} CPUs.", "",
             "| tool | tokenizer | processes | seconds | MB/s | tokens/s | peak RSS main | peak RSS per worker | "
             "others' CPU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        mb = r["input_bytes"] / MB
        tokens = f"{r['tokens'] / r['seconds'] / 1e6:.2f} M" if r.get("tokens") else "n/a"
        extra = f" ({mb:.3g} MB)" if r["input_bytes"] != result["corpus_bytes"] else ""
        extra += (f" (from_json {r['from_json_s']:.0f} s + map {r['map_s']:.0f} s)" if "map_s" in r else "")
        worker = f"{r['rss_worker'] / 2**20:.0f} MiB" if r["tool"] != "bigtrain prepare" or r["workers"] > 1 else "-"
        lines.append(f"| {r['tool']}{extra} | {r['tokenizer']} | {r['workers']} | {r['seconds']:.1f} | "
                     f"{mb / r['seconds']:.1f} | {tokens} | {r['rss_main'] / 2**20:.0f} MiB | {worker} | "
                     f"{_share(r.get('foreign_cpu_share'))} |")
    s = result["first_step"]
    lines += ["", f"Start of a training process to the end of its first step on the prepared byte-level corpus "
                  f"({s['tokens'] / 1e6:,.0f} M tokens in {s['shards']} shards): {s['seconds']:.1f} s (imports "
                  f"{s['imports_s']:.1f} s, Trainer {s['trainer_build_s']:.1f} s of which opening the shards "
                  f"{s['open_corpus_s']:.2f} s, first step {s['first_step_s']:.1f} s); peak RSS "
                  f"{s['rss_main'] / 2**20:.0f} MiB (at the end {s['rss_anon_end'] / 2**20:.0f} MiB anonymous + "
                  f"{s['rss_file_end'] / 2**20:.0f} MiB of mapped files: the shards' pages read, and libraries); "
                  f"others' CPU {_share(s.get('foreign_cpu_share'))}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
