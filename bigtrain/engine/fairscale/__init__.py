"""The fairscale engine: OSS, OSS + ShardedDataParallel and FullyShardedDataParallel (`engine.py`,
`fully_sharded.py`); its files (`files.py`)."""
