"""The pipeline-schedule theory lives in `bigtrain/planning/bubble.py` (planning must not import bench); re-exported
here for the benches."""

from bigtrain.planning.bubble import COSTS, Step, formula, one_stage_order, simulate

__all__ = ["COSTS", "Step", "formula", "one_stage_order", "simulate"]
