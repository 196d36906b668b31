"""`bigtrain parity --locate` (issue 31, items 1 and 2): fingerprints add up over any cut of a tensor, and for each
bug of the fault suite (`tests/helpers/planted_faults.py`) the comparison names the planted module and phase.
"No divergence" on correct layouts is checked where `bigtrain parity` runs them (tests/test_parity_command.py), and
for context parallelism here (two correct layouts against the suite's reference), where the context ranks' zig-zag
shares of the sequence are also rebuilt without a launch.

The launched part records step 1 of one one-device run and of one layout run per fault, all of the
same tiny model (LAMB), and compares each fault's run with its reference in this process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigtrain.cli.launching import child_env, torchrun
from bigtrain.cli.parity import check_runs
from bigtrain.cli.parity_locate import Located, locate, locate_report, whole_activation
from bigtrain.cli.parity_tensors import join_activation
from bigtrain.errors import ConfigError
from bigtrain.parallel.context.sharding import shard_sequence
from bigtrain.train.capture import CAPTURE_ENV, TENSOR_ENV, capture_step, capture_tensor
from bigtrain.train.fingerprint import activation_prints, add, difference, piece_print
from tests.conftest import REPO

CONFIG = REPO / "configs" / "smoke.yaml"
FAULTS = REPO / "tests" / "helpers" / "planted_faults.py"
# One model for every layout of the suite (2 layers, 4 heads: TP=2, PP=2, SP=2 all split it), so that one
# reference serves every fault with the same optimizer; 2 micro-batches of 4 on one device.
MODEL = ["model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=null", "model.d_model=64", "model.d_ff=128",
         "model.max_seq_len=64", "data.seq_len=32", "model.vocab_size=null", "model.vocab_multiple=128",
         "data.source=embedded", "data.tokenizer=byte", "train.global_batch_size=8", "train.micro_batch_size=4",
         "data.max_bytes=300000", "optim.name=lamb"]  # LAMB for all: one reference, and its fault among them

# fault: (layout, extra overrides, the module named must contain, the phase)
SUITE = {
    "sp_norm_grad": ("tensor=2,sequence_parallel=true", [], "norm", "gradient"),
    "vocab_ce_scale": ("tensor=2", [], "head", "backward"),
    "qkv_shard": ("tensor=2", [], "qkv_proj", "weight"),
    "skip_reduce": ("data=2,zero_stage=2", [], "", "gradient"),
    "pipeline_order": ("pipeline=2", [], "embed", "forward"),
    "rotary_offset": ("tensor=2", [], "rotary", "forward"),
    "rotary_context_offset": ("context=2", [], "rotary", "forward"),
    "lamb_shard": ("data=2,zero_stage=1", [], "", "update"),
    "loss_denominator": ("data=2", [], "head", "backward"),
}
# correct context-parallel layouts, which must say "no divergence": ring, and Ulysses with every cut of the tensor
# ranks inside the context shares (features, heads, the sequence-parallel regions)
CORRECT = ("context=2", "context=2,context_attention=ulysses,tensor=2,sequence_parallel=true")


# ---- fingerprints (no launch) ---------------------------------------------------------------------------------
def test_piece_prints_add_up_to_the_whole_tensor():
    """Any cut into boxes and flat ranges gives the whole tensor's fingerprint; a permutation does not."""
    full = torch.randn(6, 8, dtype=torch.float64)
    whole = piece_print(full.reshape(-1), ((0, 6), (0, 8)), 0, 48)
    rows = [piece_print(full[3 * r:3 * r + 3].reshape(-1), ((3 * r, 3 * r + 3), (0, 8)), 0, 24) for r in (0, 1)]
    cols = [piece_print(full[:, 4 * c:4 * c + 4].reshape(-1)[a:b], ((0, 6), (4 * c, 4 * c + 4)), a, b)
            for c in (0, 1) for a, b in ((0, 10), (10, 24))]
    for parts in (rows, cols):
        total = parts[0]
        for p in parts[1:]:
            total = add(total, p)
        assert difference(whole, total) < 1e-12
    swapped = torch.cat([full[3:], full[:3]]).reshape(-1)
    assert difference(whole, piece_print(swapped, ((0, 6), (0, 8)), 0, 48)) > 1e-3


@pytest.mark.parametrize("dim", [None, -1, -2, 1])
def test_activation_cuts_are_rebuilt(dim):
    """Tensor ranks holding an activation whole, or cut along the features, the sequence or the heads."""
    full = torch.randn(2, 4, 6, 8)
    shape = list(full.shape)
    parts = [full] * 2 if dim is None else list(full.chunk(2, dim=dim))
    records = [({"pipe": 0, "data": 0, "tensor": r, "tensor_size": 2},
                {"shape": list(p.shape), "prints": activation_prints(p, r)}) for r, p in enumerate(parts)]
    rebuilt = whole_activation(records, shape)
    assert rebuilt is not None and difference(activation_prints(full, 0)["whole"], rebuilt) < 1e-12
    if dim in (-1, -2):  # the shards in each other's place: the positional checksums see it
        swapped = [(meta, {"shape": r["shape"], "prints": activation_prints(parts[1 - i], i)})
                   for i, (meta, r) in enumerate(records)]
        assert difference(activation_prints(full, 0)["whole"], whole_activation(swapped, shape)) > 1e-3


# (cut, T): how the tensor ranks hold each context rank's share of a [batch, heads, seq, head_dim] activation
CONTEXT_CUTS = [("whole", 1), ("whole", 2), ("features", 2), ("heads", 2), ("sequence", 2)]
CUT_DIMS = {"whole": None, "features": -1, "heads": 1, "sequence": -2}


def _context_ranks(full: torch.Tensor, cut: str, tensor_size: int, context: int = 2, swap: bool = False
                   ) -> list[tuple[int, int, torch.Tensor]]:
    """(context rank, tensor rank, what it holds) of `full` split over C context ranks (zig-zag) and T tensor
    ranks; `swap`: context rank 0 holds its two chunks in each other's place."""
    out = []
    for c in range(context):
        share = shard_sequence(full, context, c, dim=2)
        if swap and c == 0:
            share = torch.cat(share.chunk(2, dim=2)[::-1], dim=2)
        dim = CUT_DIMS[cut]
        parts = [share] * tensor_size if dim is None else share.chunk(tensor_size, dim=dim)
        out += [(c, t, part) for t, part in enumerate(parts)]
    return out


@pytest.mark.parametrize("cut,tensor_size", CONTEXT_CUTS)
def test_context_parallel_shares_are_rebuilt(cut, tensor_size):
    """Context ranks' zig-zag shares of the sequence (each perhaps cut again over the tensor ranks) add up to the
    whole activation's fingerprint and are put back into the whole tensor; chunks in each other's place are
    seen by the positional checksums."""
    full = torch.randn(2, 4, 16, 8, dtype=torch.float64)
    reference = activation_prints(full, 0)["whole"]

    def prints(swap: bool) -> list[float] | None:
        return whole_activation([({"pipe": 0, "data": 0, "tensor": t, "tensor_size": tensor_size, "context": c,
                                   "context_size": 2}, {"shape": list(part.shape),
                                                        "prints": activation_prints(part, t, tensor_size, c, 2)})
                                 for c, t, part in _context_ranks(full, cut, tensor_size, swap=swap)], list(full.shape))

    rebuilt = prints(False)
    assert rebuilt is not None and difference(reference, rebuilt) < 1e-12
    assert difference(reference, prints(True)) > 1e-3
    ranks = [{"pipe": 0, "data": 0, "tensor": t, "context": c, "context_size": 2, "wanted": ["forward", "x", 0],
              "backward_scale": 1.0, "tensors": [{"data": part}]} for c, t, part in _context_ranks(full, cut,
                                                                                                  tensor_size)]
    assert torch.equal(join_activation(ranks, list(full.shape)), full)


# ---- the fault suite (launches) -------------------------------------------------------------------------------
def _record(run_dir: Path, layout: str, extra: list[str], fault: str | None = None) -> None:
    """Step 1 of the layout (or, with layout None, of one device) recorded into run_dir/capture."""
    runs = check_runs(CONFIG, layout or "tensor=1", 1, False, "fp32", [*MODEL, *extra])
    start = torchrun(runs.ranks) if layout else [sys.executable]
    overrides = runs.layout if layout else runs.reference
    env = {**child_env(), CAPTURE_ENV: "1", "BIGTRAIN_FAULT": fault or ""}
    proc = subprocess.run([*start, str(FAULTS), "--config", str(CONFIG), *overrides, f"run.dir={run_dir}"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.launches
def test_locate_names_each_planted_bug(tmp_path):
    """Each fault in one layout run of 1 step against the one one-device reference, and the correct
    context-parallel layouts against it too (no divergence: the zig-zag shares are rebuilt); the table of what
    --locate printed first, and the largest difference of each correct layout, are shown with `pytest -s`."""
    _record(tmp_path / "reference", None, [])
    table, wrong = [], []
    for fault, (layout, extra, module, phase) in SUITE.items():
        _record(tmp_path / fault, layout, extra, fault)
        found: Located = locate(tmp_path / "reference", tmp_path / fault, 1e-4)
        first = found.differences[0] if found.diverged else None
        table.append(f"| {fault} | {layout} | {first.describe() if first else 'no divergence'} |")
        if first is None or module not in first.key[1] or first.key[0] != phase:
            wrong.append(f"{fault}: expected {module or 'any module'} / {phase}, got:\n{locate_report(found)}")
    for number, layout in enumerate(CORRECT):
        _record(tmp_path / f"correct{number}", layout, [])
        found = locate(tmp_path / "reference", tmp_path / f"correct{number}", 1e-4)
        table.append(f"| (correct) | {layout} | {locate_report(found)} |")
        if found.diverged:
            wrong.append(f"correct {layout}: expected no divergence, got:\n{locate_report(found)}")
    print("\n".join(table))
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("variable,value,message", [
    (CAPTURE_ENV, "0", "BIGTRAIN_CAPTURE_STEP='0': give the 1-based step to record"),
    (CAPTURE_ENV, "one", "BIGTRAIN_CAPTURE_STEP='one': give the 1-based step to record"),
    (TENSOR_ENV, "forward blocks.0", "BIGTRAIN_CAPTURE_TENSOR='forward blocks.0': give 'PHASE NAME MICRO'"),
])
def test_a_bad_capture_switch_is_named(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=re.escape(message)):
        capture_step() if variable == CAPTURE_ENV else capture_tensor()

