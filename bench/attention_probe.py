"""Which scaled-dot-product-attention kernel a config's attention runs: a one-block copy of the model (same width,
heads, sequence length, precision, device) takes one forward and backward under the profiler, and the SDPA
kernels it called are read from the recorded operators. The dispatch depends only on those (dtype, head size,
mask, device), not on depth. The probe runs eagerly; a compiled block calls the same fused kernel."""

from __future__ import annotations

import dataclasses

import torch

from bigtrain.config import Config

# aten operator -> backend, most specific first.
KERNELS = {
    "_scaled_dot_product_flash_attention_for_cpu": "flash (CPU kernel)",
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_efficient_attention": "memory-efficient",
    "_scaled_dot_product_cudnn_attention": "cuDNN",
    "_scaled_dot_product_fused_attention_overrideable": "fused (device-specific)",
    "_scaled_dot_product_attention_math": "math (unfused)",
}


def attention_backend(cfg: Config, device: torch.device, vocab: int) -> dict[str, object]:
    """{"backend": what ran, "operators": the SDPA operators seen, and on CUDA which backends are enabled}."""
    from bigtrain.distributed.device import autocast
    from bigtrain.models import build_model

    model_cfg = dataclasses.replace(cfg.model, n_layers=1, n_decoder_layers=1 if cfg.model.family == "seq2seq"
                                    else cfg.model.n_decoder_layers)
    model = build_model(model_cfg, vocab, device, seed=0).train()
    seq = cfg.data.seq_len
    ids = torch.randint(0, min(vocab, 256), (1, seq), device=device)
    inputs = {"input_ids": ids}
    if cfg.model.family == "seq2seq":
        inputs["decoder_input_ids"] = ids
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        with autocast(cfg.train.precision, device):
            logits = model(**inputs)
        logits.float().sum().backward()
    names = {e.name.removeprefix("aten::") for e in prof.events()}
    seen = [op for op in KERNELS if op in names]
    out: dict[str, object] = {"backend": KERNELS[seen[0]] if seen else "none seen (attention not through SDPA?)",
                              "operators": seen, "probe": f"1 block, batch 1 x {seq} tokens, {cfg.train.precision}"}
    if device.type == "cuda":
        b = torch.backends.cuda
        out["enabled"] = {"flash": b.flash_sdp_enabled(), "mem_efficient": b.mem_efficient_sdp_enabled(),
                          "cudnn": b.cudnn_sdp_enabled(), "math": b.math_sdp_enabled()}
    return out
