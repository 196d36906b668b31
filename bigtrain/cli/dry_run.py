"""`bigtrain train --world-size N`: a cluster job checked from a login node, without launching anything.

The config is loaded for N ranks with every check a job makes before its first step (keys, the layout dividing
N, DeepSpeed's derived config, the pipeline stages as DeepSpeed cuts them), then:

    data     the tokenizer loads and every text source (data.source, or each of data.sources) is readable
    resume   a run.dir that holds a checkpoint: the one a run would resume from fits this config (the checks a
             resume makes: config changes, tokenizer; under another layout it needs its layout-free form)
    memory   one rank of each pipeline stage, as `bigtrain plan` models it on a GPU (parameters, gradients and
             optimizer state per the ZeRO formulas, DeepSpeed's buffers, activations of the micro-batches in
             flight, logits, a framework constant); with --gpu-memory, a stage that does not fit is an error

Nothing is allocated, no process group starts, no data is prepared (`bigtrain prepare` does that).
"""

from __future__ import annotations

from bigtrain.config import Config
from bigtrain.config.layout import Layout
from bigtrain.errors import ConfigError

GiB = 2**30


def check_data(cfg: Config) -> tuple[str, list[str]]:
    """(the tokenizer's name, lines naming what was checked); a DataError names the source that cannot be read."""
    from bigtrain.data.corpus import corpus_folder
    from bigtrain.data.seq2seq import TASKS
    from bigtrain.data.sources import text_corpora
    from bigtrain.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(cfg.data)
    lines = [f"tokenizer {tokenizer.name} ({tokenizer.vocab_size} ids)"]
    if not cfg.data.sources and cfg.data.source in TASKS:
        return tokenizer.name, [*lines, f"data.source '{cfg.data.source}': a generated task"]
    for key, one in text_corpora(cfg.data):
        folder, _ = corpus_folder(one, tokenizer)
        lines.append(f"{key} '{one.source}' readable (its tokens go to {folder})")
    return tokenizer.name, lines


def resume_lines(cfg: Config, layout: Layout, tokenizer_name: str, allowed: set[str]) -> list[str]:
    """What a run would resume from, checked as a resume checks it; nothing on disk is changed."""
    from pathlib import Path

    from bigtrain.checkpoint.resume import check_fits, check_tokenizer
    from bigtrain.checkpoint.saved import SavedCheckpoint, find_checkpoint

    run_dir = Path(cfg.run.dir)
    if not (run_dir / "checkpoints").is_dir() or not cfg.checkpoint.resume:
        return [f"run.dir {run_dir}: starts from step 0"]
    saved = SavedCheckpoint.read(find_checkpoint(run_dir))
    check_fits(saved, cfg, allowed)
    check_tokenizer(saved, tokenizer_name, allowed)
    if saved.layout != layout and not saved.has_layout_free:
        raise ConfigError(f"run.dir {run_dir}: its checkpoint {saved.path.name} was written by "
                          f"{saved.layout.describe_run()} without its layout-free form, so a job on "
                          f"{layout.describe_run()} could not resume it. Use that layout, `bigtrain convert "
                          f"{run_dir}` first, or another run.dir.")
    how = ("its own files" if saved.layout == layout else
           f"its layout-free form (written by {saved.layout.describe_run()})")
    left = ("nothing left to train" if saved.step >= cfg.train.steps else
            f"trains steps {saved.step + 1}-{cfg.train.steps}")
    return [f"run.dir {run_dir}: resumes step {saved.step} from {saved.path.name} through {how}; {left}"]


def memory_lines(cfg: Config, layout: Layout, gpu_memory_gib: float | None) -> list[str]:
    """Each stage's predicted bytes per rank; ConfigError when one exceeds `gpu_memory_gib`."""
    from bigtrain.planning.memory_model import stage_memory
    from bigtrain.planning.search import given_candidate, setting
    from bigtrain.planning.shape import model_shape

    shape = model_shape(cfg)
    candidate, problem = given_candidate(cfg, layout.world_size)
    if candidate is None:
        raise ConfigError(f"--world-size {layout.world_size}: {problem}.")
    lines = [f"{shape.n_params / 1e6:,.1f}M parameters"]
    for m in stage_memory(shape, candidate, setting(cfg, on_gpu=True, framework_bytes=GiB)):
        parts = (f"parameters {m.parameters / GiB:.2f}, gradients {m.gradients / GiB:.2f}, optimizer state "
                 f"{m.optimizer / GiB:.2f}, buffers {m.buffers / GiB:.2f}, activations {m.activations / GiB:.2f}, "
                 f"logits and recomputation {m.transient / GiB:.2f}, framework {m.framework / GiB:.2f}")
        lines.append(f"memory per rank of stage {m.stage}: {m.total / GiB:.2f} GiB ({parts})")
        if gpu_memory_gib is not None and m.total > gpu_memory_gib * GiB:
            raise ConfigError(
                f"--world-size {layout.world_size}: a rank of pipeline stage {m.stage} needs about "
                f"{m.total / GiB:.1f} GiB ({parts} GiB) but --gpu-memory is {gpu_memory_gib:g} GiB. Use more ranks, "
                f"parallel.zero_stage, parallel.tensor / parallel.pipeline or parallel.activation_checkpointing=full "
                f"(`bigtrain plan` ranks the layouts that fit).")
    return lines


def dry_run(cfg: Config, layout: Layout, gpu_memory_gib: float | None = None, allowed: set[str] | None = None
            ) -> str:
    """The report of a dry run of `cfg` on `layout` (see the module docstring); `allowed`: --allow-changes."""
    tokenizer_name, data = check_data(cfg)
    lines = [f"dry run for {layout.world_size} rank(s): {layout.describe_run()}; config checked", *data,
             *resume_lines(cfg, layout, tokenizer_name, allowed or set()), *memory_lines(cfg, layout, gpu_memory_gib),
             "nothing was launched: start the job with the same config and overrides on that many ranks"]
    return "\n".join(lines)
