"""Measure what `bigtrain plan` predicts, on every rank of a real run (started by torchrun, or alone for one
process): train one step under `SavedActivationMeter` and write run.dir/plan_measure_rank<r>.json with

    activations  peak bytes saved for backward during the step (every micro-batch in flight)
    parameters   bytes of the parameters this rank holds (ZeRO-3: its partitions)
    gradients    peak gradient bytes during the step (full gradients, or ZeRO's partitions and buffers)
    optimizer    bytes of the optimizer state after the step (moments, fp32 master copies)
    stage        this rank's pipeline stage
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bigtrain.config import load_config  # noqa: E402
from bigtrain.distributed import detect_env  # noqa: E402
from bigtrain.engine.memory import measure_grads, measure_optimizer, measure_params  # noqa: E402
from bigtrain.planning.saved_activations import SavedActivationMeter  # noqa: E402
from bigtrain.train.trainer import Trainer  # noqa: E402


def main(argv: list[str]) -> None:
    env = detect_env()
    cfg = load_config(None, argv, world_size=env.world_size)
    trainer = Trainer(cfg, env)
    engine = trainer.engine
    model = engine.model
    meter = SavedActivationMeter(model)
    grads = {"peak": 0}
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)

    def before_update(*_):  # the gradients are complete (and reduced) when the inner optimizer steps
        grads["peak"] = max(grads["peak"], measure_grads(engine.model, engine.optimizer))

    inner.register_step_pre_hook(before_update)
    if hasattr(engine, "measure_grads"):
        engine.measure_grads = True  # DeepSpeedEngine: the peak over the micro-batches' backward passes
    batches, counts = trainer.data.micro_batches(0)
    with meter.measuring():
        engine.train_step(batches, cfg.optim.lr, False, counts)
    grads["peak"] = max(grads["peak"], getattr(engine, "last_grad_bytes", None) or 0)
    stage = engine.groups.get_pipeline_model_parallel_rank() if engine.groups is not None else 0
    result = {"rank": env.rank, "stage": stage, "activations": meter.peak,
              "parameters": measure_params(engine.model), "gradients": grads["peak"],
              "optimizer": measure_optimizer(engine.optimizer)}
    (Path(cfg.run.dir) / f"plan_measure_rank{env.rank}.json").write_text(json.dumps(result))
    if env.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
