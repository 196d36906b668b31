"""Everything about checkpoints: the atomic step folder and `latest` (`store.py`), manifests and the choice of
what to resume (`integrity.py`), a saved checkpoint read once with the layout that wrote it (`saved.py`), the one
save sequence (`save.py`) and `CheckpointManager` (`manager.py`), the layout-free form (`layout_free.py`) and an
engine's state as its pieces (`state.py`), what a resume must match (`resume.py`, `compare.py`), weights from
anything (`weights.py`), consolidation (`consolidate.py`) and conversion (`convert.py`). Each engine kind reads
and writes its own native files (`bigtrain.engine`)."""
