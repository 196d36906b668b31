"""`bigtrain eval-harness RUN_DIR|CHECKPOINT|WEIGHTS_DIR --tasks T[,T...] [--limit N]`: downstream evaluation with
lm-eval-harness, scored by bigtrain's own model (`bigtrain.inference.lm_eval_adapter`): on one device, or under a
launcher (`torchrun --nproc_per_node W -m bigtrain.cli eval-harness ...`) split W ways by tensor parallelism, as
`bigtrain generate` loads. Tasks are lm-eval's own (downloaded by datasets as lm-eval does) or those of a folder of
task YAMLs (`--include-path`, e.g. tests/fixtures/eval_harness: a local JSONL file, no download)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bigtrain.cli.arguments import CommandParser, path, text, whole
from bigtrain.cli.report import run_guarded
from bigtrain.distributed import detect_env
from bigtrain.errors import UsageError


def task_names(spec: str) -> list[str]:
    """'a,b' -> ['a', 'b'] (empty names refused)."""
    names = [name.strip() for name in spec.split(",")]
    if not all(names):
        raise UsageError(f"--tasks {spec!r}: give task names separated by commas (e.g. --tasks hellaswag,lambada).")
    return names


def evaluate_harness(checkpoint: Path, tasks: list[str], limit: int | None = None, include_path: Path | None = None,
                     num_fewshot: int | None = None, batch_size: int = 16, overrides: list[str] | None = None,
                     step: int | None = None) -> dict[str, Any]:
    """lm-eval's results ({"results": {task: {metric: value}}, ...}) of the weights at `checkpoint`, on one device
    or, under a launcher with W ranks, split W ways by tensor parallelism (every rank returns the same results)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from bigtrain.inference.lm_eval_adapter import BigtrainLM
    from bigtrain.inference.load import load_model, load_tensor_parallel

    if include_path is not None and not include_path.is_dir():
        raise UsageError(f"--include-path {include_path}: give a folder of lm-eval task YAML files.")
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [name for name in tasks if not manager.match_tasks([name])]
    if unknown:
        where = f" or in {include_path}" if include_path is not None else " (--include-path adds a folder of YAMLs)"
        raise UsageError(f"--tasks: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a task of "
                         f"lm-eval{where}.")
    loaded = (load_tensor_parallel(checkpoint, overrides, step) if detect_env().world_size > 1
              else load_model(checkpoint, overrides, step))
    results = simple_evaluate(model=BigtrainLM(loaded, batch_size), tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                              task_manager=manager, log_samples=False, bootstrap_iters=0)
    return results


def run_eval_harness(argv: list[str]) -> int:
    parser = CommandParser(
        prog="bigtrain eval-harness", description="Evaluate a trained causal model on lm-eval-harness tasks "
        "(loglikelihood, rolling loglikelihood and greedy generation with the KV cache), on one device or under a "
        "launcher with W ranks (torchrun --nproc_per_node W -m bigtrain.cli eval-harness ...) split W ways by "
        "tensor parallelism. Prints lm-eval's table; --output writes the results as JSON.")
    parser.add_argument("checkpoint", help="a run.dir (its latest checkpoint), a checkpoint folder, or a folder "
                        "written by `bigtrain export` or `bigtrain consolidate`")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides (e.g. train.device=cpu)")
    parser.add_argument("--tasks", type=text, required=True, metavar="T[,T...]", help="lm-eval task names")
    parser.add_argument("--limit", type=whole, metavar="N", help="at most N documents per task")
    parser.add_argument("--include-path", type=path, metavar="DIR",
                        help="a folder of lm-eval task YAMLs (tasks of your own, e.g. over a local JSONL file)")
    parser.add_argument("--num-fewshot", type=whole, metavar="K", help="few-shot examples per prompt (default: "
                        "the task's)")
    parser.add_argument("--batch-size", type=whole, default=16, metavar="B",
                        help="sequences per forward when scoring (default 16)")
    parser.add_argument("--output", type=path, metavar="FILE.json", help="write the results there (rank 0)")
    parser.add_argument("--step", type=whole, metavar="N",
                        help="the checkpoint of step N of a run.dir (default: the latest)")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    args = parser.parse(argv, path="checkpoint")

    def command() -> int:
        import torch.distributed as dist

        started_with_group = dist.is_initialized()
        if args.limit is not None and args.limit < 1:
            raise UsageError(f"--limit {args.limit}: give at least 1 document per task.")
        if args.batch_size < 1:
            raise UsageError(f"--batch-size {args.batch_size}: give at least 1.")
        if args.output is not None and (args.output.is_dir() or not args.output.parent.is_dir()):
            raise UsageError(f"--output {args.output}: give the path of a file in an existing folder.")
        results = evaluate_harness(args.checkpoint, task_names(args.tasks), args.limit, args.include_path,
                                   args.num_fewshot, args.batch_size, args.overrides, args.step)
        if detect_env().is_main:
            from lm_eval.utils import handle_non_serializable, make_table

            print(make_table(results), flush=True)
            if args.output is not None:
                kept = {key: results[key] for key in ("results", "versions", "n-shot", "n-samples") if key in results}
                args.output.write_text(json.dumps(kept, indent=2, default=handle_non_serializable) + "\n")
                print(f"results: {args.output}", flush=True)
        if dist.is_initialized() and not started_with_group:  # ours (a launcher's ranks): leave together
            dist.barrier()
            dist.destroy_process_group()
        return 0

    return run_guarded(command, args.debug, {"--output": args.output})
