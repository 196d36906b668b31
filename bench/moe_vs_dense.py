"""A mixture of experts against the dense model of the same active parameters, at equal steps (issue 29).

Both train on one process from the same config (configs/smoke.yaml: its embedded corpus, byte tokenizer, seed,
optimizer, schedule and held-out set; the smaller model and batch of MODEL unless overridden), each its own run of
launch/train.py. The MoE replaces every block's
feed-forward (width F, the model's d_ff) by E experts of width F / k and a router sending each token to k of them,
so a token passes through k · F / k = F hidden units either way:

    dense FFN parameters per block   2·d·F (+ biases; SwiGLU: 3·d·F)
    MoE   FFN parameters per block   E · 2·d·(F/k)   = E/k times the dense block's (all experts)
    active per token                 k · 2·d·(F/k)   = 2·d·F, the dense block's, + the router's d·E

The table states both models' parameters, their active (matmul) parameters and training FLOPs per token
(`bigtrain.planning.flops`, the numbers of `bigtrain plan`), and the eval loss each reaches after the same steps
(mean token loss over the same `train.eval_samples` held-out sequences). The MoE is dropless, with the
load-balancing loss at model.moe.aux_loss_coef (default 0.01).

Run: python bench/moe_vs_dense.py [--config configs/smoke.yaml] [--experts 8] [--top-k 2] [--steps 300]
                                   [overrides ...]     writes bench/results/moe_vs_dense.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import REPO, RESULTS, machine, write_json  # noqa: E402
from bigtrain.config import Config, load_config  # noqa: E402

# The default model (before the command line's overrides): smaller than the smoke model so that both runs take
# minutes on a 2-core CPU; the smoke corpus, batch of 16 sequences of 64 bytes.
MODEL = ["model.d_model=128", "model.n_layers=2", "model.n_heads=4", "model.d_ff=512", "model.max_seq_len=64",
         "data.seq_len=64", "train.global_batch_size=16", "train.micro_batch_size=16", "train.threads=2"]
# The timing-free settings every run gets: no periodic evaluation (only the one after the last step), checkpoint
# or sample, a fresh start.
QUIET = ["train.eval_every=0", "checkpoint.every=0", "train.sample_tokens=0", "checkpoint.resume=false",
         "log.tensorboard=false"]


def moe_overrides(cfg: Config, experts: int, top_k: int) -> list[str]:
    """The overrides that turn the dense `cfg` into the MoE of the same active feed-forward parameters: every block
    an MoE block of `experts` experts of width d_ff / top_k, top_k per token, dropless."""
    d_ff = cfg.model.d_ff
    if d_ff % top_k:
        raise SystemExit(f"model.d_ff={d_ff} does not split into top_k={top_k} experts' widths; choose a d_ff that "
                         f"top_k divides")
    return [f"model.moe.experts={experts}", f"model.moe.top_k={top_k}", f"model.moe.d_ff={d_ff // top_k}",
            "model.moe.every=1", "model.moe.shared_experts=0", "model.moe.capacity_factor=0.0"]


def sizes(cfg: Config) -> dict[str, float]:
    """Parameters, active (matmul) parameters and training FLOPs per token of `cfg`'s model (built on meta)."""
    from bigtrain.data.tokenizer import build_tokenizer
    from bigtrain.models.build import build_model, count_parameters, resolve_vocab_size
    from bigtrain.planning.flops import flops_per_token, matmul_parameters

    vocab = resolve_vocab_size(cfg.model, build_tokenizer(cfg.data).vocab_size)
    model = build_model(cfg.model, vocab, "meta")
    return {"parameters": count_parameters(model), "active_matmul_parameters": matmul_parameters(model),
            "flops_per_token": flops_per_token(model, cfg.data.seq_len)}


def train(name: str, config: str, overrides: list[str], run_dir: Path, timeout: float) -> dict[str, Any]:
    """One run of launch/train.py; its last evaluation and training line, and its wall-clock seconds."""
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", config, *overrides, f"run.dir={run_dir}"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        raise SystemExit(f"the {name} run took more than --timeout {timeout:.0f} s (a loaded CPU?); give a larger "
                         f"--timeout or fewer --steps:\n{shlex.join(cmd)}") from None
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"the {name} run failed:\n{shlex.join(cmd)}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in records if "eval_loss" in r][-1]
    last_train = [r for r in records if "loss" in r][-1]
    print(f"{name}: eval loss {last_eval['eval_loss']:.4f} after {last_eval['step']} steps ({seconds:.0f} s)",
          flush=True)
    return {"eval_loss": last_eval["eval_loss"], "eval_step": last_eval["step"],
            "eval_tokens": last_eval["eval_tokens"], "train_loss": last_train["loss"], "seconds": seconds,
            **({"moe_aux_loss": last_train["moe_aux_loss"]} if "moe_aux_loss" in last_train else {})}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/smoke.yaml", help="the dense model and the training setup")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300, help="train.steps of both runs")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--out", type=Path, default=RESULTS / "moe_vs_dense.json")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="applied to both runs, after the config and MODEL")
    args = parser.parse_args(argv)
    config = args.config if Path(args.config).exists() else str(REPO / args.config)  # a repository path, anywhere
    common = [*QUIET, *MODEL, *args.overrides, f"train.steps={args.steps}"]
    dense_cfg = load_config(config, common)
    moe = moe_overrides(dense_cfg, args.experts, args.top_k)
    configs = {"dense": dense_cfg, "moe": load_config(config, [*common, *moe])}
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bigtrain-moe-vs-dense-") as tmp:
        for name, extra in (("dense", []), ("moe", moe)):
            runs[name] = {**sizes(configs[name]), **train(name, config, [*common, *extra], Path(tmp) / name,
                                                          args.timeout)}
    steps = dense_cfg.train.steps
    print(f"\n{'model':<28} {'parameters':>11} {'active':>9} {'FLOPs/token':>12} {'eval loss':>10}")
    for name, label in (("dense", f"dense (d_ff {dense_cfg.model.d_ff})"),
                        ("moe", f"MoE {args.experts}x{args.top_k} (expert d_ff {dense_cfg.model.d_ff // args.top_k})")):
        r = runs[name]
        print(f"{label:<28} {r['parameters']:>11,} {r['active_matmul_parameters']:>9,} {r['flops_per_token']:>12.3g} "
              f"{r['eval_loss']:>10.4f}")
    margin = runs["dense"]["eval_loss"] - runs["moe"]["eval_loss"]
    print(f"after {steps} steps: the MoE's eval loss is {margin:+.4f} nats/token below the dense model's")
    result = {"figure": "moe_vs_dense", "command": " ".join(["python bench/moe_vs_dense.py", shlex.join(
        sys.argv[1:] if argv is None else argv)]).strip(), "machine": machine(), "config": args.config,
        "overrides": common, "moe_overrides": moe, "experts": args.experts, "top_k": args.top_k, "steps": steps,
        "tokens_per_step": dense_cfg.train.global_batch_size * dense_cfg.data.seq_len, "runs": runs,
        "dense_minus_moe_eval_loss": margin}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
