"""`launch/train.py` with one planted bug, for the fault suite of `bigtrain parity --locate` (test-only: bigtrain
itself never reads this switch). `BIGTRAIN_FAULT=NAME` (read here, and only here) chooses it; each is a bug of a
kind found in real trainers, and each leaves one device's run as it is (the reference stays correct):

    sp_norm_grad      sequence parallelism: a norm's weight and bias no longer enter the tensor region, so their
                      gradients are this rank's sequence shard's only (the all-reduce over the tensor group is gone)
    vocab_ce_scale    vocabulary-parallel cross-entropy: its backward scales the logits' gradient by the tensor size
    qkv_shard         tensor parallelism: the K rows of the Q/K/V projection (`qkv_proj`) are drawn as the next
                      rank's K rows (a fused QKV cut in the wrong place)
    skip_reduce       ZeRO-2: the reduce-scatter of the gradients is skipped (DeepSpeed's reduction of each slice to the
                      rank that owns it: the owner keeps its own gradient)
    pipeline_order    pipeline parallelism: the first stage runs its micro-batches in reverse order (the last stage
                      pairs them with the labels in the right one)
    rotary_offset     tensor parallelism: tensor rank 1 rotates its heads' keys one position too far (its queries
                      right), as keys from a neighbour's chunk under context parallelism with a wrong offset
    rotary_context_offset  context parallelism (context=2, no tensor parallelism): context rank 1 rotates the
                      queries and keys of its second chunk one position too far (a wrong offset of the zig-zag
                      chunk's global positions)
    lamb_shard        LAMB under tensor parallelism: the trust ratio ||w|| / ||r|| of a sharded parameter from this
                      rank's shard alone
    loss_denominator  gradient accumulation under data parallelism: each micro-batch's loss is divided by this
                      rank's target count instead of the global batch's
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bigtrain.cli.train import run_train  # noqa: E402

FAULT = os.environ.get("BIGTRAIN_FAULT", "")


def _sp_norm_grad():
    from bigtrain.parallel import tensor_sublayers

    tensor_sublayers._enter = lambda p, tp: p


def _vocab_ce_scale():
    from bigtrain.parallel.cross_entropy import _VocabParallelCrossEntropy

    backward = _VocabParallelCrossEntropy.backward

    def scaled(ctx, grad_loss):
        grad, *rest = backward(ctx, grad_loss)
        return (grad * dist.get_world_size(), *rest)

    _VocabParallelCrossEntropy.backward = staticmethod(scaled)


def _qkv_shard():
    from dataclasses import dataclass

    from bigtrain.models import build
    from bigtrain.models.init import Shard
    from bigtrain.models.qkv import qkv_layout

    init_weights = build.init_weights

    @dataclass(frozen=True)
    class KFromNext(Shard):
        """This rank's rows of the [Q; K; V] blocks (`bigtrain.models.qkv`), but the K rows of the next rank's."""

        head_dim: int = 0
        groups: int = 1

        def take(self, full):
            d, g = self.head_dim, self.groups
            mine = super().take(full).clone()
            theirs = Shard(self.dim, (self.index + 1) % self.count, self.count).take(full)
            block = (g + 2) * d
            mine.view(-1, block, *mine.shape[1:])[:, g * d:(g + 1) * d] = \
                theirs.reshape(-1, block, *theirs.shape[1:])[:, g * d:(g + 1) * d]
            return mine

    def wrong(model, seed, shards=None, only=None):
        head_dim, groups = qkv_layout(model.cfg)
        shards = {name: KFromNext(s.dim, s.index, s.count, head_dim, groups) if name.endswith(".qkv_proj.weight")
                  else s for name, s in (shards or {}).items()}
        return init_weights(model, seed, shards, only=only)

    build.init_weights = wrong


def _skip_reduce():
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    def skipped(self, bucket, communication_data_type, rank=None, log=None, divide=True, process_group=None):
        return self.flatten(bucket)  # each slice's owner keeps its own (averaged-in-advance) gradient

    DeepSpeedZeroOptimizer.allreduce_bucket = skipped  # the collective of both reduce-scatter paths of ZeRO-2


def _pipeline_order():
    from bigtrain.engine.deepspeed.pipeline import PipelineEngine

    batches = PipelineEngine._batches

    def reversed_on_first(self, micro_batches):
        return batches(self, micro_batches[::-1] if self.stage == 0 else micro_batches)

    PipelineEngine._batches = reversed_on_first


def _rotary_offset():
    from bigtrain.models.layers import Rotary

    forward = Rotary.forward
    calls = [0]

    def shifted(self, x, position_ids=None):
        calls[0] += 1  # attention rotates q, then k
        keys = calls[0] % 2 == 0
        if keys and position_ids is None and dist.is_initialized() and dist.get_rank() % 2 == 1:  # tensor rank 1
            position_ids = torch.arange(1, x.shape[-2] + 1, device=x.device).expand(x.shape[0], -1)
        return forward(self, x, position_ids)

    Rotary.forward = shifted


def _rotary_context_offset():
    from bigtrain.models.layers import Rotary

    forward = Rotary.forward

    def shifted(self, x, position_ids=None):
        # under context parallelism the model is given each token's global position; with context=2 and no
        # tensor parallelism, context rank 1 is every odd rank. Its second chunk is the second half of its tokens.
        if position_ids is not None and dist.is_initialized() and dist.get_rank() % 2 == 1:
            half = position_ids.shape[-1] // 2
            position_ids = torch.cat([position_ids[..., :half], position_ids[..., half:] + 1], dim=-1)
        return forward(self, x, position_ids)

    Rotary.forward = shifted


def _lamb_shard():
    from bigtrain.engine.zero_lamb import ZeroLamb
    from bigtrain.optim.lamb import Lamb

    ZeroLamb._tensor_norms = Lamb._tensor_norms


def _loss_denominator():
    from bigtrain.engine.step import StepEngine
    from bigtrain.models.loss import count_input_tokens, count_targets

    def local_counts(self, micro_batches, counts):
        return counts if counts is not None else (sum(count_targets(b) for b in micro_batches),
                                                  sum(count_input_tokens(b) for b in micro_batches))

    StepEngine.global_counts = local_counts


FAULTS = {"sp_norm_grad": _sp_norm_grad, "vocab_ce_scale": _vocab_ce_scale, "qkv_shard": _qkv_shard,
          "skip_reduce": _skip_reduce, "pipeline_order": _pipeline_order, "rotary_offset": _rotary_offset,
          "rotary_context_offset": _rotary_context_offset, "lamb_shard": _lamb_shard,
          "loss_denominator": _loss_denominator}

if FAULT:
    if FAULT not in FAULTS:
        sys.exit(f"BIGTRAIN_FAULT={FAULT!r}: choose one of {', '.join(FAULTS)}")
    FAULTS[FAULT]()

if __name__ == "__main__":
    sys.exit(run_train(sys.argv[1:]))
