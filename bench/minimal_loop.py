"""The reference of bench/step_overhead.py: a minimal hand-written PyTorch training loop of the same model, data,
batch and optimizer as a bigtrain config (one process, no parallelism).

    batch = torch.stack of the dataset's samples (its own shuffled order)
    logits = model(input_ids); loss = cross_entropy(...) / micro-batches; loss.backward()   (per micro-batch)
    clip_grad_norm_; optimizer.step(); optimizer.zero_grad()
    every log.every steps: print the loss (loss.item())

Model (bigtrain's build_model, same seed), torch's fused AdamW (bigtrain's choice too) with the same two parameter
groups (weight decay on matrices only), learning-rate schedule, gradient clipping, precision and regional
compilation as the config.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
import torch.nn.functional as F

from bench.harness import StepTimes, sync
from bigtrain.config import Config


def _stack(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def minimal_loop(cfg: Config, warmup: int, steps: int) -> StepTimes:
    """Train `warmup` + `steps` steps; time the last `steps` (entry to entry of each step, as run_trainer)."""
    from bigtrain.data import build_datasets, build_tokenizer
    from bigtrain.data.collate import collate
    from bigtrain.distributed.device import resolve_device
    from bigtrain.models import build_model, resolve_vocab_size
    from bigtrain.optim import build_schedule

    t, o = cfg.train, cfg.optim
    if o.name != "adamw":
        raise SystemExit(f"the minimal loop runs AdamW only; the config has optim.name={o.name}")
    if t.threads is not None:
        torch.set_num_threads(t.threads)
    device = resolve_device(t)
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(cfg.data)
    train_set, _ = build_datasets(cfg, tokenizer)
    model = build_model(cfg.model, resolve_vocab_size(cfg.model, tokenizer.vocab_size), device, seed=t.seed)
    model.train()
    if t.compile:
        for stack in model.stacks():
            for block in stack:
                block.compile()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
    lr_at = build_schedule(cfg.schedule, o.lr, t.steps, cfg.model.d_model)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
    amp = (lambda: torch.autocast(device.type, dtype=half)) if half else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type) if t.precision == "fp16" else None
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(t.seed)).tolist()
    causal = cfg.model.family == "causal"

    def batch_at(step: int) -> list[dict[str, torch.Tensor]]:
        first = step * t.global_batch_size
        idx = [order[(first + i) % len(order)] for i in range(t.global_batch_size)]
        out = []
        for s in range(0, len(idx), t.micro_batch_size):
            samples = [train_set[i] for i in idx[s:s + t.micro_batch_size]]
            b = _stack(samples) if causal else collate(samples, cfg.model.family, tokenizer.pad_id)
            out.append({k: v.to(device, non_blocking=True) for k, v in b.items()})
        return out

    out = StepTimes(build_s=time.perf_counter() - t0)
    last = 0.0
    with open(os.devnull, "w") as log:
        for step in range(warmup + steps + 1):
            if step in (warmup, warmup + steps):
                sync(device)
            now = time.perf_counter()
            if step > warmup:
                out.step_s.append(now - last)
            last = now
            if step == warmup + steps:
                break
            batches = batch_at(step)
            started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step + 1)
            total = torch.zeros((), device=device)
            for b in batches:
                with amp():
                    logits = model(**{k: v for k, v in b.items() if k != "labels"})
                loss = F.cross_entropy(logits.flatten(0, -2).float(), b["labels"].flatten()) / len(batches)
                (scaler.scale(loss) if scaler else loss).backward()
                total += loss.detach()
            if scaler:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip if o.grad_clip > 0 else float("inf"))
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= warmup:
                out.engine_s.append(time.perf_counter() - started)
                out.tokens_per_step = sum(b["input_ids"].numel() for b in batches)
            if (step + 1) % cfg.log.every == 0:
                print(f"step {step + 1} loss {total.item():.4f}", file=log, flush=True)
    return out
