"""bigtrain's model as an lm-eval-harness model (`lm_eval.api.model.LM`), for `bigtrain eval-harness`.

    loglikelihood          (context, continuation) -> (log p(continuation | context), greedy): `scoring.py`
    loglikelihood_rolling  (text,) -> log p(text), the text cut into windows of model.max_seq_len tokens, each
                           token predicted once with as much context as fits (lm-eval's rolling windows),
                           the first from eos (the start of a document)
    generate_until         (context, {until, max_gen_toks}) -> greedy continuation with the KV cache
                           (`generate.py`; requests of equal options in one batch), cut before the first `until`
                           string

Text goes through the run's tokenizer as in training and `bigtrain generate`: context and continuation are
encoded separately (byte-level: exactly the bytes; a BPE merge across the boundary is not formed), an empty
context becomes eos. Causal models only. Under a launcher every tensor-parallel rank runs every request (the
forward is collective): lm-eval sees one process on each rank.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from bigtrain.errors import GenerationError
from bigtrain.inference.generate import Decoding, generate
from bigtrain.inference.load import LoadedModel
from bigtrain.inference.scoring import continuation_logprobs

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default for generate_until


class BigtrainLM(LM):
    """A loaded bigtrain model (`load_model` / `load_tensor_parallel`) answering lm-eval's three requests."""

    def __init__(self, loaded: LoadedModel, batch_size: int = 16) -> None:
        super().__init__()
        if loaded.cfg.model.family != "causal":
            raise GenerationError(f"lm-eval scores continuations of text: it needs a causal model, not "
                                  f"model.family={loaded.cfg.model.family}.")
        self.loaded, self.batch_size = loaded, batch_size
        self.tok, self.model = loaded.tokenizer, loaded.model
        self.max_len = loaded.cfg.model.max_seq_len // loaded.pad_multiple * loaded.pad_multiple
        self._device = loaded.device

    def _context(self, text: str) -> list[int]:
        return self.tok.encode(text) or [self.tok.eos_id]

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        loaded = self.loaded
        return continuation_logprobs(self.model, pairs, pad_id=self.tok.pad_id, vocab_limit=self.tok.vocab_size,
                                     full_logits=loaded.full_logits, pad_multiple=loaded.pad_multiple,
                                     batch_size=self.batch_size)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for request in requests:
            context, continuation = request.args
            pairs.append((self._context(context), self.tok.encode(continuation)))
        results = self._score(pairs)
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        totals = []
        for request in requests:
            (text,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok.encode(text), prefix_token=self.tok.eos_id, max_seq_len=self.max_len, context_len=1)]
            total = sum(logprob for logprob, _ in self._score(windows)) if windows else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            totals.append(total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Requests with the same stop strings and length are decoded together, `batch_size` prompts at a time
        (left-padded: `decoder_rows.CausalRows`)."""
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        contexts = []
        for index, request in enumerate(requests):
            context, kwargs = request.args
            until, max_new = self._generation_options(dict(kwargs or {}))
            groups.setdefault((until, max_new), []).append(index)
            contexts.append(self._context(context)[-self.max_len:])
        out = [""] * len(requests)
        loaded = self.loaded
        for (until, max_new), indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                new = generate(self.model, [contexts[i] for i in chunk], max_new, Decoding(), eos_id=self.tok.eos_id,
                               pad_id=self.tok.pad_id, use_cache=loaded.pad_multiple == 1,
                               vocab_limit=self.tok.vocab_size, full_logits=loaded.full_logits,
                               pad_multiple=loaded.pad_multiple)
                for i, tokens in zip(chunk, new, strict=True):
                    if tokens and tokens[-1] == self.tok.eos_id:
                        tokens = tokens[:-1]
                    text = self.tok.decode(tokens)
                    text = text[:min((text.find(stop) for stop in until if stop in text), default=len(text))]
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    out[i] = text
        return out

    @staticmethod
    def _generation_options(kwargs: dict[str, Any]) -> tuple[tuple[str, ...], int]:
        """(stop strings, max new tokens) of a request's generation kwargs; sampling is refused."""
        if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0.0:
            raise GenerationError(f"generate_until asks for sampling ({kwargs}); bigtrain's lm-eval adapter "
                                  f"decodes greedily only (do_sample: false, temperature: 0).")
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        return tuple(stop for stop in until if stop), int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
