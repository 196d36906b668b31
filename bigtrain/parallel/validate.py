"""What a command loads before it starts work: the config, checked key by key and rule by rule, the layout it
resolves to (`bigtrain.config.layout.resolve_layout`), and the one check that needs a built model, owned by the
parallel layer: every pipeline stage gets a layer, as DeepSpeed's partitioner cuts them. All of it runs before
any process group, allocation or data; `load_config` alone stays free of torch and DeepSpeed."""

from __future__ import annotations

from pathlib import Path

from bigtrain.config import Config
from bigtrain.config.layout import Layout
from bigtrain.config.loader import load_config_and_layout
from bigtrain.data.tokenizer import ByteTokenizer
from bigtrain.models import build_model


def check_pipeline_stages(cfg: Config) -> None:
    """Every stage (parallel.pipeline x parallel.virtual_stages) must get at least one layer; checked with DeepSpeed's
    own partitioning on the meta model
    (vocabulary as configured, or the byte tokenizer's size: the balance is re-checked at start-up)."""
    from bigtrain.parallel.pipeline import layer_specs
    from bigtrain.parallel.pipeline_module import check_stages

    m = cfg.model
    vocab = m.vocab_size or -(-ByteTokenizer.vocab_size // m.vocab_multiple) * m.vocab_multiple
    model = build_model(m, vocab, "meta")
    p = cfg.parallel
    check_stages(layer_specs(model, lambda piece: None), p.pipeline * p.virtual_stages, p.partition_method,
                 virtual_stages=p.virtual_stages)


def check_layout(cfg: Config, layout: Layout) -> None:
    """The parallel layer's checks of `cfg` on `layout` (the arithmetic of the layout was checked at load)."""
    if layout.pipeline > 1:
        check_pipeline_stages(cfg)


def load_run_config(path: str | Path | None, overrides: list[str] | None = None,
                    world_size: int = 1) -> tuple[Config, Layout]:
    """The config at `path` with `overrides` for `world_size` ranks, every check passed, and its layout."""
    cfg, layout = load_config_and_layout(path, overrides, world_size)
    check_layout(cfg, layout)
    return cfg, layout
