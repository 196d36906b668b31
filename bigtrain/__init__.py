"""bigtrain: distributed training of large Transformer models on PyTorch and DeepSpeed."""

__version__ = "0.1.0"
