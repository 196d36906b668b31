"""`bigtrain generate`: text from a trained model (greedy, sampling or beam search), on one device or, under a
launcher (`torchrun --nproc_per_node W -m bigtrain.cli generate ...`), split W ways by tensor parallelism."""

from __future__ import annotations

import argparse
from pathlib import Path

from bigtrain.cli.report import run_guarded


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

        from bigtrain.errors import UsageError
        from bigtrain.inference.generate import Decoding, decoding_problems
        from bigtrain.inference.generate_command import generate_text

        started_with_group = dist.is_initialized()

        options = dict(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       beams=args.beams, length_penalty=args.length_penalty)
        problems = decoding_problems(**options, spell=_flag)
        if args.max_new_tokens < 1:
            problems.append(f"--max-new-tokens {args.max_new_tokens}: give at least 1.")
        if problems:
            raise UsageError(problems[0])
        completions = generate_text(args.checkpoint, args.prompt, args.max_new_tokens, Decoding(**options),
                                    args.seed, not args.no_cache, args.overrides)
        from bigtrain.distributed import detect_env

        if detect_env().is_main:  # under a launcher, every tensor-parallel rank holds the same completions
            for index, completion in enumerate(completions):
                print(completion.describe(index, len(completions)), flush=True)
        if dist.is_initialized() and not started_with_group:  # ours (a launcher's ranks): leave together, since
            dist.barrier()                                   # a group alive at exit can abort the interpreter
            dist.destroy_process_group()
        return 0

    return run_guarded(command, args.debug)
