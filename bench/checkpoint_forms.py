"""The two checkpoint forms side by side on a 2-rank CPU run (DeepSpeed ZeRO-1, data parallel 2): the engine's own
(native) files and the layout-free form. Per rank: save time, load time (into the same layout), bytes written,
and the peak of anonymous resident memory (RssAnon) above its level before the operation, next to what the rank
keeps (its own shard: parameters + optimizer-state partition) and the largest single tensor.

Run: python bench/checkpoint_forms.py [--d-model 512 --layers 8] [--out bench/results/checkpoint_forms.json]
(it starts 2 ranks under torchrun itself).

`--async-stall` measures instead what a save costs the training thread, synchronous (`checkpoint.async: false`)
against asynchronous (`true`), for the smoke model and a ~300M model (d_model 1024, 24 layers), one CPU process
each (the plain engine, fp32, both checkpoint forms): the stall per save (sync: the whole save; async: the host
copy at the save step plus the commit at a later step boundary), the bytes written, the peak of anonymous
resident memory above its level before the save, the time until the background write is committed, and the
step time while it runs against the step time without one. Two asynchronous saves are measured: the first copies
into fresh memory, the second (as every later save of a run) into the storages the first left (`HostPool`, kept
resident between saves; the peak column is the first save's, which allocates them).
Run: python bench/checkpoint_forms.py --async-stall [--sizes smoke,300m] [--out bench/results/checkpoint_async.json].
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


SIZES = {"smoke": [], "300m": ["model.d_model=1024", "model.n_layers=24", "model.n_heads=16", "model.d_ff=4096"]}


def one_step(trainer) -> float:
    """One training step outside the loop (the bench drives the checkpoint manager itself); its seconds."""
    start, step = time.perf_counter(), trainer.state.step
    batches, counts = trainer.data.micro_batches(step)
    trainer.engine.train_step(batches, trainer.lr_at(step + 1), counts=counts)
    trainer.state.step += 1
    return time.perf_counter() - start


def stall_worker(args: argparse.Namespace) -> None:
    """One size: a synchronous save, then an asynchronous one with training going on until it is committed."""
    import dataclasses

    from bigtrain.config import load_config
    from bigtrain.train.trainer import Trainer

    work = Path(args.work)
    cfg = load_config(REPO / "configs" / "smoke.yaml", [
        *SIZES[args.size], "data.seq_len=128", "train.global_batch_size=1", "train.micro_batch_size=1",
        "train.eval_every=0", "train.sample_tokens=0", "train.threads=1", "checkpoint.every=0",
        "checkpoint.keep=5", "log.tensorboard=false", "log.progress=false", f"data.cache_dir={work / 'cache'}",
        f"run.dir={work / 'run'}"])
    trainer = Trainer(cfg)
    manager = trainer.checkpoints
    one_step(trainer)  # the optimizer state exists from here
    _, _, step_peak = measured(lambda: one_step(trainer))  # what a step alone adds (gradients, activations)
    baseline = [one_step(trainer) for _ in range(args.steps)]

    def use(async_save: bool) -> None:
        manager.cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, async_=async_save))

    use(False)
    path, sync_s, sync_peak = measured(lambda: manager.save(dataclasses.asdict(trainer.state), last=False))
    written = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    one_step(trainer)
    use(True)

    def asynchronous() -> dict:
        """One asynchronous save, training going on until it is committed (or `--max-steps` steps)."""
        polls, during = [], []

        def run() -> float:
            start = time.perf_counter()
            manager.save(dataclasses.asdict(trainer.state), last=False)
            capture = time.perf_counter() - start
            while manager.pending is not None:
                if len(during) >= args.max_steps:  # the writer outlasts the steps: the end of a run waits for it
                    start = time.perf_counter()
                    manager.finish()
                    polls.append(time.perf_counter() - start)
                    break
                during.append(one_step(trainer))
                start = time.perf_counter()
                manager.poll()
                polls.append(time.perf_counter() - start)
            return capture

        capture_s, write_s, peak = measured(run)
        return {"capture_s": capture_s, "commit_s": polls[-1], "polls_s": sum(polls[:-1]),
                "stall_s": capture_s + sum(polls), "peak": peak, "committed_after_s": write_s,
                "steps_during_write": len(during),
                "step_s_during_write": sorted(during)[len(during) // 2] if during else None}

    first = asynchronous()  # into fresh memory
    later = asynchronous()  # into the storages the first one left in the pool, as every later save of a run
    row = {"size": args.size, "n_params": sum(p.numel() for p in trainer.full_model.parameters()),
           "bytes_written": written, "step_s": sorted(baseline)[len(baseline) // 2], "step_peak": step_peak,
           "sync": {"stall_s": sync_s, "peak": sync_peak}, "async_first": first, "async": later}
    Path(args.result).write_text(json.dumps(row))


def async_stall(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bigtrain-ckpt-async-") as work:
        for size in args.sizes.split(","):
            result = Path(work) / f"{size}.json"
            cmd = [sys.executable, __file__, "--stall-worker", "--size", size, "--work", str(Path(work) / size),
                   "--result", str(result), "--steps", str(args.steps), "--max-steps", str(args.max_steps)]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
            rows.append(json.loads(result.read_text()))
    mib = 2**20
    print("| model | parameters | MiB written per save | sync stall s | async stall s: first save, later saves "
          "(copy + commit) | stall ratio, later saves | peak MiB sync | peak MiB async, first save (a step alone) "
          "| async committed after s (steps) | step s without / during a write |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        s, f, a = r["sync"], r["async_first"], r["async"]
        during = f"{a['step_s_during_write']:.3f}" if a["step_s_during_write"] is not None else "-"
        print(f"| {r['size']} | {r['n_params'] / 1e6:.1f}M | {r['bytes_written'] / mib:.1f} | {s['stall_s']:.3f} | "
              f"{f['stall_s']:.3f}, {a['stall_s']:.3f} ({a['capture_s']:.3f} + {a['commit_s']:.3f}) | "
              f"{s['stall_s'] / a['stall_s']:.1f}× | {s['peak'] / mib:.1f} | {f['peak'] / mib:.1f} "
              f"({r['step_peak'] / mib:.1f}) | {a['committed_after_s']:.1f} ({a['steps_during_write']}) | "
              f"{r['step_s']:.3f} / {during} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python bench/checkpoint_forms.py --async-stall --sizes "
                                    f"{args.sizes}", "machine": {"cpus": os.cpu_count()}, "rows": rows},
                                   indent=1) + "\n")
    print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None,
                        help="default: bench/results/checkpoint_forms.json (--async-stall: checkpoint_async.json)")
    parser.add_argument("--async-stall", action="store_true", help="sync vs async saves: the training stall")
    parser.add_argument("--sizes", default="smoke,300m", help="--async-stall: the models (smoke, 300m)")
    parser.add_argument("--steps", type=int, default=3, help="--async-stall: steps timed without a save")
    parser.add_argument("--max-steps", type=int, default=200, help="--async-stall: steps at most while writing")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stall-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.stall_worker:
        stall_worker(args)
        return
    results = REPO / "bench" / "results"
    if args.async_stall:
        args.out = args.out or results / "checkpoint_async.json"
        async_stall(args)
        return
    args.out = args.out or results / "checkpoint_forms.json"
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
