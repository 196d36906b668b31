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


def test_splittable_context_is_refused_until_wired() -> None:
    with pytest.raises(ConfigError, match=r"parallel.context=2 .*not yet wired"):
        load_config(None, ["parallel.context=2", "data.seq_len=64"])
