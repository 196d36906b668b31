"""Wall-clock figures that tests do not assert (a shared 2-core machine makes timed pass/fail tests flaky):

    smoke            `make smoke`: seconds of training for configs/smoke.yaml (target: under 180 s on a 2-core
                     CPU), tokens/s, and the held-out loss it reaches (the test asserts <= 2.3)
    failing rank     a 2-rank job (ZeRO-2, tiny model) whose rank 1 raises at step 2: seconds from launch until
                     the launcher exits non-zero, under torchrun and under DeepSpeed's launcher (target: 60 s)
    half-set env     `launch/train.py` with RANK/WORLD_SIZE/MASTER_ADDR but no MASTER_PORT: seconds until it
                     exits 2 (target: 30 s)

Run: python bench/wallclock.py [--skip-smoke] [--out bench/results/wallclock.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bigtrain.distributed.rendezvous import free_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=64", "model.dropout=0.0",
        "model.max_seq_len=64", "data.max_bytes=300000", "data.seq_len=32", "train.steps=20",
        "train.global_batch_size=8", "train.micro_batch_size=2", "train.eval_every=0", "train.eval_samples=8",
        "train.sample_tokens=0", "train.threads=1", "checkpoint.every=0", "log.tensorboard=false",
        "parallel.zero_stage=2"]


def _timed(cmd: list[str], env: dict[str, str], timeout: float = 600) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    return time.perf_counter() - start, proc


def smoke(tmp: Path) -> dict:
    run_dir = tmp / "smoke"
    _, proc = _timed([sys.executable, "launch/train.py", "--config", "configs/smoke.yaml", f"run.dir={run_dir}",
                      f"data.cache_dir={tmp / 'cache'}"], {**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode:
        raise SystemExit(f"smoke run failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    training = [r for r in records if "loss" in r]
    seconds = training[-1]["elapsed_s"]
    return {"figure": "smoke training", "seconds": seconds, "target_s": 180,
            "tokens_per_s": training[-1]["tokens"] / seconds,
            "eval_loss": [r for r in records if "eval_loss" in r][-1]["eval_loss"]}


def failing_rank(tmp: Path, launcher: str) -> dict:
    port = str(free_port())
    script = str(REPO / "tests" / "helpers" / "failing_rank.py")
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}"]
    else:
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "BIGTRAIN_TEST_FAIL_RANK": "1"}
    seconds, proc = _timed([*cmd, script, *TINY, f"data.cache_dir={tmp / 'cache'}",
                            f"run.dir={tmp / launcher}"], env)
    if proc.returncode == 0 or "injected failure" not in proc.stdout + proc.stderr:
        raise SystemExit(f"the failing-rank job under {launcher} did not fail as injected:\n{proc.stderr[-3000:]}")
    return {"figure": f"failing rank ends the job ({launcher})", "seconds": seconds, "target_s": 60}


def half_set_env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "OMPI_", "MV2_", "PMIX_"))}
    env.update(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    env.pop("MASTER_PORT", None)
    seconds, proc = _timed([sys.executable, "launch/train.py", f"run.dir={tmp / 'half'}"], env)
    if proc.returncode != 2:
        raise SystemExit(f"expected exit status 2, got {proc.returncode}:\n{proc.stderr[-2000:]}")
    return {"figure": "half-set environment refused", "seconds": seconds, "target_s": 30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-smoke", action="store_true", help="leave out the ~2-minute smoke run")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "wallclock.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bigtrain-wallclock-") as name:
        tmp = Path(name)
        rows = [half_set_env(tmp), failing_rank(tmp, "torchrun"), failing_rank(tmp, "deepspeed")]
        if not args.skip_smoke:
            rows.append(smoke(tmp))
    print(f"{'figure':<42} {'seconds':>8} {'target':>8}  note")
    for r in rows:
        note = (f"{r['tokens_per_s']:.0f} tokens/s, eval_loss {r['eval_loss']:.3f}" if "eval_loss" in r else "")
        verdict = "ok" if r["seconds"] <= r["target_s"] else "OVER TARGET"
        print(f"{r['figure']:<42} {r['seconds']:8.1f} {r['target_s']:8.0f}  {verdict} {note}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "platform": sys.platform, "python": sys.version.split()[0]}
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
