"""The DeepSpeed engines: data parallelism / ZeRO (`engine.py`) and the pipeline (`pipeline.py`), both holding DeepSpeed
the same way (`wrap.py`); reading their files without an engine (`files.py`)."""
