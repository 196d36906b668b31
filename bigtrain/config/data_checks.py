"""Rules of the `data` section: lengths and fractions, generated tasks, mixtures, document masking."""

from __future__ import annotations

import math

from bigtrain.config.rules import fraction, positive, require, show
from bigtrain.config.schema import Config


def check_data(cfg: Config) -> None:
    d, m = cfg.data, cfg.model
    require(d.seq_len >= 2, f"data.seq_len must be at least 2, got {d.seq_len}.")
    fraction("data.holdout_fraction", d.holdout_fraction, low_open=True)
    fraction("data.mask_prob", d.mask_prob, low_open=True)
    positive("data.max_bytes", d.max_bytes)
    positive("data.bucket_size", d.bucket_size)
    positive("data.task_samples", d.task_samples)
    require(1 <= d.task_min_len <= d.task_max_len,
            f"data.task_min_len={d.task_min_len} and data.task_max_len={d.task_max_len} must satisfy "
            f"1 <= task_min_len <= task_max_len.")
    require(d.seq_len <= m.max_seq_len,
            f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}; the model has no "
            f"positions beyond that. Lower data.seq_len or raise model.max_seq_len.")
    if d.source in ("reverse", "sort"):
        require(m.family == "seq2seq", f"data.source='{d.source}' is a generated seq2seq task; it needs "
                f"model.family='seq2seq' (got '{m.family}').")
    if d.document_masking:
        check_document_masking(cfg)
    if d.sources:
        check_sources(cfg)


def check_sources(cfg: Config) -> None:
    """A mixture: weights that are numbers >= 0 and not all zero, sources that are text, names unique."""
    d = cfg.data
    require(cfg.model.family in ("causal", "masked"),
            f"data.sources (a mixture) draws text samples for the causal and masked families; model.family="
            f"'{cfg.model.family}' reads source/target pairs from data.source. Remove data.sources, or use "
            f"model.family=causal or masked.")
    for i, s in enumerate(d.sources):
        key = f"data.sources[{i}]"
        require(isinstance(s.source, str) and s.source.strip() != "" and "\x00" not in s.source,
                f"{key}.source must be a non-empty path, 'embedded' or hf:NAME, got {show(s.source)}.")
        require(s.source not in ("reverse", "sort"), f"{key}.source='{s.source}' is a generated seq2seq task, "
                f"not text: a mixture holds text sources (embedded, files, saved datasets, hf:NAME).")
        require(math.isfinite(s.weight) and s.weight >= 0, f"{key}.weight must be a finite number >= 0 (its "
                f"share of the samples, relative to the others), got {show(s.weight)}.")
    total = sum(s.weight for s in d.sources)
    require(total > 0, f"data.sources: every weight is 0 ({[s.weight for s in d.sources]}), so no source would "
            f"be sampled. Give at least one source a positive weight.")
    names = [source_name(s.name, s.source) for s in d.sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    require(not duplicates, f"data.sources: the names {duplicates} occur more than once (a name is derived from "
            f"the source unless given); set data.sources[i].name to tell them apart in the metrics.")


def source_name(name: str | None, source: str) -> str:
    """A mixture source's name in the metrics: `name`, else the source's last path component (or hf name)."""
    if name:
        return name
    stripped = source.rstrip("/")
    return stripped.rsplit("/", 1)[-1] or stripped


def check_document_masking(cfg: Config) -> None:
    """data.document_masking separates the documents that causal blocks pack together; no other family packs."""
    family = cfg.model.family
    why = {"masked": "whose samples are chunks of one document each", "seq2seq": "whose samples are one "
           "source/target pair each"}.get(family, "which does not pack documents")
    require(family == "causal",
            f"data.document_masking=true stops attention at document boundaries inside the packed blocks of "
            f"model.family='causal', but model.family='{family}', {why}, so there is nothing to separate. "
            f"Set data.document_masking=false, or model.family=causal.")
