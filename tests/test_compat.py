"""What depends on the installed torch and DeepSpeed (bigtrain/compat/): every DeepSpeed internal bigtrain uses
exists in the installed release, and the code paths for older torch releases compute what the new APIs do."""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import re

import pytest
import torch

from bigtrain.compat import deepspeed as ds_compat
from bigtrain.compat import torch as torch_compat
from tests.conftest import REPO


def test_every_deepspeed_internal_bigtrain_uses_exists():
    missing = ds_compat.missing_internals()
    assert not missing, (f"DeepSpeed {importlib.metadata.version('deepspeed')} lacks internals bigtrain uses "
                         f"(see bigtrain/compat/deepspeed.py):\n" + "\n".join(missing))


def test_the_check_names_a_missing_internal():
    renamed = [dataclasses.replace(item, name=item.name + "_renamed") for item in ds_compat.INTERNALS]
    assert not any(item.present() for item in renamed if item.kind != "argument")
    gone = dataclasses.replace(ds_compat.INTERNALS[0], name="partition_of_fp32_groups_v2")
    assert "DeepSpeedZeroOptimizer: instance 'partition_of_fp32_groups_v2'" in gone.describe()


def test_installed_deepspeed_is_the_pinned_minor_release():
    """pyproject.toml pins DeepSpeed to the minor release the internals were read from."""
    pin = re.search(r'"deepspeed>=([\d.]+),<([\d.]+)"', (REPO / "pyproject.toml").read_text())
    assert pin, "pyproject.toml must pin deepspeed as >=X.Y,<X.Y+1"
    assert pin.group(1) == ds_compat.TESTED
    installed = importlib.metadata.version("deepspeed")
    assert installed.startswith(ds_compat.TESTED + "."), installed


def _attributes_used(path) -> set[str]:
    """Attribute names the code of `path` reads or writes: `x.name`, and getattr/hasattr/setattr(x, "name")."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr"):
            names |= {a.value for a in node.args[1:2] if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    return names


def test_no_deepspeed_private_attribute_outside_compat():
    """The code touches DeepSpeed's private attributes only in bigtrain/compat/deepspeed.py."""
    private = {item.name for item in ds_compat.INTERNALS if item.kind != "argument"}
    for path in (REPO / "bigtrain").rglob("*.py"):
        if path == REPO / "bigtrain" / "compat" / "deepspeed.py":
            continue
        used = sorted(_attributes_used(path) & private)
        assert not used, f"{path.relative_to(REPO)} uses DeepSpeed internals {used}: go through bigtrain.compat"
    assert {"single_partition_of_fp32_groups", "ds_tensor"} <= _attributes_used(
        REPO / "bigtrain" / "compat" / "deepspeed.py")


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_grouped_query_attention_without_enable_gqa(monkeypatch, kv_heads):
    """Older torch has no `enable_gqa`: repeating the key/value heads gives the same attention."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=gen)
    k, v = torch.randn(2, kv_heads, 5, 8, generator=gen), torch.randn(2, kv_heads, 5, 8, generator=gen)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    native = torch_compat.sdpa(q, k, v, mask, 0.0, is_causal=False)
    monkeypatch.setattr(torch_compat, "SDPA_HAS_GQA", False)
    fallback = torch_compat.sdpa(q, k, v, mask, 0.0, is_causal=False)
    torch.testing.assert_close(fallback, native, rtol=1e-6, atol=1e-6)
