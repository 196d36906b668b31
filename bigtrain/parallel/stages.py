"""This rank's pipeline stages of a bigtrain model, for `torch.distributed.pipelining` (`parallel.pipeline_schedule`).

The model's layer sequence (`bigtrain.parallel.pipeline.layer_specs`: [position bias] → embed → blocks → norm →
[head transform] → head → [logit bias]) is cut by bigtrain's partitioner (`pipeline_module.check_stages`, the
same cut DeepSpeed's pipeline engine makes) into S = p·V stages, p pipeline ranks holding V stages each:

    loop placement (1f1b, gpipe: V = 1; interleaved_1f1b, zero_bubble: V ≥ 2)   rank r holds r, r + p, …, r + (V-1)p
    V-shaped placement (dualpipev: V = 2)                                       rank r holds r and 2p - 1 - r

Each stage is a `StageModule`: its layers in order, every layer the same pipe module (`BlockPipe`, `EmbedPipe`,
...) the DeepSpeed pipeline builds, so each layer registers its parameters under the unsplit model's names
(`model_parameters` strips the stage's own prefix). What crosses a stage boundary is a tuple of tensors, passed
as positional arguments (torch's pipelining sends tensors only; the int64 masks and ids get no gradient).

The embedding is built once per rank ("embed" in DeepSpeed's `TiedLayerSpec` terms): where one rank holds several
of its uses (the input embedding, the seq2seq decoder's, the tied head: V-shaped placement puts stage 0 and the
last stage on rank 0), they share one set of parameters and autograd sums their gradients. Uses on different ranks
hold equal copies whose gradients `bigtrain.parallel.schedules.reduce_tied_grads` sums; the copies on every rank
but the first that holds one are marked (`mark_tied_copies`), so norms and checkpoints count the embedding once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bigtrain.compat.deepspeed_import import import_deepspeed
from bigtrain.models import TransformerLM
from bigtrain.parallel.context.inputs import ContextInputs
from bigtrain.parallel.pipeline import layer_specs
from bigtrain.parallel.pipeline_module import check_stages

V_SHAPED = ("dualpipev",)


def stage_indices(rank: int, pipeline: int, virtual_stages: int, schedule: str) -> list[int]:
    """The stages (of pipeline · virtual_stages) that pipeline rank `rank` holds, in increasing order."""
    if schedule in V_SHAPED:
        if virtual_stages != 2:
            raise ValueError(f"{schedule} places exactly 2 stages per rank in a V, not {virtual_stages}")
        return [rank, 2 * pipeline - 1 - rank]
    return [rank + k * pipeline for k in range(virtual_stages)]


def stage_rank(stage: int, pipeline: int, virtual_stages: int, schedule: str) -> int:
    """The pipeline rank that holds `stage`."""
    for rank in range(pipeline):
        if stage in stage_indices(rank, pipeline, virtual_stages, schedule):
            return rank
    raise ValueError(f"stage {stage} outside {pipeline} x {virtual_stages} stages")


class _Join(torch.autograd.Function):
    """y, unchanged, made to depend on `anchor` in the autograd graph (its gradient to `anchor` is None)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return y.detach()  # the same storage, not a view (torch detaches stage outputs in place)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ContiguousGrad(torch.autograd.Function):
    """x, unchanged; its gradient made contiguous (what the stage sends back to the previous one)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def join_outputs(out, inputs: tuple[torch.Tensor, ...]):
    """`out` with every floating tensor joined (`_Join`) to the first floating input that requires a gradient.

    Zero-bubble schedules (zero_bubble, dualpipev) split a stage's backward into input gradients (I) and weight
    gradients (W): torch finds each parameter's gradient from the first node where its path meets the stages'
    inputs' paths, and drops parameters whose path reaches an output without meeting them (the decoder's
    embedding or a position-bias table on a middle stage: their outputs depend on weights and int64 ids only).
    Joined, every output meets an input; values and gradients are unchanged."""
    anchor = next((t for t in inputs if t.is_floating_point() and t.requires_grad), None)
    if anchor is None or not torch.is_grad_enabled():
        return out
    if isinstance(out, torch.Tensor):
        return _Join.apply(out, anchor) if out.is_floating_point() else out
    return tuple(_Join.apply(t, anchor) if t.is_floating_point() else t for t in out)


class StageModule(nn.Module):
    """Consecutive pipeline layers of one stage: forward(*tensors) feeds the tuple (one tensor as itself) through
    each layer (`forward_fn(layer, x)` where the layer spec names one, as the tied embedding's decoder and head
    uses do) and returns what the last layer returns (a tensor or a tuple of tensors; see `join_outputs`)."""

    def __init__(self, layers: list[nn.Module], forward_fns: list[Callable | None], first_layer: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.forward_fns = forward_fns
        self.first_layer = first_layer  # index of layers[0] in the model's layer sequence

    def forward(self, *tensors: torch.Tensor):
        # What crosses a boundary, both ways, is contiguous: torch receives into buffers of the sender's strides
        # and gloo takes contiguous buffers only, while sequence parallelism's shards are transposed views (its
        # first operation on a stage's input transposes it, so autograd's input gradient is one too).
        inputs = tuple(_ContiguousGrad.apply(t) if t.is_floating_point() and t.requires_grad else t
                       for t in tensors)
        x = inputs[0] if len(inputs) == 1 else inputs
        for layer, fn in zip(self.layers, self.forward_fns, strict=True):
            x = fn(layer, x) if fn is not None else layer(x)
        x = x.contiguous() if isinstance(x, torch.Tensor) else tuple(t.contiguous() for t in x)
        return join_outputs(x, tensors)


def model_parameters(stages: list[StageModule]) -> dict[str, nn.Parameter]:
    """This rank's parameters under the unsplit model's names (`blocks.3.attn.qkv.weight`, `embed.tokens.weight`),
    each once (a tied head is the embedding's weight)."""
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for stage in stages:
        for name, p in stage.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            out[name.split(".", 2)[2]] = p  # drop "layers.<i>."
    return out


@dataclass
class RankStages:
    """What one pipeline rank holds: its stage indices (increasing), their modules, the layer bounds of all stages
    ([b_0 = 0, …, b_S]), and the names of the tied embedding's parameters on this rank ([] if it holds none)."""

    indices: list[int]
    modules: list[StageModule]
    bounds: list[int]
    embed_names: list[str]
    embed_ranks: list[int]  # pipeline ranks that hold a use of the embedding
    rank: int = 0  # this pipeline rank


def build_rank_stages(model: TransformerLM, rank: int, pipeline: int, virtual_stages: int, schedule: str,
                      partition_method: str, materialize: Callable[[nn.Module], None], documents: bool = False,
                      context: ContextInputs | None = None) -> RankStages:
    """This rank's stage modules of `model` (built on the meta device; `materialize` allocates and initializes a
    piece, as for DeepSpeed's pipeline). Refuses (ConfigError, naming the keys) a cut that leaves a stage empty.
    `context`: the causal or masked stack is split over a context group (`layer_specs`)."""
    import_deepspeed()
    from deepspeed.pipe import TiedLayerSpec

    specs = layer_specs(model, materialize, documents, context)
    n_stages = pipeline * virtual_stages
    bounds = [int(b) for b in check_stages(specs, n_stages, partition_method, virtual_stages=virtual_stages)]
    mine = stage_indices(rank, pipeline, virtual_stages, schedule)
    tied: dict[str, nn.Module] = {}  # one module per tie key on this rank

    def build(spec) -> nn.Module:
        if isinstance(spec, TiedLayerSpec):
            if spec.key not in tied:
                tied[spec.key] = spec.build()
            return tied[spec.key]
        return spec.build()

    modules = []
    for s in mine:
        lo, hi = bounds[s], bounds[s + 1]
        layers = [build(spec) for spec in specs[lo:hi]]
        fns = [getattr(spec, "forward_fn", None) for spec in specs[lo:hi]]
        modules.append(StageModule(layers, fns, lo))
    embed_stages = {next(s for s in range(n_stages) if bounds[s] <= i < bounds[s + 1])
                    for i, spec in enumerate(specs) if isinstance(spec, TiedLayerSpec)}
    embed_ranks = sorted({stage_rank(s, pipeline, virtual_stages, schedule) for s in embed_stages})
    embed_names = [f"embed.{n}" for n, _ in model.embed.named_parameters()] if "embed" in tied else []
    return RankStages(mine, modules, bounds, embed_names, embed_ranks, rank)


def mark_tied_copies(model: TransformerLM, stages: RankStages) -> None:
    """Mark the embedding's parameters as a tied copy (`tied_copy`) on a pipeline rank that holds a use of it
    but is not the first such rank: gradient norms skip them and checkpoints are written by the first rank."""
    if stages.embed_names and stages.embed_ranks and stages.rank != stages.embed_ranks[0]:
        for p in model.embed.parameters():
            p.tied_copy = True
