"""Sharded engines side by side on one config: DeepSpeed's ZeRO stage and fairscale's equivalent (ZeRO-1:
OSS, ZeRO-2: OSS + ShardedDataParallel, ZeRO-3: FullyShardedDataParallel), or with `--engine torch` PyTorch's
FSDP2 (ZeRO-2: reshard_after_forward=False, ZeRO-3: True), same ranks, same seed, same data.

For each stage both engines train `--steps` steps through launch/train.py under torchrun (NCCL on GPUs, one
rank per GPU; gloo on the CPU, one thread per rank). Reported per stage:

    parity       max over steps of |a − b| / |a| for loss and grad_norm (fp32: expect ≲ 1e-5; bf16 rounds)
    throughput   median tokens/s of the whole job over the steps after `--warmup`, and the engine / DeepSpeed
    model state  measured bytes per rank (parameters + gradients + optimizer, memory.json) and the formula

fairscale runs FSDP on CUDA only; on a CPU the ZeRO-3 pair runs FSDP through tests/helpers/fsdp_on_cpu.py,
which stands a host "stream" in for its CUDA streams (the result says so), so only its parity means something
there.

Run: python bench/sharded_engines.py [--engine fairscale|torch] [--stages 1,2,3] [--ranks N] [--steps 20]
     [--warmup 5] [--config FILE] [overrides]   writes bench/results/sharded_engines-<device>.json (fairscale) or
     sharded_engines-torch-<device>.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.harness import REPO, RESULTS, data_substitutes, machine, write_json  # noqa: E402
from bigtrain.distributed.rendezvous import free_port  # noqa: E402

# A model big enough that the step is not all overhead on a CPU; on GPUs pass a config (e.g. gpt2-small).
MODEL = ["model.n_layers=4", "model.d_model=128", "model.n_heads=4", "model.d_ff=512", "model.max_seq_len=64",
         "data.seq_len=64", "train.global_batch_size=16", "train.micro_batch_size=4", "optim.lr=3e-4"]
QUIET = ["train.eval_every=0", "checkpoint.every=0", "train.sample_tokens=0", "checkpoint.resume=false",
         "log.tensorboard=false", "train.threads=1", "model.dropout=0.0"]
FSDP_ON_CPU = REPO / "tests" / "helpers" / "fsdp_on_cpu.py"
NAMES = {"fairscale": {1: "OSS", 2: "OSS + ShardedDataParallel", 3: "FullyShardedDataParallel"},
         "torch": {2: "FSDP2, parameters kept gathered to backward", 3: "FSDP2"}}


def train(engine: str, stage: int, ranks: int, run_dir: Path, args: argparse.Namespace) -> Path:
    """One run of `engine` at ZeRO `stage`; returns its run.dir."""
    on_cpu = not torch.cuda.is_available()
    script = FSDP_ON_CPU if (engine == "fairscale" and stage == 3 and on_cpu) else REPO / "launch" / "train.py"
    cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(script)]
    if args.config:
        cmd.append(f"--config={args.config}")
    base = [*([] if args.config else MODEL), *args.overrides]
    data = data_substitutes(args.config, base, world_size=ranks)  # placeholder data files: shapes only
    cmd += [*([] if args.config else MODEL), *data, *QUIET, f"train.steps={args.steps}", f"run.dir={run_dir}",
            f"data.cache_dir={run_dir.parent / 'cache'}", f"parallel.engine={engine}", f"parallel.zero_stage={stage}",
            *args.overrides, "log.every=1"]  # every step's loss, grad_norm and tokens/s
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=args.timeout)
    if proc.returncode:
        raise SystemExit(f"{engine} ZeRO-{stage} on {ranks} ranks failed:\n{shlex.join(cmd)}\n"
                         f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return run_dir


def _steps(run_dir: Path) -> dict[int, dict[str, Any]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "loss" in r and "step" in r}


def compare(deepspeed: Path, other: Path, warmup: int, engine: str = "fairscale") -> dict[str, Any]:
    a, b = _steps(deepspeed), _steps(other)
    steps = sorted(set(a) & set(b))
    worst = {k: max(abs(a[s][k] - b[s][k]) / max(abs(a[s][k]), 1e-12) for s in steps) for k in ("loss", "grad_norm")}
    timed = [s for s in steps if s > warmup] or steps
    speed = {name: statistics.median(r[s]["tokens_per_s"] for s in timed) for name, r in (("deepspeed", a),
                                                                                           (engine, b))}
    memory = {name: json.loads((d / "memory.json").read_text()) for name, d in (("deepspeed", deepspeed),
                                                                                 (engine, other))}
    state = {name: max(r["params"] + r["grads"] + r["optimizer"] for r in m["ranks"]) for name, m in memory.items()}
    formula = memory[engine]["formula"]
    return {"steps": len(steps), "max_rel_loss": worst["loss"], "max_rel_grad_norm": worst["grad_norm"],
            "tokens_per_s": speed, f"{engine}_over_deepspeed": speed[engine] / speed["deepspeed"],
            "model_state_bytes_per_rank": state,
            "formula_bytes_per_rank": formula["params"] + formula["grads"] + formula["optimizer"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=sorted(NAMES), default="fairscale", help="what DeepSpeed is compared with")
    parser.add_argument("--stages", default=None, help="default: 1,2,3 (fairscale), 2,3 (torch)")
    parser.add_argument("--ranks", type=int, default=None, help="default: the GPUs here, or 2 CPU ranks")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the tokens/s median")
    parser.add_argument("--config", default=None, help="base config (default: the 4-layer model above)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    gpus = torch.cuda.device_count()
    ranks = args.ranks or gpus or 2
    device = torch.cuda.get_device_name(0) if gpus else "cpu"
    rows = []
    with tempfile.TemporaryDirectory(prefix="bigtrain-engines-") as name:
        other = args.engine
        stages = args.stages or ("1,2,3" if other == "fairscale" else "2,3")
        for stage in (int(s) for s in stages.split(",")):
            runs = {engine: train(engine, stage, ranks, Path(name) / f"{engine}{stage}" / "run", args)
                    for engine in ("deepspeed", other)}
            row = {"stage": stage, other: NAMES[other][stage], **compare(runs["deepspeed"], runs[other],
                                                                         args.warmup, other)}
            row["fsdp_on_cpu_shim"] = other == "fairscale" and stage == 3 and not gpus
            rows.append(row)
            print(f"ZeRO-{stage}: loss {row['max_rel_loss']:.1e}, grad_norm {row['max_rel_grad_norm']:.1e}; "
                  f"tokens/s DeepSpeed {row['tokens_per_s']['deepspeed']:.0f}, {other} "
                  f"{row['tokens_per_s'][other]:.0f} ({row[f'{other}_over_deepspeed']:.2f}x)", flush=True)
    print(f"\n{ranks} rank(s) on {device}\n| ZeRO | {other} | max rel. diff loss / grad_norm | tokens/s DeepSpeed | "
          f"tokens/s {other} | {other} / DeepSpeed | model state MiB/rank DS / {other} / formula |\n|---|---|---|---|"
          f"---|---|---|")
    for r in rows:
        st = r["model_state_bytes_per_rank"]
        print(f"| {r['stage']} | {r[other]}{' (CPU shim)' if r['fsdp_on_cpu_shim'] else ''} | "
              f"{r['max_rel_loss']:.1e} / {r['max_rel_grad_norm']:.1e} | {r['tokens_per_s']['deepspeed']:.0f} | "
              f"{r['tokens_per_s'][other]:.0f} | {r[f'{other}_over_deepspeed']:.2f} | "
              f"{st['deepspeed'] / 2**20:.2f} / {st[other] / 2**20:.2f} / "
              f"{r['formula_bytes_per_rank'] / 2**20:.2f} |")
    command = " ".join(["python bench/sharded_engines.py", shlex.join(sys.argv[1:] if argv is None else argv)])
    result = {"figure": "sharded_engines", "engine": other, "command": command.strip(), "machine": machine(),
              "ranks": ranks, "device": device, "steps": args.steps, "warmup": args.warmup, "rows": rows}
    tag = "" if other == "fairscale" else f"-{other}"
    write_json(args.out or RESULTS / f"sharded_engines{tag}-{'gpu' if gpus else 'cpu'}.json", result)
    return result


if __name__ == "__main__":
    main()
