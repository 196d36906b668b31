"""Hugging Face in and out: export to transformers' GPT-2, Llama, Mixtral, GPT-NeoX, BERT and T5 with the run's
tokenizer (a byte-tokenizer run gets one built) (`export_hf`), and weights to start a run from, read from a transformers
folder or a bigtrain checkpoint under any layout (`init_source`)."""

from bigtrain.interop.export_hf import export_hf
from bigtrain.interop.init_from import init_source

__all__ = ["export_hf", "init_source"]
