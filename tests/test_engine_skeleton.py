"""Every engine runs the one step skeleton (`bigtrain/engine/step.py`), and host values never meet a device group.

- Each engine class is a `StepEngine` that supplies hooks (its wrap, backward, optimizer, state and files) and
  leaves the skeleton's own methods alone: the micro-batch loop, the counts, the non-finite decision and the
  result are written once.
- The process groups of a run whose default backend is a device one (NCCL) give host values gloo twins; the
  skeleton sums token counts on the host data group, and the stop signals and checkpoint barriers use the host
  world group (here in a one-rank gloo world, as `on_gpu=True` builds it).
"""

from __future__ import annotations

import importlib
import signal

import pytest
import torch
import torch.distributed as dist

from bigtrain.config.layout import Layout
from bigtrain.distributed.groups import ParallelGroups
from bigtrain.distributed.rendezvous import free_port
from bigtrain.engine.build import ENGINE_CLASSES
from bigtrain.engine.step import StepEngine
from bigtrain.train.preemption import StopRequest

SKELETON = ("train_step", "decide", "world_check", "global_counts", "sum_over_data", "router_loss", "router_report")
HOOKS = {"forward", "backward", "update", "micro_batch", "gradients_done", "measure_norm", "layer_norms",
         "reported_norm", "update_skipped", "run_schedule", "evaluate", "evaluate_sums", "sharded_state",
         "write_native", "read_native", "memory_report", "describe", "autocast"}


def _engine_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("engine", sorted(ENGINE_CLASSES))
def test_every_engine_supplies_hooks_and_runs_the_one_skeleton(engine):
    cls = _engine_class(ENGINE_CLASSES[engine])
    assert issubclass(cls, StepEngine)
    for name in SKELETON:
        assert getattr(cls, name) is getattr(StepEngine, name), f"{cls.__name__} writes its own {name}"
    defined = {name for klass in cls.__mro__ if klass is not StepEngine and issubclass(klass, StepEngine)
               for name, value in vars(klass).items() if callable(value) and not name.startswith("_")}
    assert defined <= HOOKS, f"{cls.__name__} defines {sorted(defined - HOOKS)} beyond the skeleton's hooks"
    # its wrap, backward and optimizer (or a schedule that runs them: DeepSpeed's pipeline), its state and files
    step = {"run_schedule"} if "run_schedule" in defined else {"forward", "backward", "update"}
    missing = (step | {"sharded_state", "write_native", "read_native"}) - defined
    assert not missing, f"{cls.__name__} lacks {sorted(missing)}"


@pytest.fixture
def gloo_world():
    """A one-rank gloo world: enough to build every group of a layout."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_host_values_go_over_gloo_twins_of_the_device_groups(gloo_world, monkeypatch):
    groups = ParallelGroups(Layout(engine="deepspeed"), 0, on_gpu=True)
    assert groups.host_data is not groups.data_group and groups.host_world is not None
    assert dist.get_backend(groups.host_data) == "gloo" and dist.get_backend(groups.host_world) == "gloo"
    seen = []
    reduce = dist.all_reduce

    def recording(tensor, *args, group=None, **kwargs):
        seen.append((tensor.device.type, group))
        return reduce(tensor, *args, group=group, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", recording)
    engine = StepEngine()
    engine.groups, engine.layout = groups, groups.layout
    assert engine.global_counts([], (7, 11)) == (7, 11)
    stop = StopRequest()
    stop.received = signal.SIGUSR1
    assert stop.agreed(groups) == signal.SIGUSR1
    assert seen == [("cpu", groups.host_data), ("cpu", groups.host_world)]


def test_a_stop_that_ends_the_job_outranks_a_requeue_whatever_the_signal_numbers():
    """SIGTERM and Ctrl-C win over SIGUSR1 (on BSD and macOS SIGUSR1 is 30, above SIGTERM's 15)."""
    for first, then, wins in ((signal.SIGTERM, signal.SIGUSR1, signal.SIGTERM),
                              (signal.SIGUSR1, signal.SIGTERM, signal.SIGTERM),
                              (signal.SIGUSR1, signal.SIGINT, signal.SIGINT)):
        stop = StopRequest()
        stop._handle(first, None)
        try:
            stop._handle(then, None)
        except KeyboardInterrupt:  # not here: one Ctrl-C only
            raise AssertionError("a single SIGINT aborted") from None
        assert stop.agreed(None) == wins, (first, then)


def test_the_plain_engine_writes_the_one_save_sequence_and_records_its_layout(tmp_path):
    """One process: `trainer_rank00000.pt` (as every rank of every engine), the engine's own files, the
    layout-free form, and the manifest naming the layout that wrote it; `SavedCheckpoint` reads it back."""
    from bigtrain.checkpoint.saved import SavedCheckpoint
    from bigtrain.train.trainer import train
    from tests.conftest import tiny_config

    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, "causal", "train.steps=2"))
    step = run_dir / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in step.iterdir()) == ["config.yaml", "layout_free", "manifest.json", "model.pt",
                                                       "optimizer.pt", "trainer_rank00000.pt"]
    saved = SavedCheckpoint.read(step)
    assert saved.layout == Layout(engine="torch", precision="fp32") and saved.step == 2
    assert saved.has_native and saved.has_layout_free
    assert set(saved.trainer_record(0)) == {"state", "rng", "world_size"}


def test_the_plain_engines_gradient_norm_is_exact(tmp_path):
    """The smoke model's step-1 gradient norm against a float64 reference (the same gradients in float64): within
    1e-7. torch's foreach norm on CPU, which the plain engine once used, is further off (`pytest -s` prints
    both errors), so an exact tensor-parallel run seemed to differ from one device at step 1."""
    import copy

    from bigtrain.config import load_config
    from bigtrain.models.loss import model_inputs
    from bigtrain.train.trainer import Trainer
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "smoke.yaml", [
        "model.dropout=0", "model.attention_dropout=0", "data.max_bytes=300000", f"data.cache_dir={tmp_path / 'c'}",
        "train.global_batch_size=16", "train.micro_batch_size=4", f"run.dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    try:
        batches, counts = trainer.data.micro_batches(0)
        reference = copy.deepcopy(trainer.engine.model).double()
        plain = copy.deepcopy(trainer.engine.model)  # fp32, for torch's own (foreach) norm
        for model in (reference, plain):
            for batch in batches:
                loss = trainer.engine.criterion.loss_sum(model(**model_inputs(batch)), batch["labels"]) / counts[0]
                loss.backward()
        exact = float(sum(p.grad.pow(2).sum() for p in reference.parameters() if p.grad is not None).sqrt())
        foreach = float(torch.nn.utils.clip_grad_norm_(list(plain.parameters()), float("inf"), foreach=True))
        measured = trainer.engine.train_step(batches, cfg.optim.lr, counts=counts).resolved().grad_norm
    finally:
        trainer.lock.release()
    print(f"\nstep-1 grad_norm against float64: bigtrain {abs(measured - exact) / exact:.1e}, torch's foreach "
          f"clip_grad_norm_ {abs(foreach - exact) / exact:.1e} (relative)")
    assert abs(measured - exact) <= 1e-7 * exact, (measured, exact)
