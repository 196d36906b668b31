"""Checks of a loaded config against the model it builds, owned by the parallel layer (run by
`bigtrain.engine.validate.validate_run` before any process group or allocation)."""

from __future__ import annotations

from bigtrain.config import Config
from bigtrain.data.tokenizer import ByteTokenizer
from bigtrain.models import build_model


def check_pipeline_stages(cfg: Config) -> None:
    """Every stage must get at least one layer; checked with DeepSpeed's own partitioning on the meta model
    (vocabulary as configured, or the byte tokenizer's size: the balance is re-checked at start-up)."""
    from bigtrain.parallel.pipeline import layer_specs
    from bigtrain.parallel.pipeline_module import check_stages

    m = cfg.model
    vocab = m.vocab_size or -(-ByteTokenizer.vocab_size // m.vocab_multiple) * m.vocab_multiple
    model = build_model(m, vocab, "meta")
    check_stages(layer_specs(model, lambda piece: None), cfg.parallel.pipeline, cfg.parallel.partition_method)


def check_layout(cfg: Config) -> None:
    """The parallel layer's checks of `cfg` (the arithmetic of the layout was checked at load)."""
    if cfg.parallel.pipeline > 1:
        check_pipeline_stages(cfg)
