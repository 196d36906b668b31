"""`bigtrain consolidate`, `evaluate`, `export` and `convert`: commands on a run's checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

from bigtrain.cli.arguments import CommandParser, path, whole
from bigtrain.cli.capacity import check_local_ranks, visible_gpus
from bigtrain.cli.launching import Launch
from bigtrain.cli.report import run_guarded

STEP_HELP = "the checkpoint of step N of a run.dir (default: the latest)"


def evaluate_weights(path: Path, overrides: list[str] | None = None, step: int | None = None) -> dict[str, float]:
    """Held-out metrics, on one device, of the weights at `path`: a run.dir (its checkpoint of `step`, default the
    latest), a checkpoint (its layout-free form read directly), or a folder written by `bigtrain export` or
    `bigtrain consolidate` (`bigtrain.checkpoint.weights`); over the held-out set training evaluates
    (`bigtrain.data.heldout`, from the saved config and `overrides`), with `eval_sources` for a mixture."""
    from bigtrain.data import build_datasets
    from bigtrain.data.heldout import heldout_parts
    from bigtrain.distributed.device import autocast
    from bigtrain.engine.evaluate import evaluate_sums, held_out_record
    from bigtrain.inference.load import load_model

    loaded = load_model(path, overrides, step)
    cfg, tokenizer, device = loaded.cfg, loaded.tokenizer, loaded.device
    _, heldout = build_datasets(cfg, tokenizer, verify=True)
    return held_out_record(lambda batches: evaluate_sums(loaded.model, batches,
                                                         lambda: autocast(cfg.train.precision, device)),
                           heldout_parts(cfg, tokenizer, heldout, device))


def convert(path: Path, step: int | None = None) -> Path:
    """Add the layout-free form to the checkpoint at `path` (a run.dir: its checkpoint of `step`, default the
    latest): in this process when one rank wrote it, else under torchrun with as many local ranks as wrote it
    (`cli/convert_worker.py`)."""
    from bigtrain.checkpoint.convert import STAGING, convert_here
    from bigtrain.checkpoint.joined_qkv import written_with_separate_qkv
    from bigtrain.checkpoint.saved import SavedCheckpoint, find_checkpoint
    from bigtrain.errors import CheckpointError

    saved = SavedCheckpoint.read(find_checkpoint(path, step))
    if saved.has_layout_free:
        return saved.path
    ranks = saved.layout.world_size
    if ranks > 1:
        check_local_ranks(ranks, f"{saved.path} was written by {ranks} ranks; converting it needs as many",
                          "Convert it on a machine with room for them (e.g. where it was trained).",
                          visible_gpus(saved.config.train.device))
    if written_with_separate_qkv(saved.trainer_state) and saved.layout.engine != "torch":
        raise CheckpointError(
            f"{saved.path} was written by an earlier bigtrain, whose attention kept Q, K and V as three parameters, "
            f"by {saved.layout.describe_run()}; that engine's own files (the optimizer's flat partitions) depend on "
            f"the parameters' shapes, and this bigtrain holds them as one (`qkv_proj`), so it cannot load them. "
            f"Convert it with the bigtrain that wrote it (then resume it here under any layout), or resume it "
            f"with that bigtrain.")
    if ranks == 1:
        convert_here(saved.path)
        return saved.path
    with Launch(temporary=[saved.path / STAGING]) as launch:  # the staging folder goes too if the ranks die
        status, _ = launch.run([*launch.torchrun(ranks), "-m", "bigtrain.cli.convert_worker", str(saved.path)])
    if status != 0:
        raise CheckpointError(f"Converting {saved.path} with {ranks} ranks failed (status {status}; see the "
                              f"messages above).")
    return saved.path


def run_consolidate(argv: list[str]) -> int:
    parser = CommandParser(prog="bigtrain consolidate",
                           description="Gather a (ZeRO-sharded) checkpoint into one full set of weights.")
    parser.add_argument("run_dir", type=path, help="the run.dir of the training run")
    parser.add_argument("--step", type=whole, metavar="N", help="checkpoint step (default: the latest)")
    parser.add_argument("--out", type=path, help="output directory (default: RUN_DIR/consolidated/step_N)")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    args = parser.parse(argv)

    def command() -> int:
        from bigtrain.checkpoint.weights import consolidate

        out = consolidate(args.run_dir, args.step, args.out)
        print(f"consolidated weights: {out / 'model.pt'} (config: {out / 'config.yaml'})")
        return 0

    return run_guarded(command, args.debug, {"--out": args.out or args.run_dir / "consolidated"})


def run_evaluate(argv: list[str]) -> int:
    parser = CommandParser(prog="bigtrain evaluate",
                           description="Held-out loss of consolidated weights on one device.")
    parser.add_argument("weights_dir", help="a run.dir (its latest checkpoint), a checkpoint folder, or a folder "
                        "written by `bigtrain export` or `bigtrain consolidate`")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.add_argument("--step", type=whole, metavar="N", help=STEP_HELP)
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    args = parser.parse(argv, path="weights_dir")

    def command() -> int:
        print(json.dumps(evaluate_weights(args.weights_dir, args.overrides, args.step)))
        return 0

    return run_guarded(command, args.debug)


def run_export(argv: list[str]) -> int:
    parser = CommandParser(prog="bigtrain export", description="Write a checkpoint's weights alone, for inference.")
    parser.add_argument("checkpoint", type=path, help="a run.dir (its latest checkpoint) or a checkpoint folder")
    parser.add_argument("--step", type=whole, metavar="N", help=STEP_HELP)
    parser.add_argument("--format", choices=["safetensors", "hf"], default="safetensors",
                        help="safetensors: model.safetensors + config.yaml (one-device layout); hf: a transformers "
                        "folder of GPT-2, Llama, Mixtral, GPT-NeoX, BERT or T5 (config.json, model.safetensors, "
                        "generation_config.json, and tokenizer.json + tokenizer_config.json + "
                        "special_tokens_map.json, built for byte-tokenizer runs)")
    parser.add_argument("--out", type=path, required=True, help="output folder")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    args = parser.parse(argv)

    def command() -> int:
        if args.format == "hf":
            from bigtrain.interop import export_hf

            out = export_hf(args.checkpoint, args.out, args.step)
            files = [name for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                                       "tokenizer_config.json", "special_tokens_map.json") if (out / name).exists()]
            print(f"exported: {out} (transformers: {', '.join(files)})")
            return 0
        from bigtrain.checkpoint.weights import export_safetensors

        out = export_safetensors(args.checkpoint, args.out, args.step)
        print(f"exported: {out / 'model.safetensors'} (config: {out / 'config.yaml'})")
        return 0

    return run_guarded(command, args.debug, {"--out": args.out})


def run_convert(argv: list[str]) -> int:
    parser = CommandParser(
        prog="bigtrain convert", description="Add the layout-free form to a checkpoint written without it, so that "
        "it can be resumed under any layout (loads it with as many local ranks as wrote it).")
    parser.add_argument("checkpoint", type=path, help="a run.dir (its latest checkpoint) or a checkpoint folder")
    parser.add_argument("--step", type=whole, metavar="N", help=STEP_HELP)
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    args = parser.parse(argv)

    def command() -> int:
        checkpoint = convert(args.checkpoint, args.step)
        print(f"layout-free form: {checkpoint / 'layout_free'}")
        return 0

    return run_guarded(command, args.debug)  # it writes into the run.dir
