"""The plain engine's files of an earlier bigtrain, whose attention kept Q, K and V as three parameters
(`q_proj`, `k_proj`, `v_proj`), loaded into today's one `qkv_proj` (`bigtrain.models.qkv`).

The weights join in `Attention`'s state-dict hook. The optimizer file is torch's: its state is keyed by each
parameter's index in the optimizer's groups, so the indices are re-derived from names: today's groups, each
`qkv_proj` tensor expanded into its three parts, give the earlier optimizer's order (same grouping rule: weights
decay, biases do not, so the parts sat where the joined tensor sits). A joined parameter's moments are its parts'
moments joined in the same row layout (Adam's moments are per element, so this is exact); its step is theirs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bigtrain.models.attention import Attention
from bigtrain.models.qkv import QKV_PARTS, join_qkv


def join_optimizer_state(saved: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
                         ) -> dict[str, Any]:
    """torch's optimizer state dict `saved` (written for the three-parameter model) for `optimizer` over `model`."""
    names = {id(p): n for n, p in model.named_parameters()}
    old_index: dict[str, int] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            prefix, _, kind = name.rpartition("qkv_proj.")
            parts = [f"{prefix}{part}.{kind}" for part in QKV_PARTS] if name.endswith(("qkv_proj.weight",
                                                                                      "qkv_proj.bias")) else [name]
            for part in parts:
                old_index[part] = len(old_index)
    state: dict[int, dict[str, Any]] = {}
    groups = []
    index = 0
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        new_ids = []
        for p in group["params"]:
            name = names[id(p)]
            if "qkv_proj." in name:
                attn = model.get_submodule(name.rpartition(".qkv_proj.")[0])
                assert isinstance(attn, Attention)
                prefix, _, kind = name.rpartition("qkv_proj.")
                parts = [saved["state"].get(old_index[f"{prefix}{part}.{kind}"]) for part in QKV_PARTS]
                if all(s is not None for s in parts):
                    state[index] = {key: join_qkv(*(s[key] for s in parts), attn.head_dim, attn.groups)
                                    if torch.is_tensor(value) and value.dim() > 0 else value
                                    for key, value in parts[0].items()}
            elif old_index[name] in saved["state"]:
                state[index] = saved["state"][old_index[name]]
            new_ids.append(index)
            index += 1
        groups.append({**saved_group, "params": new_ids})
    return {"state": state, "param_groups": groups}
