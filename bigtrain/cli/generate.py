"""`bigtrain generate`: text from a trained model (greedy, sampling or beam search), on one device or, under a
launcher (`torchrun --nproc_per_node W -m bigtrain.cli generate ...`), split W ways by tensor parallelism.

The text goes through the run's tokenizer as in training: a causal prompt as it is (an empty one becomes the
end-of-document token, the start of a document), a seq2seq source followed by eos; the decoder starts from bos.
Generation stops at eos or after max_new_tokens; ids beyond the tokenizer's vocabulary are never chosen.

One prompt decoded greedily or by sampling is printed as it is generated (`TextStream`), so that a long request
(`--max-new-tokens 100000000`: a causal model slides past its context, there is no natural bound) shows its text
at once and Ctrl-C keeps what is on the screen. Several prompts (one batch) and beam search (whose tokens are only
known at the end) are printed when done.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bigtrain.cli.arguments import CommandParser, finite, text, whole
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

    @property
    def ending(self) -> str:
        return f"{self.new_tokens} new tokens, {'stopped at eos' if self.stopped_at_eos else 'no eos'}"

    def describe(self, index: int, total: int) -> str:
        return f"--- {index + 1}/{total}: {self.prompt!r} ({self.ending}) ---\n{self.text}"


class TextStream:
    """Prints the text of a growing list of token ids as each id arrives: the tokenizer decodes a short window
    twice, with and without the new ids, and the difference is printed (incremental detokenization as vLLM does
    it: each step costs a few tokens whatever the length, and a BPE merge or a leading space comes out as the whole
    text decodes). A trailing U+FFFD (an incomplete UTF-8 character) waits for the ids that complete it."""

    def __init__(self, decode: Callable[[list[int]], str], ids: list[int], write: Callable[[str], object]) -> None:
        self.decode, self.ids, self.write = decode, list(ids), write
        self.prefix, self.read = max(0, len(ids) - 5), len(ids)  # the window: ids[prefix:], printed to `read`

    def add(self, token: int) -> None:
        self.ids.append(token)
        self._emit(final=False)

    def close(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        before = self.decode(self.ids[self.prefix:self.read])
        after = self.decode(self.ids[self.prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.write(after[len(before):])
            self.prefix, self.read = self.read, len(self.ids)


def generate_text(path: Path, prompts: list[str], max_new_tokens: int, decoding: Decoding, seed: int = 0,
                  use_cache: bool = True, overrides: list[str] | None = None,
                  stream: Callable[[str], object] | None = None, step: int | None = None) -> list[Completion]:
    """Generate from every prompt at once (one batch) with the weights at `path` (a run.dir: its checkpoint of
    `step`, default the latest): on one device, or under a launcher with W ranks split W ways by tensor
    parallelism (every rank returns the same completions). `stream`: one prompt, greedy or sampled: its text (as
    `Completion.text`) is written there as it is generated."""
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
    shown = None
    if stream is not None:
        if len(prompts) != 1 or decoding.mode == "beam":
            raise GenerationError("only one prompt decoded greedily or by sampling is streamed; beam search and "
                                  "several prompts are printed when done.")
        shown = TextStream(tok.decode, encoded[0] if family == "causal" else [], stream)
        stream(tok.decode(shown.ids))  # a causal completion starts with its prompt
    new = generate(loaded.model, inputs, max_new_tokens, decoding, eos_id=tok.eos_id, pad_id=tok.pad_id,
                   bos_id=tok.bos_id, seed=seed, use_cache=use_cache and loaded.pad_multiple == 1,
                   vocab_limit=tok.vocab_size, full_logits=loaded.full_logits, pad_multiple=loaded.pad_multiple,
                   on_token=None if shown is None else lambda row, token: shown.add(token))
    if shown is not None:
        shown.close()
    return [Completion(prompt, tok.decode(ids + tokens) if family == "causal" else tok.decode(tokens),
                       len(tokens), bool(tokens) and tokens[-1] == tok.eos_id)
            for prompt, ids, tokens in zip(prompts, encoded, new, strict=True)]


def _flag(name: str, value: object) -> str:
    flag = "--" + name.replace("_", "-")
    return flag if value is True else f"{flag} {value}"


SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed takes


def run_generate(argv: list[str]) -> int:
    parser = CommandParser(
        prog="bigtrain generate", description="Continue prompts (causal) or answer sources (seq2seq) with a "
        "trained model, all prompts in one batch, with a KV cache: on one device, or under a launcher with W ranks "
        "(torchrun --nproc_per_node W -m bigtrain.cli generate ...) split W ways by tensor parallelism. Greedy by "
        "default; sampling with any of --temperature / --top-k / --top-p; beam search with --beams. One prompt "
        "(greedy or sampled) is printed as it is generated; several prompts and beam search when done.")
    parser.add_argument("checkpoint",
                        help="a run.dir (its latest checkpoint), a checkpoint folder, or a folder written by "
                             "`bigtrain export` or `bigtrain consolidate`")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides (e.g. train.device=cpu)")
    parser.add_argument("--step", type=whole, metavar="N",
                        help="the checkpoint of step N of a run.dir (default: the latest)")
    parser.add_argument("--prompt", type=text, action="append", required=True, metavar="TEXT",
                        help="a prompt (seq2seq: a source); repeat for several, generated as one batch")
    parser.add_argument("--max-new-tokens", type=whole, default=100, metavar="N", help="at most N new tokens "
                        "per prompt (default 100); generation also stops at eos")
    parser.add_argument("--greedy", action="store_true", help="the most likely token each step (the default)")
    parser.add_argument("--temperature", type=finite, metavar="T", help="sample from softmax(logits / T)")
    parser.add_argument("--top-k", type=whole, metavar="K", help="sample among the K most likely tokens")
    parser.add_argument("--top-p", type=finite, metavar="P",
                        help="sample among the most likely tokens whose probabilities sum to P")
    parser.add_argument("--beams", type=whole, default=1, metavar="B", help="beam search with B beams "
                        "(transformers' semantics)")
    parser.add_argument("--length-penalty", type=finite, metavar="A", help="beam search: hypotheses scored "
                        "sum(log p) / length^A (default 1.0)")
    parser.add_argument("--seed", type=whole, default=0, help=f"seed of the sampling generator, {SEED_RANGE[0]} to "
                        f"2^64 - 1 (default 0)")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the whole context each step instead of keeping keys and values")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    args = parser.parse(argv, path="checkpoint")

    def command() -> int:
        import torch.distributed as dist

        started_with_group = dist.is_initialized()

        options = dict(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       beams=args.beams, length_penalty=args.length_penalty)
        problems = decoding_problems(**options, spell=_flag)
        if args.max_new_tokens < 1:
            problems.append(f"--max-new-tokens {args.max_new_tokens}: give at least 1.")
        if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
            problems.append(f"--seed {args.seed}: give a whole number from {SEED_RANGE[0]} to 2^64 - 1 "
                            f"({SEED_RANGE[1]}).")
        if problems:
            raise UsageError(problems[0])
        decoding = Decoding(**options)
        main = detect_env().is_main  # under a launcher, every tensor-parallel rank holds the same completions
        streamed = main and len(args.prompt) == 1 and decoding.mode != "beam"
        write = _writer(f"--- 1/1: {args.prompt[0]!r} ---\n")  # the header once the weights are loaded
        completions = generate_text(args.checkpoint, args.prompt, args.max_new_tokens, decoding, args.seed,
                                    not args.no_cache, args.overrides, stream=write if streamed else None,
                                    step=args.step)
        if streamed:
            print(f"\n--- 1/1: {completions[0].ending} ---", flush=True)
        elif main:
            for index, completion in enumerate(completions):
                print(completion.describe(index, len(completions)), flush=True)
        if dist.is_initialized() and not started_with_group:  # ours (a launcher's ranks): leave together, since
            dist.barrier()                                   # a group alive at exit can abort the interpreter
            dist.destroy_process_group()
        return 0

    return run_guarded(command, args.debug)


def _writer(header: str) -> Callable[[str], None]:
    """Writes pieces of text to stdout at once, the first after `header`."""
    pending = [header]

    def write(piece: str) -> None:
        sys.stdout.write("".join(pending) + piece)
        sys.stdout.flush()
        pending.clear()

    return write
