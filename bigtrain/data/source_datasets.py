"""Sources that are `datasets` datasets: a folder written by `Dataset.save_to_disk`, or
`hf:NAME[:CONFIG][@SPLIT]` loaded through datasets' own download and cache; a worker process reopens one from its
Arrow files.

A dataset is one unit of n = max(1, bytes of its text column) input bytes over its R rows, so a row counts n / R
bytes when the unit is cut into shards (`bigtrain.data.source_plan`) and read (`bigtrain.data.source_reading`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from bigtrain.config.schema import DataConfig
from bigtrain.data.files import file_identity
from bigtrain.data.source_units import Source, Unit
from bigtrain.errors import DataError


def parse_hf(source: str) -> tuple[str, str | None, str]:
    """hf:NAME[:CONFIG][@SPLIT] -> (NAME, CONFIG or None, SPLIT or 'train')."""
    rest = source[len("hf:"):]
    name_config, _, split = rest.partition("@")
    name, _, config = name_config.partition(":")
    if not name.strip():
        raise DataError(f"data.source: '{source}' names no dataset; write hf:NAME[:CONFIG][@SPLIT], e.g. "
                        f"hf:wikitext:wikitext-2-raw-v1@train.")
    return name, config or None, split or "train"


def hf_source(cfg: DataConfig) -> Source:
    import datasets

    name, config, split = parse_hf(cfg.source)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network, missing dataset, config or split: datasets raises many types
        raise DataError(
            f"data.source: could not load the Hugging Face dataset '{name}' (config {config!r}, split '{split}') "
            f"through datasets ({type(exc).__name__}: {' '.join(str(exc).split())[:400]}). Check the name, "
            f"config and split (data.source=hf:NAME[:CONFIG][@SPLIT]), the network or datasets' cache "
            f"(HF_DATASETS_OFFLINE=1 uses it alone), or download the data and point data.source at the files.") from exc
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"data.source: '{cfg.source}' gave a {type(ds).__name__}, not one split; name the split "
                        f"with @SPLIT (hf:NAME[:CONFIG]@train).")
    identity = {"hf": name, "config": config, "split": split, "fingerprint": ds._fingerprint, "rows": len(ds),
                "text_field": cfg.text_field}
    return _dataset_source(cfg, ds, identity)


def saved_source(cfg: DataConfig) -> Source:
    import datasets

    path = Path(cfg.source)
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        if "train" not in splits:
            raise DataError(f"data.source: '{path}' is a datasets DatasetDict with the splits {splits} and no "
                            f"'train'; point data.source at one split's folder, e.g. '{path / splits[0]}'."
                            if splits else f"data.source: '{path}' is a datasets DatasetDict folder without splits.")
        path = path / "train"
    try:
        with _quiet(datasets):
            ds = datasets.load_from_disk(str(path))
        state = (path / "state.json").read_bytes()
    except Exception as exc:  # datasets raises many types for damaged folders
        raise DataError(f"data.source: could not load '{path}' with datasets.load_from_disk ({type(exc).__name__}: "
                        f"{exc}). Point data.source at a folder written by Dataset.save_to_disk.") from exc
    files = [(Path(f["filename"]), "arrow") for f in ds.cache_files]
    identity = {"saved": str(path.resolve()), "state": hashlib.sha256(state).hexdigest(),
                "files": file_identity(files), "text_field": cfg.text_field}
    return _dataset_source(cfg, ds, identity)


def _dataset_source(cfg: DataConfig, ds: Any, identity: dict[str, Any]) -> Source:
    if cfg.text_field not in ds.column_names:
        raise DataError(f"data.text_field: the dataset '{cfg.source}' has no column {cfg.text_field!r}; its "
                        f"columns are {ds.column_names}. Set data.text_field to one of them.")
    column = ds.data.column(cfg.text_field)
    # Worker processes reopen the dataset from its Arrow files; one held in memory, or a view through an indices
    # mapping, is read in this process only.
    arrow = [f["filename"] for f in ds.cache_files] if ds._indices is None else []
    if arrow and _rows_of(arrow) != len(ds):  # a slice of its files (split="train[10%:]"): not reopened alone
        arrow = []
    unit = Unit("dataset", cfg.source, max(1, column.nbytes), rows=len(ds), arrow_files=arrow)
    return Source(cfg.source, identity, [unit], cfg.text_field, cfg.encoding_errors, cfg.cache_dir, dataset=ds)


def _rows_of(arrow_files: list[str]) -> int:
    import datasets

    with _quiet(datasets):
        return sum(datasets.Dataset.from_file(f).num_rows for f in arrow_files)


def open_dataset(source: Source, unit: Unit) -> Any:
    if source.dataset is not None:
        return source.dataset
    import datasets

    with _quiet(datasets):
        parts = [datasets.Dataset.from_file(f) for f in unit.arrow_files]
    source.dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return source.dataset


class _quiet:
    """Hide the `datasets` progress bars while loading, restoring their previous state."""

    def __init__(self, datasets: Any) -> None:
        self.datasets = datasets

    def __enter__(self) -> None:
        self.was_disabled = self.datasets.are_progress_bars_disabled()
        self.datasets.disable_progress_bars()

    def __exit__(self, *exc: object) -> None:
        if not self.was_disabled:
            self.datasets.enable_progress_bars()
