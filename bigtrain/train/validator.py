"""Evaluation during training: when it is due, the held-out metrics through the engine, the attention pictures
for TensorBoard, and early stopping.

    due        every train.eval_every steps and after the last one
    metrics    the engine's sums over the held-out set of train.eval_samples sequences (`bigtrain.data.heldout`:
               the same under every layout and batch split; every rank runs all of it: ZeRO-3 needs every rank in
               each forward; the pipeline runs it stage by stage), one source at a time; one line in metrics.jsonl,
               with each source's own record under `eval_sources` for a mixture
    stop       eval_loss did not improve for train.early_stop_patience evaluations in a row
"""

from __future__ import annotations

from bigtrain.config import Config
from bigtrain.data.loader import TrainingData
from bigtrain.engine.base import Engine
from bigtrain.engine.evaluate import held_out_record
from bigtrain.train.metrics import MetricsProcessor
from bigtrain.train.state import TrainState


class Validator:
    def __init__(self, cfg: Config, engine: Engine, data: TrainingData, metrics: MetricsProcessor,
                 is_main: bool) -> None:
        self.cfg, self.engine, self.data, self.metrics, self.is_main = cfg, engine, data, metrics, is_main

    def due(self, step: int) -> bool:
        every = self.cfg.train.eval_every
        return bool(every and step % every == 0) or step == self.cfg.train.steps

    def run(self, state: TrainState) -> dict[str, float]:
        result = held_out_record(self.engine.evaluate_sums, self.data.heldout_parts())
        self.metrics.eval_line(state.step, result)
        if self.cfg.log.attention_images:  # the config checks want TensorBoard or a tracker to draw into
            self._log_attention(state.step)
        acc = "" if self.cfg.model.family == "causal" else (
            f" | token accuracy {100 * result['eval_accuracy']:.1f}%"
            f" | sequence accuracy {100 * result['eval_sequence_accuracy']:.1f}%")
        sources = "".join(f" | {name} {r['eval_loss']:.4f}" for name, r in result.get("eval_sources", {}).items())
        self.metrics.write(f"eval step {state.step} | eval_loss {result['eval_loss']:.4f} "
                           f"| ppl {result['eval_ppl']:.2f}{acc}{sources}")
        return result

    def _log_attention(self, step: int) -> None:
        """log.attention_images: the first held-out sample's attention maps as an image (TensorBoard, trackers);
        every rank runs the forward (ZeRO-3 needs all of them), rank 0 draws (config checks refuse tensor and
        pipeline)."""
        from bigtrain.inference.attention_log import TAG, attention_image

        image = attention_image(self.engine.model, self.cfg.model.family, self.data.tokenizer, self.data.heldout_set,
                                self.data.device, self.engine.autocast, step, draw=self.is_main)
        if image is not None:
            self.metrics.log.image(TAG, image, step)

    def stop_early(self, state: TrainState, result: dict[str, float]) -> bool:
        """Keep the best eval_loss; True when patience ran out before the last step."""
        if result["eval_loss"] < state.best_eval_loss:
            state.best_eval_loss, state.evals_without_improvement = result["eval_loss"], 0
        else:
            state.evals_without_improvement += 1
        patience = self.cfg.train.early_stop_patience
        return bool(patience) and state.evals_without_improvement >= patience and state.step < self.cfg.train.steps
