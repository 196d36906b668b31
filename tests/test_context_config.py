"""Load-time refusals of context parallelism (parallel.context, parallel.context_attention) name their keys."""

from __future__ import annotations

import pytest

from bigtrain.config.loader import load_config
from bigtrain.errors import ConfigError


def test_defaults_are_one_and_ring() -> None:
    cfg = load_config(None, [])
    assert cfg.parallel.context == 1 and cfg.parallel.context_attention == "ring"


def test_seq_len_must_divide_by_two_c() -> None:
    with pytest.raises(ConfigError, match=r"data.seq_len=.*parallel.context=3"):
        load_config(None, ["parallel.context=3", "data.seq_len=64"])


def test_ulysses_heads_must_divide_by_c() -> None:
    with pytest.raises(ConfigError, match=r"ulysses.*model.n_heads=6"):
        load_config(None, ["parallel.context=4", "parallel.context_attention=ulysses", "model.n_heads=6",
                           "model.d_model=96", "data.seq_len=64"])


def test_unknown_algorithm_is_refused() -> None:
    with pytest.raises(ConfigError, match="context_attention"):
        load_config(None, ["parallel.context_attention=striped"])


CP2 = ["parallel.context=2", "data.seq_len=64", "model.attention_dropout=0"]


def test_splittable_context_loads() -> None:
    cfg = load_config(None, CP2, world_size=2)
    assert cfg.parallel.context == 2


def test_pipeline_stages_load_on_deepspeeds_pipeline_engine() -> None:
    cfg = load_config(None, [*CP2, "parallel.pipeline=2"], world_size=4)
    assert (cfg.parallel.context, cfg.parallel.pipeline) == (2, 2)


@pytest.mark.parametrize("extra, keys", [
    (["parallel.pipeline=2", "parallel.engine=torch", "parallel.zero_stage=2"],
     r"parallel.context=2 with parallel.pipeline=2, parallel.engine='torch' .* and parallel.zero_stage=2"),
    (["parallel.pipeline=2", "model.family=seq2seq", "data.source=reverse"],
     r"parallel.context=2 with parallel.pipeline=2 .*model.family='seq2seq'"),
    (["parallel.engine=fairscale", "parallel.zero_stage=1"], r"parallel.context=2 with parallel.engine='fairscale'"),
    (["model.attention_dropout=0.1"], r"model.attention_dropout is 0.1"),
    (["model.attention_dropout=null", "model.dropout=0.1"], r"model.attention_dropout is 0.1 \(null means "
                                                             r"model.dropout=0.1\)"),
], ids=["torch-pipeline-fsdp2", "seq2seq-pipeline", "fairscale", "attention-dropout", "dropout"])
def test_what_is_not_wired_is_refused_naming_the_keys(extra, keys) -> None:
    with pytest.raises(ConfigError, match=keys):
        load_config(None, [*CP2, *extra], world_size=4)


def test_layout_orders_tensor_then_context_then_data_then_pipe() -> None:
    from bigtrain.config.layout import Layout

    layout = Layout.for_world(tensor=2, pipeline=1, world_size=8, context=2)
    assert (layout.data, layout.world_size) == (2, 8)
    assert layout.tensor_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.context_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.data_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.gradient_groups() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    for rank in range(8):
        c = layout.coordinates(rank)
        assert layout.rank_of(c.pipe, c.data, c.tensor, c.context) == rank


def test_layout_without_context_is_unchanged() -> None:
    from bigtrain.config.layout import Layout

    layout = Layout.for_world(tensor=2, pipeline=2, world_size=8)
    assert [layout.rank_of(p, d, t) for p in range(2) for d in range(2) for t in range(2)] == list(range(8))
    assert layout.gradient_groups() == layout.data_groups()


def test_model_groups_leave_context_ranks_apart() -> None:
    from bigtrain.config.layout import Layout

    layout = Layout.for_world(tensor=2, pipeline=1, world_size=8, context=2)
    assert layout.model_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]
