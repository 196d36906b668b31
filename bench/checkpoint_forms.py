"""The two checkpoint forms side by side on a 2-rank CPU run (DeepSpeed ZeRO-1, data parallel 2): the engine's own
(native) files and the layout-free form. Per rank: save time, load time (into the same layout), bytes written,
and the peak of anonymous resident memory (RssAnon) above its level before the operation, next to what the rank
keeps (its own shard: parameters + optimizer-state partition) and the largest single tensor.

Run: python bench/checkpoint_forms.py [--d-model 512 --layers 8] [--out bench/results/checkpoint_forms.json]
(it starts 2 ranks under torchrun itself).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def rss() -> int:
    """Anonymous resident memory (RssAnon): what the process allocated; memory-mapped file pages (safetensors
    reads through mmap) are the page cache's and not counted."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def measured(fn):
    """(result, seconds, peak RSS above the level before) of fn()."""
    base, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    return result, seconds, max(peak[0], rss()) - base


def folder_bytes(folder: Path, rank: int) -> int:
    """Bytes of the files one rank wrote (DeepSpeed names its files by rank; layout-free: rankNNNNN.*)."""
    total = 0
    for path in folder.rglob("*"):
        if path.is_file() and (f"rank{rank:05d}" in path.name or f"zero_pp_rank_{rank}_" in path.name or
                               (rank == 0 and path.name.startswith("mp_rank_")) or
                               (rank == 0 and path.name in ("index.json", "config.yaml", "manifest.json"))):
            total += path.stat().st_size
    return total


def worker(args: argparse.Namespace) -> None:
    import dataclasses

    import torch.distributed as dist

    from bigtrain.checkpoint.manager import layout_free_header
    from bigtrain.checkpoint.save import restore_layout_free, save_checkpoint, write_layout_free
    from bigtrain.checkpoint.state import StateAdapter
    from bigtrain.config import dump_config, load_config
    from bigtrain.engine.memory import measure_optimizer, measure_params
    from bigtrain.train.trainer import Trainer

    work = Path(args.work)
    overrides = [f"model.d_model={args.d_model}", f"model.n_layers={args.layers}",
                 f"model.n_heads={args.d_model // 64}", f"model.d_ff={4 * args.d_model}", "model.dropout=0.0",
                 "data.seq_len=128", "model.max_seq_len=128",
                 "data.max_bytes=300000", f"data.cache_dir={work / 'cache'}", "train.steps=2",
                 "train.global_batch_size=4", "train.micro_batch_size=2", "train.eval_every=0", "train.eval_samples=2",
                 "train.sample_tokens=0", "checkpoint.every=0", "checkpoint.layout_free_every=0",
                 "log.tensorboard=false", "log.progress=false", "parallel.zero_stage=1", f"run.dir={work / 'run'}"]
    cfg = load_config(REPO / "configs" / "smoke.yaml", overrides, world_size=2)
    trainer = Trainer(cfg)
    trainer.run()  # two steps: the optimizer state exists
    engine, rank = trainer.engine, trainer.env.rank
    state = dataclasses.asdict(trainer.state)
    directory = work / "bench"

    native, save_native, peak_save_native = measured(
        lambda: save_checkpoint(directory, 1, engine, trainer.layout, rank, dist.barrier, state, dump_config(cfg),
                                keep=5, layout_free=None))
    header = layout_free_header(cfg, trainer.layout, trainer.full_model, state)
    lf_dir = work / "lf"
    _, save_lf, peak_save_lf = measured(
        lambda: write_layout_free(lf_dir, StateAdapter(engine.sharded_state()), rank, 2, header, barrier=dist.barrier))
    dist.barrier()
    (lf_dir / "config.yaml").write_text(dump_config(cfg))
    shard = measure_params(engine.model) + measure_optimizer(engine.optimizer)
    largest = max(p.numel() * p.element_size() for p in engine.model.parameters())

    fresh = Trainer(load_config(REPO / "configs" / "smoke.yaml", [*overrides, f"run.dir={work / 'fresh'}"],
                                world_size=2))
    _, load_native, peak_load_native = measured(lambda: fresh.engine.read_native(native))
    fresh2 = Trainer(load_config(REPO / "configs" / "smoke.yaml", [*overrides, f"run.dir={work / 'fresh2'}"],
                                 world_size=2))
    _, load_lf, peak_load_lf = measured(
        lambda: restore_layout_free(StateAdapter(fresh2.engine.sharded_state()), lf_dir))
    row = {"rank": rank, "n_params": sum(p.numel() for p in trainer.full_model.parameters()),
           "native": {"save_s": save_native, "load_s": load_native, "bytes": folder_bytes(native, rank),
                      "peak_save": peak_save_native, "peak_load": peak_load_native},
           "layout_free": {"save_s": save_lf, "load_s": load_lf, "bytes": folder_bytes(lf_dir / "layout_free", rank),
                           "peak_save": peak_save_lf, "peak_load": peak_load_lf},
           "own_shard_bytes": shard, "largest_tensor_bytes": largest}
    rows = [None, None]
    dist.all_gather_object(rows, row)
    if rank == 0:
        Path(args.result).write_text(json.dumps(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "checkpoint_forms.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="bigtrain-ckpt-bench-") as work:
        result = Path(work) / "rows.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               "--master_port=29613", __file__, "--worker", "--work", work, "--result", str(result),
               "--d-model", str(args.d_model), "--layers", str(args.layers)]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       stdout=subprocess.DEVNULL)
        rows = json.loads(result.read_text())
    mib = 2**20
    print(f"{rows[0]['n_params'] / 1e6:.1f}M parameters, 2 ranks (ZeRO-1, data parallel 2), fp32, CPU")
    print(f"{'rank':<5}{'form':<13}{'save s':>8}{'load s':>8}{'MiB written':>13}{'peak MiB save':>15}"
          f"{'peak MiB load':>15}")
    for r in rows:
        for form in ("native", "layout_free"):
            f = r[form]
            print(f"{r['rank']:<5}{form:<13}{f['save_s']:8.3f}{f['load_s']:8.3f}{f['bytes'] / mib:13.1f}"
                  f"{f['peak_save'] / mib:15.1f}{f['peak_load'] / mib:15.1f}")
    for r in rows:
        print(f"rank {r['rank']}: own shard {r['own_shard_bytes'] / mib:.1f} MiB, largest tensor "
              f"{r['largest_tensor_bytes'] / mib:.1f} MiB; layout-free load peaked at "
              f"{r['layout_free']['peak_load'] / mib:.1f} MiB above its level before "
              f"({r['layout_free']['peak_load'] / (r['own_shard_bytes'] + r['largest_tensor_bytes']):.2f} of "
              f"own shard + largest tensor)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"cpus": os.cpu_count()}, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
