"""PyTorch's pipeline schedules as an engine (parallel.engine=torch with parallel.pipeline > 1)."""
