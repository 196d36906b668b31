"""Activation checkpointing saves less for backward, as Korthikanti et al. predict (bench/activation_memory.py)."""

from bench.activation_memory import measure


def test_checkpointing_drops_saved_activations(capsys):
    seq, batch, d, heads, layers = 64, 2, 32, 4, 2
    rows = {r.mode: r for r in measure(seq, batch, d, heads, layers)}
    for r in rows.values():
        print(f"{r.mode}: {r.per_block:.0f} bytes/block saved, Korthikanti {r.formula_per_block:.0f} (16-bit)")
    assert rows["full"].per_block < rows["selective"].per_block < rows["none"].per_block
    # Full recomputation keeps only each block's input: the formula's 2·s·b·h bytes in 16-bit, 4·s·b·h in fp32.
    assert rows["full"].per_block == 2 * rows["full"].formula_per_block == 4 * seq * batch * d
    # Selective drops the attention core's saved tensors, more than a quarter of a block's here.
    assert rows["selective"].per_block < 0.75 * rows["none"].per_block
