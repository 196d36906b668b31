"""Which ways a config's model and batch split over N GPUs, and, when none does, why not.

A layout splits N GPUs into tensor T x context C x pipeline P x data D: T one of the model's tensor sizes inside a
node, C ranks sharing each sequence (`context_sizes`; C = 1 unless the config can run context parallelism, and only
without pipeline stages, as `bigtrain.config.context_checks` allows), P pipeline stages that each get a layer, and D
data-parallel ranks that each take whole sequences of the global batch (D divides train.global_batch_size). The
work is bounded whatever N is: divisors come from a factorization by trial division that stops at a limit
(`divisors`), pipeline sizes are tried only up to the number of pipeline layers (context sizes up to s / 2 /
MIN_CONTEXT_CHUNK), and a GPU count that no split reaches is refused saying which constraint it breaks
(`check_splits`) instead of searching nothing for minutes.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

from bigtrain.config import Config
from bigtrain.errors import ConfigError
from bigtrain.planning.memory_model import stages
from bigtrain.planning.shape import ModelShape, PipelineLayer

NEARBY_DATA_LIMIT = 2**20  # data-parallel sizes the suggestions of usable GPU counts go up to
MIN_CONTEXT_CHUNK = 128  # tokens: the zig-zag chunks (s / 2C each) the search goes down to, one flash-attention tile

Parts = dict[int, "list[tuple[PipelineLayer, ...]] | None"]


def divisors(n: int, limit: int | None = None) -> list[int]:
    """The divisors of n >= 1 (only those up to `limit`), ascending. Trial division runs up to min(sqrt(n), limit):
    a divisor up to the limit has no prime factor above it."""
    top = n if limit is None else min(n, limit)
    factors: list[tuple[int, int]] = []
    rest, p = n, 2
    while p * p <= rest and p <= top:
        power = 0
        while rest % p == 0:
            rest //= p
            power += 1
        if power:
            factors.append((p, power))
        p += 1
    if 1 < rest <= top:  # a prime left over (or a cofactor beyond the limit, which no wanted divisor holds)
        factors.append((rest, 1))
    found = [1]
    for prime, power in factors:
        found = [d * prime**k for d in found for k in range(power + 1) if d * prime**k <= top]
    return sorted(found)


@dataclass
class Splits:
    """The (T, C, P, D) splits of `gpus`, and how much was looked at to find them."""

    gpus: int
    found: list[tuple[int, int, int, int]] = field(default_factory=list)
    examined: int = 0  # (T, P) pairs looked at (each tries the context sizes at P = 1)


def context_problem(cfg: Config) -> str | None:
    """Why the config cannot run context parallelism at all (`bigtrain.config.context_checks` refuses it), or
    None."""
    p, m = cfg.parallel, cfg.model
    attention_dropout = m.dropout if m.attention_dropout is None else m.attention_dropout
    if p.engine == "fairscale":
        return "parallel.engine=fairscale does not run it"
    if attention_dropout > 0:
        return (f"it runs attention without dropout and model.attention_dropout is {attention_dropout} (set "
                f"model.attention_dropout=0 to plan it)")
    return None


def context_sizes(cfg: Config) -> list[int]:
    """The context sizes C the search tries: 1, and where the config can run context parallelism every C with
    data.seq_len divisible by 2C and chunks s / 2C of at least MIN_CONTEXT_CHUNK tokens."""
    seq = cfg.data.seq_len
    if context_problem(cfg) is not None or seq < 2 * MIN_CONTEXT_CHUNK:
        return [1]
    return divisors(seq // 2, limit=seq // (2 * MIN_CONTEXT_CHUNK))


def tensor_sizes(shape: ModelShape, gpus: int, gpus_per_node: int) -> list[int]:
    """The tensor sizes a layout of `gpus` may use: the model's, inside a node."""
    return [t for t in shape.tensor_sizes if t <= min(gpus_per_node, gpus)]


def pipeline_parts(cfg: Config, shape: ModelShape, p: int, parts: Parts) -> list[tuple[PipelineLayer, ...]] | None:
    """The stages of a `p`-stage pipeline (None: a stage would get no layer), computed once per size into `parts`."""
    if p not in parts:
        layers = stages(shape, p, cfg.parallel.partition_method) if p <= len(shape.layers) else []
        parts[p] = layers if layers and all(layers) else None
    return parts[p]


def layout_splits(cfg: Config, shape: ModelShape, gpus: int, gpus_per_node: int, parts: Parts) -> Splits:
    """Every (T, C, P, D) with T x C x P x D = gpus that the model, the sequence and the global batch allow
    (C > 1 only with P = 1)."""
    out = Splits(gpus)
    batch = cfg.train.global_batch_size
    contexts = context_sizes(cfg)
    for t in tensor_sizes(shape, gpus, gpus_per_node):
        if gpus % t:
            continue
        for p in divisors(gpus // t, limit=len(shape.layers)):
            out.examined += 1
            rest = gpus // (t * p)
            for c in (contexts if p == 1 else [1]):
                d = rest // c
                if rest % c == 0 and batch % d == 0 and pipeline_parts(cfg, shape, p, parts) is not None:
                    out.found.append((t, c, p, d))
    return out


def whole_nodes(n: int, gpus_per_node: int) -> bool:
    return n <= gpus_per_node or n % gpus_per_node == 0


def nearby_counts(cfg: Config, shape: ModelShape, gpus: int, gpus_per_node: int, parts: Parts
                  ) -> tuple[int | None, int | None]:
    """The largest GPU count below `gpus` and the smallest above it that some layout uses (whole nodes; data sizes
    up to NEARBY_DATA_LIMIT; pipeline sizes, or context sizes without stages), each checked with `layout_splits`."""
    batch_divisors = divisors(cfg.train.global_batch_size, limit=NEARBY_DATA_LIMIT)
    below, above = set(), set()
    splits = [*range(1, len(shape.layers) + 1), *(c for c in context_sizes(cfg) if c > 1)]  # P, or C with P = 1
    for t in tensor_sizes(shape, gpus_per_node, gpus_per_node):
        for p in splits:
            cut = bisect_right(batch_divisors, gpus // (t * p))
            lower = (t * p * d for d in reversed(batch_divisors[:cut]))
            upper = (t * p * d for d in batch_divisors[cut:])
            below.update(n for n in _first(lower, gpus_per_node) if n < gpus and t <= n)
            above.update(n for n in _first(upper, gpus_per_node) if n > gpus)
    def usable(n: int) -> bool:
        return bool(layout_splits(cfg, shape, n, gpus_per_node, parts).found)

    lower_count = next((n for n in sorted(below, reverse=True) if usable(n)), None)
    upper_count = next((n for n in sorted(above) if usable(n)), None)
    return lower_count, upper_count


def _first(counts, gpus_per_node: int) -> list[int]:
    """The first count that is whole nodes, as a list (empty when none is)."""
    return next(([n] for n in counts if whole_nodes(n, gpus_per_node)), [])


def check_splits(cfg: Config, shape: ModelShape, gpus: int, gpus_per_node: int, parts: Parts,
                 config_name: str = "this config") -> Splits:
    """The splits of `gpus`; none: a ConfigError naming the constraint, with the nearest GPU counts that work."""
    splits = layout_splits(cfg, shape, gpus, gpus_per_node, parts)
    if splits.found:
        return splits
    batch = cfg.train.global_batch_size
    sizes = tensor_sizes(shape, gpus, gpus_per_node)
    t_max, p_max, c_max = max(sizes), len(shape.layers), max(context_sizes(cfg))
    need = gpus / (t_max * max(p_max, c_max))
    context = (f"; with context parallelism C ranks share each sequence (C at most {c_max}, without pipeline stages: "
               f"data.seq_len={cfg.data.seq_len} divisible by 2C in chunks of at least {MIN_CONTEXT_CHUNK} tokens) "
               f"and D = {gpus} / (T x C)" if c_max > 1 else "")
    rule = (f"A layout splits the GPUs into tensor T x pipeline P x data D: T is one of {', '.join(map(str, sizes))} "
            f"(inside a node of {gpus_per_node} GPUs, dividing the heads, FFN width and vocabulary), P at most "
            f"{p_max} (the model's pipeline layers: no stage without one), and D must divide "
            f"train.global_batch_size={batch}, since each data-parallel rank takes whole sequences{context}")
    if need > batch:
        split = f"{t_max} x {max(p_max, c_max)}"
        why = (f"{gpus} GPUs need D >= {gpus} / ({split}) = {need:.4g}, more than the {batch} sequences of a step")
    else:
        if c_max > 1:
            why = f"no T, C and P (dividing {gpus}) leave a D = {gpus} / (T x C x P) that divides {batch}"
        else:
            why = f"no T and P (dividing {gpus}) leave a D = {gpus} / (T x P) that divides {batch}"
    lower, upper = nearby_counts(cfg, shape, gpus, gpus_per_node, parts)
    options = [f"--gpus {n} ({what} some layout uses)" for n, what in ((lower, f"the most below {gpus} that"),
                                                                      (upper, f"the fewest above {gpus} that"))
               if n is not None]
    fix = f"Plan for {' or '.join(options)}" if options else "No GPU count of whole nodes fits this batch"
    raise ConfigError(f"No layout of {config_name} uses {gpus} GPUs: {why}. {rule}. {fix}, or change "
                      f"train.global_batch_size.")
