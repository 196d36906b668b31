"""bigtrain's model against a minimal reference GPT (bench/reference_gpt.py) of the same shape, weights, batch and
recipe: training tokens/s of forward + loss + backward + AdamW step, one process, no loop around it.

bigtrain: `build_model` (the config's model, seed train.seed), the summed token loss of `bigtrain.models.loss`
divided by the target count (as the engine does), `build_optimizer` (AdamW, weight decay on matrices only).
reference: the same weights copied into the reference GPT (Q, K, V rows as one [Q; K; V] projection, SDPA with
is_causal, torch's LayerNorm or RMSNorm, the same activation), `F.cross_entropy`, torch's AdamW with the same two
groups, lr, betas, eps and weight decay (fused, as bigtrain's: on this CPU 0.6 ms a step against 2 ms for foreach).
Both see the same batches (random token ids, one fixed pool), the same thread count and, with train.precision=bf16,
the same autocast.

Fairness is checked, not assumed: before timing, both models train `PARITY_STEPS` steps from the same weights on
the same batches and their losses must agree (step 0: same function; later steps: same update rule).

Timing: `--rounds` rounds; in each, both models run `--warmup` untimed then `--steps` timed steps, in alternating
order (bigtrain first in odd rounds, the reference first in even ones, so a drift of the machine hits both alike).
Per-round ratio = bigtrain tokens/s / reference tokens/s; the figure is their median (target ≥ 1.0). Other
processes' share of the CPU is recorded per run (bench/harness.py's ForeignLoad); a round during which they took
more than --max-foreign of it is run again (the result says when disturbed rounds had to fill in).

Run: python bench/model_speed.py [--config configs/smoke.yaml] [--rounds 11 --steps 20 --warmup 3]
     [--threads N] [--device cpu|cuda] [--name NAME] [section.key=value ...]
     writes bench/results/model_speed-NAME.json (NAME default: cpu or the GPU's device type)
"""

from __future__ import annotations

import argparse
import gc
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.harness import RESULTS, ForeignLoad, machine, median, sync, wait_for_quiet, write_json  # noqa: E402
from bench.reference_gpt import ReferenceGPT, unsupported  # noqa: E402

# The shape of issue 26's measurement (4 layers, d_model 128, seq 64, batch 12) with a plain GPT's options;
# the command line's overrides come after these.
SHAPE = ["model.n_layers=4", "model.d_model=128", "model.n_heads=4", "model.d_ff=512", "model.max_seq_len=64",
         "data.seq_len=64", "train.global_batch_size=12", "train.micro_batch_size=12", "model.positions=learned",
         "model.scale_embeddings=false", "model.dropout=0.0", "model.norm_position=pre", "model.activation=gelu"]
PARITY_STEPS = 3

Step = Callable[[int], torch.Tensor]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/smoke.yaml", help="YAML config (its model, optim, batch)")
    parser.add_argument("--rounds", type=int, default=11, help="alternating rounds (each runs both models)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model per round")
    parser.add_argument("--threads", type=int, help="torch threads for both (default: train.threads or torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--wait-quiet", type=float, default=0.0,
                        help="before each round, wait up to this many seconds for other processes to go idle")
    parser.add_argument("--max-foreign", type=float, default=0.1,
                        help="a round during which other processes took more than this share of the machine's CPU "
                             "is run again (at most 2 × --rounds rounds in all)")
    parser.add_argument("--name", help="results name (default: the device type)")
    parser.add_argument("--out", type=Path, help="JSON path (default: bench/results/model_speed-NAME.json)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    for key in ("rounds", "steps"):
        if getattr(args, key) < 1:
            parser.error(f"--{key}={getattr(args, key)} must be at least 1")
    return args


def batches(vocab: int, count: int, batch: int, seq: int, device: torch.device, seed: int
            ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` fixed (input_ids, labels) pairs of random tokens; labels are the inputs shifted by one."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        out.append((ids[:, :-1].contiguous().to(device), ids[:, 1:].contiguous().to(device)))
    return out


def build(cfg: Any, device: torch.device) -> tuple[Step, Step, Any, Any]:
    """The two training steps (step index -> loss, detached) and the two models."""
    from bigtrain.distributed.device import autocast
    from bigtrain.models import build_model, resolve_vocab_size
    from bigtrain.models.loss import cross_entropy_sum
    from bigtrain.optim import build_optimizer

    vocab = resolve_vocab_size(cfg.model, 260)  # the byte tokenizer's size, as configs/smoke.yaml uses
    ours = build_model(cfg.model, vocab, device, seed=cfg.train.seed).train()
    ref = ReferenceGPT(cfg.model, vocab).to(device).train()
    ref.load_from(ours)
    data = batches(vocab, 4, cfg.train.micro_batch_size, cfg.data.seq_len, device, cfg.train.seed)
    o = cfg.optim
    ours_opt = build_optimizer(ours, o)
    decay = [p for p in ref.parameters() if p.ndim >= 2]
    no_decay = [p for p in ref.parameters() if p.ndim < 2]
    ref_opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
    precision = cfg.train.precision

    def ours_step(i: int) -> torch.Tensor:
        ids, labels = data[i % len(data)]
        with autocast(precision, device):
            logits = ours(input_ids=ids)
        loss = cross_entropy_sum(logits, labels) / labels.numel()
        loss.backward()
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)
        return loss.detach()

    def ref_step(i: int) -> torch.Tensor:
        ids, labels = data[i % len(data)]
        with autocast(precision, device):
            logits = ref(ids)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        return loss.detach()

    return ours_step, ref_step, ours, ref


def timed(step: Step, warmup: int, steps: int, device: torch.device, start: int) -> tuple[float, float | None]:
    """(seconds of `steps` steps after `warmup` untimed ones, other processes' CPU share meanwhile)."""
    for i in range(warmup):
        step(start + i)
    sync(device)
    gc.collect()
    with ForeignLoad() as load:
        t0 = time.perf_counter()
        for i in range(steps):
            step(start + warmup + i)
        sync(device)
        seconds = time.perf_counter() - t0
    return seconds, load.share


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    from bigtrain.config import load_config

    cfg = load_config(args.config, [*SHAPE, *args.overrides])
    problems = unsupported(cfg.model) + ([f"train.precision={cfg.train.precision} (allowed: fp32 or bf16)"]
                                         if cfg.train.precision not in ("fp32", "bf16") else [])
    if problems:
        print(f"error: bench/model_speed.py compares bigtrain's model with a plain pre-norm GPT, which cannot "
              f"reproduce {', '.join(problems)}; change these overrides.", file=sys.stderr)
        raise SystemExit(2)
    threads = args.threads or cfg.train.threads
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(args.device)
    ours_step, ref_step, ours, ref = build(cfg, device)

    parity = {"bigtrain": [float(ours_step(i)) for i in range(PARITY_STEPS)],
              "reference": [float(ref_step(i)) for i in range(PARITY_STEPS)]}
    tolerance = 1e-4 if cfg.train.precision == "fp32" else 2e-2
    gaps = [abs(a - b) for a, b in zip(parity["bigtrain"], parity["reference"], strict=True)]
    if max(gaps) > tolerance * max(1.0, abs(parity["reference"][0])):
        raise RuntimeError(f"the two models train differently: losses {parity} (not a like-for-like comparison)")

    tokens = cfg.train.micro_batch_size * cfg.data.seq_len * args.steps
    rounds, disturbed = [], []
    step_no = PARITY_STEPS
    while len(rounds) < args.rounds and len(rounds) + len(disturbed) < 2 * args.rounds:
        if args.wait_quiet > 0:
            wait_for_quiet(args.wait_quiet)
        order = [("bigtrain", ours_step), ("reference", ref_step)]
        run: dict[str, Any] = {"bigtrain_first": len(rounds) % 2 == 0}
        for side, step in order if run["bigtrain_first"] else order[::-1]:
            seconds, share = timed(step, args.warmup, args.steps, device, step_no)
            run[side] = {"tokens_per_s": tokens / seconds, "step_ms": 1e3 * seconds / args.steps,
                         "foreign_cpu_share": share}
        step_no += args.warmup + args.steps
        run["ratio"] = run["bigtrain"]["tokens_per_s"] / run["reference"]["tokens_per_s"]
        busy = max(run[s]["foreign_cpu_share"] or 0.0 for s in ("bigtrain", "reference")) > args.max_foreign
        (disturbed if busy else rounds).append(run)
        print(f"round {len(rounds) + len(disturbed)}: bigtrain {run['bigtrain']['tokens_per_s']:.0f} tokens/s, "
              f"reference {run['reference']['tokens_per_s']:.0f} tokens/s, ratio {run['ratio']:.3f}"
              + (" (other processes busy: not counted, run again)" if busy else ""), flush=True)
    quiet = len(rounds) == args.rounds
    if not quiet:  # the least disturbed rounds fill in, and the result says so
        disturbed.sort(key=lambda r: max(r[s]["foreign_cpu_share"] or 0.0 for s in ("bigtrain", "reference")))
        rounds += disturbed[:args.rounds - len(rounds)]
        print("warning: some rounds ran while other processes were busy; the figure below includes them")

    ratios = [r["ratio"] for r in rounds]
    med = {side: median([r[side]["tokens_per_s"] for r in rounds]) for side in ("bigtrain", "reference")}
    name = args.name or device.type
    print(f"\n{name}: {cfg.train.micro_batch_size}×{cfg.data.seq_len} tokens per step, {args.warmup} warm-up + "
          f"{args.steps} timed steps per run, {args.rounds} alternating rounds, {torch.get_num_threads()} threads")
    print("| model | median tokens/s | median ms/step |\n| --- | --- | --- |")
    for side in ("bigtrain", "reference"):
        ms = median([r[side]["step_ms"] for r in rounds])
        print(f"| {side} | {med[side]:.0f} | {ms:.2f} |")
    print("per-round ratios (bigtrain / reference tokens/s): " + " ".join(f"{x:.3f}" for x in ratios))
    print(f"median ratio {median(ratios):.3f} (target ≥ 1.0)")
    command = "python bench/model_speed.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    result = {"figure": "model speed", "name": name, "command": command, "machine": machine(),
              "device": str(device), "config": args.config, "shape": SHAPE, "overrides": args.overrides,
              "precision": cfg.train.precision, "threads": torch.get_num_threads(),
              "tokens_per_step": cfg.train.micro_batch_size * cfg.data.seq_len, "warmup": args.warmup,
              "steps": args.steps, "parity_losses": parity, "rounds": rounds, "ratios": ratios,
              "quiet": quiet, "disturbed_rounds": disturbed,
              "median_tokens_per_s": med, "median_ratio": median(ratios), "target": 1.0,
              "parameters": sum(p.numel() for p in ref.parameters())}
    write_json(args.out or RESULTS / f"model_speed-{name}.json", result)
    del ours
    return result


if __name__ == "__main__":
    main()
