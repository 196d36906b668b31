"""`train.compile`: torch.compile of each block (inductor with the C++ compiler on CPU) computes what eager computes.

One device: 10 steps of `loss` and `grad_norm` (and the final `eval_loss`) within 1e-5 of the eager run, plain
and with full activation checkpointing and dropout (compiled blocks draw eager's masks). Checkpoints keep the
model's parameter names: a compiled run resumes as an eager one, and consolidates. The compiled model still
saves less with checkpointing, does not recompile per sequence length, generates (KV cache: eager) and records
attention maps as the eager model does. A missing C++ compiler is refused in one line. Slow (2 ranks): tensor
parallelism (with sequence parallelism and checkpointing; its shards consolidate), ZeRO-2 and ZeRO-3 data
parallelism, a pipeline that sends two float tensors between stages (docs/compile.md).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch

from bench.activation_memory import saved_activation_bytes
from bigtrain.config import load_config
from bigtrain.inference.generate import generate
from bigtrain.models import build_model
from bigtrain.models.inspect import attention_maps
from bigtrain.parallel import parallelize
from bigtrain.parallel.activation_checkpointing import apply_activation_checkpointing
from bigtrain.parallel.compile import CompiledBlock, apply_compile, check_cpp_compiler
from tests.conftest import (
    DP_LAYOUT,
    REPO,
    TINY_MODEL,
    assert_same_curve,
    launch_ok,
    run_cli,
    run_launcher,
    single_process,
    tiny_overrides,
)
from tests.helpers.tensor_generation import lively

STEPS = 10
TOL = 1e-5
# Every run has the 2-rank runs' global batch (DP_LAYOUT: micro-batches of 2), so the one-device eager run is also
# the 2-rank runs' reference, and the blocks' graphs compiled by the first run come from inductor's on-disk cache in
# the later ones (a cold compile costs tens of CPU-seconds per process).
SHORT = (f"train.steps={STEPS}", "checkpoint.every=5", *DP_LAYOUT)
DROPOUT_CHECKPOINTING = ("model.dropout=0.1", "parallel.activation_checkpointing=full")
RELATIVE = ("model.positions=relative", "model.relative_buckets=8", "model.relative_max_distance=16")


def _train(tmp_path_factory, name: str, *extra: str) -> Path:
    run_dir = tmp_path_factory.mktemp(name) / "run"
    single_process(tiny_overrides(run_dir, "causal", *SHORT, *extra))
    return run_dir


@pytest.fixture(scope="module")
def eager(references) -> Path:
    return references[()]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    return _train(tmp_path_factory, "compiled", "train.compile=true")


# --- one device -------------------------------------------------------------------------------------------
@pytest.mark.launches
def test_compiled_matches_eager(eager, compiled):
    assert_same_curve(eager, compiled, TOL, steps=STEPS, eval_rel=TOL)


@pytest.mark.launches
def test_compiled_with_checkpointing_and_dropout_matches_eager(tmp_path_factory):
    """Full activation checkpointing inside the compiled block, dropout 0.1: the same masks as eager."""
    reference = _train(tmp_path_factory, "eager-dropout", *DROPOUT_CHECKPOINTING)
    run = _train(tmp_path_factory, "compiled-dropout", *DROPOUT_CHECKPOINTING, "train.compile=true")
    assert_same_curve(reference, run, TOL, steps=STEPS, eval_rel=TOL)


@pytest.mark.launches
def test_compiled_checkpoint_resumes_eagerly(eager, compiled, tmp_path):
    """Roll a compiled run back to its step-5 checkpoint and resume it with train.compile=false: the parameter
    names fit, and steps 6-10 follow the eager run."""
    run_dir = tmp_path / "run"
    shutil.copytree(compiled, run_dir)
    ckpt = run_dir / "checkpoints"
    shutil.rmtree(ckpt / "step_00000010")
    (ckpt / "latest").write_text("step_00000005\n")
    proc = run_launcher(tiny_overrides(run_dir, "causal", *SHORT, "train.compile=false"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stdout and "(step 5)" in proc.stdout
    assert_same_curve(eager, run_dir, TOL, steps=STEPS, eval_rel=TOL)


@pytest.mark.launches
def test_compiled_run_consolidates_under_model_names(eager, compiled):
    """The compiled run's checkpoint holds the eager run's names; `bigtrain consolidate` reads it."""
    assert _native(compiled).keys() == _native(eager).keys()
    _consolidate(compiled)


def test_parameter_names_structure_and_copies():
    """Compiling changes no state-dict name (with or without checkpointing); the wrapper shows in print(model),
    passes train/eval on, and a deep copy computes with its own weights. Nothing compiles here."""
    for extra in (["parallel.activation_checkpointing=selective"], [], ["parallel.activation_checkpointing=full"]):
        cfg = load_config(None, [*TINY_MODEL, "data.seq_len=32", *extra])
        plain = parallelize(build_model(cfg.model, 64, "meta"), cfg, None, "cpu").model
        cfg.train.compile = True
        model = parallelize(build_model(cfg.model, 64, "meta"), cfg, None, "cpu").model
        assert list(model.state_dict()) == list(plain.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values(),
                                                     strict=True))
        assert all(isinstance(block, CompiledBlock) for block in model.blocks)
    assert "torch.compile of ActivationCheckpoint" in repr(model) and "(self_attn): Attention" in repr(model)
    model.eval()
    block = model.blocks[0]
    assert not (block.training or block.wrapped.training or block.wrapped.wrapped.training or block.ffn.training)
    copied = copy.deepcopy(model)
    assert copied.blocks[0].wrapped is not model.blocks[0].wrapped
    assert copied.blocks[0].ffn is copied.blocks[0].wrapped.ffn  # children still shared with the wrapped block
    with torch.no_grad():
        copied.blocks[0].ffn.up.weight.add_(1.0)
    assert not torch.equal(copied.blocks[0].ffn.up.weight, model.blocks[0].ffn.up.weight)


def test_compiled_model_recompiles_once_generates_and_records_maps():
    """A new sequence length recompiles once (then the length is symbolic); generation (KV cache: eager
    blocks; no cache: compiled) gives the eager model's tokens; attention maps equal eager's."""
    from torch._dynamo.utils import counters

    cfg = load_config(None, ["model.family=causal", *TINY_MODEL, "data.seq_len=32"]).model
    eager = lively(build_model(cfg, 64, "cpu", seed=0)).train()
    model = build_model(cfg, 64, "cpu", seed=0)
    model.load_state_dict(eager.state_dict())
    apply_compile(model, "cpu")
    before = counters["stats"]["unique_graphs"]
    for length in range(9, 14):
        ids = torch.randint(0, 64, (2, length), generator=torch.Generator().manual_seed(length))
        out = model(ids)
        out.sum().backward()
        assert torch.allclose(out, eager(ids), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] - before <= 2  # a static length, then a symbolic one
    prompts = [[5, 17, 33, 2], [40, 41]]
    for use_cache in (True, False):
        assert generate(model, prompts, 6, use_cache=use_cache) == generate(eager, prompts, 6, use_cache=use_cache)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), attention_maps(eager) as expected:
        eager(ids)
    with torch.no_grad(), attention_maps(model) as maps:
        model(ids)
    assert maps.keys() == expected.keys() == {"blocks.0.self_attn", "blocks.1.self_attn"}
    assert all(torch.allclose(maps[k], expected[k], atol=1e-6) for k in maps)


def test_checkpointing_still_saves_memory_when_compiled(capsys):
    """Bytes saved for backward by the compiled model: full checkpointing keeps what eager checkpointing keeps
    (each block's input) plus the CPU generator state per block (to replay dropout), far less than without."""
    seq, batch, d = 64, 2, 32
    cfg = load_config(None, [*TINY_MODEL, f"model.d_ff={4 * d}", f"data.seq_len={seq}"]).model
    ids = torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(0))
    saved = {}
    for mode, compiled in (("none", True), ("full", True), ("full", False)):
        model = build_model(cfg, 64, "cpu", seed=0)
        apply_activation_checkpointing(model, mode)
        if compiled:
            apply_compile(model, "cpu")
            saved_activation_bytes(model, ids)  # compiles
        saved[mode, compiled] = saved_activation_bytes(model, ids)
    print(f"\nsaved for backward: compiled {saved['none', True]} bytes, compiled + full checkpointing "
          f"{saved['full', True]}, eager + full checkpointing {saved['full', False]}")
    assert saved["full", True] < 0.5 * saved["none", True]
    assert saved["full", True] <= saved["full", False] + cfg.n_layers * torch.get_rng_state().numel()


@pytest.mark.launches
def test_missing_cpp_compiler_is_refused_in_one_line(tmp_path, monkeypatch):
    from torch._inductor import config as inductor_config

    from bigtrain.errors import ConfigError

    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "/nonexistent/g++"))
    with pytest.raises(ConfigError, match=r"train\.compile=true .* C\+\+ compiler .* train\.compile=false") as err:
        check_cpp_compiler()
    assert "\n" not in str(err.value)
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    proc = run_launcher(tiny_overrides(tmp_path / "run", "causal", "train.compile=true"))
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "train.compile=false" in lines[0], proc.stderr[-2000:]


# --- two ranks --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[tuple[str, ...], Path]:
    """Eager single-process runs (with the 2-rank runs' global batch, as every run here), by model options."""
    return {options: _train(tmp_path_factory, "reference", *options) for options in [(), RELATIVE]}


@pytest.mark.launches
@pytest.mark.parametrize("extra,options,launcher", [
    (["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.activation_checkpointing=full"], (),
     "torchrun"),
    (["parallel.zero_stage=2"], (), "torchrun"),
    (["parallel.zero_stage=3"], (), "torchrun"),
    (["parallel.pipeline=2"], RELATIVE, "torchrun"),
    (["parallel.engine=fairscale", "parallel.zero_stage=3"], (), "fsdp-on-cpu"),
    (["parallel.engine=torch", "parallel.zero_stage=3"], (), "torchrun"),
], ids=["tp2-sp-checkpointing", "dp2-zero2", "dp2-zero3", "pp2-relative", "dp2-fairscale-fsdp", "dp2-fsdp2"])
def test_compiled_layouts_match_eager(references, tmp_path, extra, options, launcher):
    """10 steps within 1e-5 of the eager single-process run. The pipeline case sends hidden states and the
    relative position bias between stages (DeepSpeed's backward then retains the graph). fairscale's FSDP
    (run on CPU ranks by its test helper) swaps each block's parameters between shards and gathered tensors
    around the compiled forward; FSDP2 registers its gathered parameters on the compiled block for its
    forward and backward."""
    run_dir = tmp_path / "run"
    script = REPO / "tests" / "helpers" / "fsdp_on_cpu.py" if launcher == "fsdp-on-cpu" else None
    launch_ok(2, tiny_overrides(run_dir, "causal", *SHORT, *options, *extra, "train.compile=true"),
              launcher="torchrun" if script else launcher, script=script)
    assert_same_curve(references[options], run_dir, TOL, steps=STEPS, eval_rel=TOL)
    if "parallel.tensor=2" in extra:  # shards consolidate under the model's names
        assert _native(run_dir).keys() == _native(references[options]).keys()
        _consolidate(run_dir)


def _native(run_dir: Path) -> dict[str, torch.Tensor]:
    """The full state dict that the engine's own files of the last checkpoint reassemble to."""
    from bigtrain.checkpoint.consolidate import consolidated_state_dict
    from bigtrain.checkpoint.saved import SavedCheckpoint

    return consolidated_state_dict(SavedCheckpoint.read(run_dir / "checkpoints" / f"step_{STEPS:08d}"))


def _consolidate(run_dir: Path) -> None:
    """`bigtrain consolidate` of the last checkpoint (the layout-free form, without tied copies): every tensor
    equals what the engine's own files reassemble to."""
    proc = run_cli("consolidate", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = torch.load(run_dir / "consolidated" / f"step_{STEPS:08d}" / "model.pt", weights_only=True)
    native = _native(run_dir)
    assert weights and all(torch.equal(value, native[name]) for name, value in weights.items())
