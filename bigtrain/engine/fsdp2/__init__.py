"""PyTorch's FSDP2 engine (parallel.engine=torch on several ranks): `engine.py`, the sharding (`sharding.py`),
its files (`files.py`)."""
