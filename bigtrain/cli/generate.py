"""`bigtrain generate`: text from a trained model (greedy, sampling or beam search), on one device or, under a
launcher (`torchrun --nproc_per_node W -m bigtrain.cli generate ...`), split W ways by tensor parallelism.

The text goes through the run's tokenizer as in training: a causal prompt as it is (an empty one becomes the
end-of-document token, the start of a document), a seq2seq source followed by eos; the decoder starts from bos.
Generation stops at eos or after max_new_tokens; ids beyond the tokenizer's vocabulary are never chosen.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from bigtrain.cli.report import run_guarded
from bigtrain.distributed import detect_env
from bigtrain.errors import GenerationError, UsageError
from bigtrain.inference.generate import Decoding, decoding_problems, generate
from bigtrain.inference.load import load_model, load_tensor_parallel


@dataclass
class Completion:
    """One prompt and what the model generated after it."""

    prompt: str
    text: str  # causal: the prompt followed by the new text; seq2seq: the new text
    new_tokens: int
    stopped_at_eos: bool

    def describe(self, index: int, total: int) -> str:
        end = "stopped at eos" if self.stopped_at_eos else "no eos"
        return f"--- {index + 1}/{total}: {self.prompt!r} ({self.new_tokens} new tokens, {end}) ---\n{self.text}"


def generate_text(path: Path, prompts: list[str], max_new_tokens: int, decoding: Decoding, seed: int = 0,
                  use_cache: bool = True, overrides: list[str] | None = None, step: int | None = None
                  ) -> list[Completion]:
    """Generate from every prompt at once (one batch) with the weights at `path` (a run.dir: its checkpoint of
    `step`, default the latest): on one device, or under a launcher with W ranks split W ways by tensor
    parallelism (every rank returns the same completions)."""
    loaded = (load_tensor_parallel(path, overrides, step) if detect_env().world_size > 1
              else load_model(path, overrides, step))
    tok, family = loaded.tokenizer, loaded.cfg.model.family
    if family not in ("causal", "seq2seq"):
        raise GenerationError(f"{path}: model.family={family} has no generation (a masked LM fills in blanks, it "
                              f"does not continue text); bigtrain generate needs a causal or seq2seq model.")
    encoded = [tok.encode(p) for p in prompts]
    if family == "seq2seq":
        inputs = [[*ids, tok.eos_id] for ids in encoded]
    else:
        inputs = [ids or [tok.eos_id] for ids in encoded]
    new = generate(loaded.model, inputs, max_new_tokens, decoding, eos_id=tok.eos_id, pad_id=tok.pad_id,
                   bos_id=tok.bos_id, seed=seed, use_cache=use_cache and loaded.pad_multiple == 1,
                   vocab_limit=tok.vocab_size, full_logits=loaded.full_logits, pad_multiple=loaded.pad_multiple)
    return [Completion(prompt, tok.decode(ids + tokens) if family == "causal" else tok.decode(tokens),
                       len(tokens), bool(tokens) and tokens[-1] == tok.eos_id)
            for prompt, ids, tokens in zip(prompts, encoded, new, strict=True)]


def _flag(name: str, value: object) -> str:
    flag = "--" + name.replace("_", "-")
    return flag if value is True else f"{flag} {value}"


def run_generate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="bigtrain generate", description="Continue prompts (causal) or answer sources (seq2seq) with a "
        "trained model, all prompts in one batch, with a KV cache: on one device, or under a launcher with W ranks "
        "(torchrun --nproc_per_node W -m bigtrain.cli generate ...) split W ways by tensor parallelism. Greedy by "
        "default; sampling with any of --temperature / --top-k / --top-p; beam search with --beams.")
    parser.add_argument("checkpoint", type=Path,
                        help="a run.dir (its latest checkpoint), a checkpoint folder, or a folder written by "
                             "`bigtrain export` or `bigtrain consolidate`")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides (e.g. train.device=cpu)")
    parser.add_argument("--step", type=int, metavar="N",
                        help="the checkpoint of step N of a run.dir (default: the latest)")
    parser.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                        help="a prompt (seq2seq: a source); repeat for several, generated as one batch")
    parser.add_argument("--max-new-tokens", type=int, default=100, metavar="N", help="at most N new tokens "
                        "per prompt (default 100); generation also stops at eos")
    parser.add_argument("--greedy", action="store_true", help="the most likely token each step (the default)")
    parser.add_argument("--temperature", type=float, metavar="T", help="sample from softmax(logits / T)")
    parser.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely tokens")
    parser.add_argument("--top-p", type=float, metavar="P",
                        help="sample among the most likely tokens whose probabilities sum to P")
    parser.add_argument("--beams", type=int, default=1, metavar="B", help="beam search with B beams "
                        "(transformers' semantics)")
    parser.add_argument("--length-penalty", type=float, metavar="A", help="beam search: hypotheses scored "
                        "sum(log p) / length^A (default 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the whole context each step instead of keeping keys and values")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    args = parser.parse_intermixed_args(argv)

    def command() -> int:
        import torch.distributed as dist

        started_with_group = dist.is_initialized()

        options = dict(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       beams=args.beams, length_penalty=args.length_penalty)
        problems = decoding_problems(**options, spell=_flag)
        if args.max_new_tokens < 1:
            problems.append(f"--max-new-tokens {args.max_new_tokens}: give at least 1.")
        if problems:
            raise UsageError(problems[0])
        completions = generate_text(args.checkpoint, args.prompt, args.max_new_tokens, Decoding(**options),
                                    args.seed, not args.no_cache, args.overrides, args.step)
        if detect_env().is_main:  # under a launcher, every tensor-parallel rank holds the same completions
            for index, completion in enumerate(completions):
                print(completion.describe(index, len(completions)), flush=True)
        if dist.is_initialized() and not started_with_group:  # ours (a launcher's ranks): leave together, since
            dist.barrier()                                   # a group alive at exit can abort the interpreter
            dist.destroy_process_group()
        return 0

    return run_guarded(command, args.debug)
