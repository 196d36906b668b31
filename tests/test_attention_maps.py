"""Attention maps as pictures: the grid drawn (size, panels, non-blank), the values drawn (attention
probabilities), `bigtrain attention` on tiny trained runs and its errors, and log.attention_images in TensorBoard
(one process, and ZeRO-3 over 2 ranks)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bigtrain.cli import main
from bigtrain.config import load_config
from bigtrain.data import ByteTokenizer
from bigtrain.inference.attention_data import AttentionGrid, group, record, token_labels
from bigtrain.inference.attention_log import TAG
from bigtrain.inference.attention_plot import draw, figure_size, save_png
from bigtrain.models import build_model
from bigtrain.train.trainer import train
from tests.conftest import DP_LAYOUT, REPO, TINY_MODEL, launch_ok, tiny_overrides

TOKENIZER = ByteTokenizer()


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _random_grid(layers: int, heads: int, tokens: int) -> AttentionGrid:
    scores = torch.randn(layers, heads, tokens, tokens, generator=torch.Generator().manual_seed(0))
    labels = [chr(ord("a") + i % 26) for i in range(tokens)]
    return AttentionGrid("self", list(range(layers)), list(range(heads)), scores.softmax(-1).numpy(), labels, labels)


def _panels(fig) -> list[np.ndarray]:
    return [np.asarray(ax.images[0].get_array()) for ax in fig.axes if ax.images]


@pytest.mark.parametrize("layers,heads,dpi", [(2, 3, 50), (3, 2, 80)])
def test_png_has_the_requested_size_panels_and_is_not_blank(tmp_path, layers, heads, dpi):
    grid = _random_grid(layers, heads, tokens=12)
    fig = draw([grid], "test")
    assert len(_panels(fig)) == layers * heads
    width, height = save_png(fig, tmp_path / "a.png", dpi)
    w_in, h_in = figure_size([grid])
    assert (width, height) == (round(w_in * dpi), round(h_in * dpi))
    pixels = _pixels(tmp_path / "a.png")
    assert pixels.shape == (height, width, 3)
    assert pixels.std() > 20
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


def test_more_layers_and_heads_make_a_larger_picture():
    small, large = figure_size([_random_grid(1, 1, 8)]), figure_size([_random_grid(3, 4, 8)])
    assert large[0] > small[0] and large[1] > small[1]


def _model(family: str, *extra: str):
    cfg = load_config(None, [f"model.family={family}", *TINY_MODEL, "data.seq_len=32", *extra])
    torch.manual_seed(0)
    return build_model(cfg.model, TOKENIZER.vocab_size, "cpu")


@pytest.mark.parametrize("family", ["causal", "masked"])
def test_panels_show_attention_probabilities(family):
    """Every drawn row sums to 1; causal rows put exactly 0 on later tokens (masked ones do not)."""
    ids = TOKENIZER.encode("hello world")
    labels = {"input": token_labels(TOKENIZER, ids)}
    grids = group(record(_model(family), {"input_ids": torch.tensor([ids])}), family, labels)
    assert [g.kind for g in grids] == ["self"]
    panels = _panels(draw(grids))
    assert len(panels) == 2 * 4
    future = np.triu(np.ones((len(ids), len(ids)), dtype=bool), k=1)
    for panel, expected in zip(panels, grids[0].weights.reshape(-1, len(ids), len(ids)), strict=True):
        np.testing.assert_allclose(panel, expected)
        np.testing.assert_allclose(panel.sum(-1), 1.0, rtol=1e-5)
        if family == "causal":
            assert (panel[future] == 0).all()
        else:
            assert (panel[future] > 0).all()


def test_seq2seq_grids_encoder_decoder_cross():
    """T5-style relative bias included: the decoder is causal, cross-attention is target × source."""
    model = _model("seq2seq", "model.positions=relative", "model.relative_buckets=8", "model.n_decoder_layers=3")
    source, target = [*TOKENIZER.encode("abcde"), TOKENIZER.eos_id], [TOKENIZER.bos_id, *TOKENIZER.encode("ed")]
    labels = {"input": token_labels(TOKENIZER, source), "target": token_labels(TOKENIZER, target)}
    maps = record(model, {"input_ids": torch.tensor([source]), "decoder_input_ids": torch.tensor([target])})
    grids = {g.kind: g for g in group(maps, "seq2seq", labels)}
    assert list(grids) == ["encoder", "decoder", "cross"]
    assert grids["encoder"].weights.shape == (2, 4, 6, 6)
    assert grids["decoder"].weights.shape == (3, 4, 3, 3)
    assert grids["cross"].weights.shape == (3, 4, 3, 6)
    assert (grids["cross"].queries, grids["cross"].keys) == (labels["target"], labels["input"])
    assert (np.triu(grids["decoder"].weights[..., :, :], k=1) == 0).all()
    for grid in grids.values():
        np.testing.assert_allclose(grid.weights.sum(-1), 1.0, rtol=1e-5)
    assert len(_panels(draw(list(grids.values())))) == (2 + 3 + 3) * 4


def test_token_labels_are_printable():
    ids = [*TOKENIZER.encode("a b\n\t€"), TOKENIZER.bos_id, TOKENIZER.eos_id]
    assert token_labels(TOKENIZER, ids) == ["a", "␣", "b", "\\n", "\\t", "\\xe2", "\\x82", "\\xac", "<bos>", "<eos>"]


# --- `bigtrain attention` on tiny trained runs ---------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("attention")
    out = {}
    for family in ("causal", "seq2seq"):
        run_dir = base / family / "run"
        train(load_config(None, tiny_overrides(run_dir, family, "train.steps=2")))
        out[family] = run_dir
    return out


def test_cli_draws_a_causal_run(runs, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["attention", str(runs["causal"]), "--text", "hello", "--out", str(out)]) == 0
    assert "2 layers x 4 heads, 5x5 tokens" in capsys.readouterr().out
    full = _pixels(out)
    assert full.std() > 20
    assert main(["attention", str(runs["causal"]), "--text", "hello", "--out", str(tmp_path / "y.png"),
                 "--layers", "1", "--heads", "0,2"]) == 0
    part = _pixels(tmp_path / "y.png")
    assert part.shape[0] < full.shape[0] and part.shape[1] < full.shape[1]


def test_cli_draws_a_seq2seq_run(runs, tmp_path, capsys):
    out = tmp_path / "s.png"
    assert main(["attention", str(runs["seq2seq"]), "--text", "abc", "--target", "cb", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "encoder: 2 layers x 4 heads, 4x4 tokens" in said and "cross: 2 layers x 4 heads, 3x4 tokens" in said
    assert main(["attention", str(runs["seq2seq"]), "--text", "abc", "--kind", "cross", "--out",
                 str(tmp_path / "c.png")]) == 0
    assert "cross: 2 layers x 4 heads, 1x4 tokens" in capsys.readouterr().out  # decoder input: bos alone
    assert _pixels(tmp_path / "c.png").shape[0] < _pixels(out).shape[0]


@pytest.mark.parametrize("args,match", [
    (["--text", "x" * 65], r"--text is 65 tokens long but the model takes at most model\.max_seq_len=64"),
    (["--text", ""], r"--text is empty"),
    (["--text", "hi", "--layers", "5"], r"--layers: the model has no layer 5: it has 2 layers, 0 to 1\."),
    (["--text", "hi", "--heads", "0,9"], r"--heads: the model has no head 9: it has 4 heads, 0 to 3\."),
    (["--text", "hi", "--layers", "a"], r"--layers 'a': give indices .* separated by commas"),
    (["--text", "hi", "--kind", "cross"], r"--kind cross: a causal model has self attention; use --kind self or all"),
    (["--text", "hi", "--target", "x"], r"--target is the decoder input of a seq2seq model, but this model is causal"),
    (["--text", "hi", "--out", "{tmp}/missing/x.png"], r"the folder .*missing does not exist; create it"),
    (["--text", "hi", "--out", "{tmp}/x.jpg"], r"the picture is a PNG; give a file name ending in \.png"),
])
def test_cli_errors_are_one_clear_line(runs, tmp_path, capsys, args, match):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "x.png")]
    assert main(["attention", str(runs["causal"]), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("bigtrain: error: "), err
    assert re.search(match, err), err
    assert not (tmp_path / "x.png").exists()


# --- log.attention_images: TensorBoard image events ----------------------------------------------------------

def _images(run_dir: Path) -> list:
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={IMAGES: 0}).Reload()
    assert TAG in events.Tags()[IMAGES], events.Tags()
    return events.Images(TAG)


@pytest.mark.parametrize("family", ["causal", "seq2seq"])
def test_tensorboard_gets_an_image_at_each_evaluation(tmp_path, family):
    run_dir = tmp_path / "run"
    train(load_config(None, tiny_overrides(run_dir, family, "train.steps=4", "train.eval_every=2",
                                           "log.tensorboard=true", "log.attention_images=true")))
    images = _images(run_dir)
    assert [i.step for i in images] == [2, 4]
    for image in images:
        assert 300 < image.width <= 4096 and 300 < image.height <= 4096
        assert image.encoded_image_string.startswith(b"\x89PNG")


@pytest.mark.launches
@pytest.mark.parametrize("engine", ["deepspeed", "fairscale"])
def test_tensorboard_image_under_zero3(tmp_path, engine):
    """ZeRO-3 partitions the parameters (DeepSpeed's, or fairscale's FSDP run on CPU ranks by its test helper,
    whose wrappers add to the module names): every rank runs the forward, rank 0 draws."""
    run_dir = tmp_path / "run"
    script = REPO / "tests" / "helpers" / "fsdp_on_cpu.py" if engine == "fairscale" else None
    launch_ok(2, tiny_overrides(run_dir, "causal", *DP_LAYOUT, "parallel.zero_stage=3", "train.steps=2",
                                f"parallel.engine={engine}", "train.eval_every=2", "log.tensorboard=true",
                                "log.attention_images=true"), script=script)
    assert [i.step for i in _images(run_dir)] == [2]
