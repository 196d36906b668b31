"""The tokenizer files of a Hugging Face export, so that `AutoTokenizer.from_pretrained(DIR)` encodes as the run did:
tokenizer.json, tokenizer_config.json and special_tokens_map.json.

A byte-tokenizer run (`data.tokenizer: byte`) has no tokenizer file, so one is built here with the `tokenizers`
library: a BPE model without merges over GPT-2's byte-level alphabet (each byte b is one printable character,
`byte_chars()[b]`, whose id is b), the ByteLevel pre-tokenizer (no regex split, no prefix space: every UTF-8 byte
of the text is one token, whitespace and newlines included) and the ByteLevel decoder (characters back to bytes,
then UTF-8). The special tokens are bigtrain's ids 256-259, spelled as `HFTokenizer` looks for them (<pad>, </s>,
<mask>, <s>), so the file also reads back as `data.tokenizer` with the same ids. As bigtrain does, text that
spells a special token stays text (`split_special_tokens`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bigtrain.data.tokenizer import ByteTokenizer, Tokenizer

BYTE_SPECIALS = {"pad": "<pad>", "eos": "</s>", "mask": "<mask>", "bos": "<s>"}


def byte_chars() -> list[str]:
    """GPT-2's byte -> character table: bytes that print as themselves in Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ')
    keep their code point; the other 68 (controls, space, soft hyphen, ...) take 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_tokenizer_json(tok: ByteTokenizer) -> str:
    """The byte tokenizer as a tokenizer.json (ids 0-255 the bytes, then its special ids)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    rust = RustTokenizer(models.BPE(vocab={c: b for b, c in enumerate(byte_chars())}, merges=[]))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    rust.decoder = decoders.ByteLevel()
    ids = {"pad": tok.pad_id, "eos": tok.eos_id, "mask": tok.mask_id, "bos": tok.bos_id}
    for role in sorted(ids, key=ids.__getitem__):  # added tokens take the next free id: 256, 257, ...
        rust.add_special_tokens([AddedToken(BYTE_SPECIALS[role], special=True, normalized=False)])
        if rust.token_to_id(BYTE_SPECIALS[role]) != ids[role]:
            raise AssertionError(f"the byte tokenizer's {role} id {ids[role]} is not the next one after the bytes")
    return rust.to_str()


def _spelling(tokenizer: Tokenizer, token_id: int) -> str | None:
    """The text of special token `token_id` (None if the tokenizer cannot say)."""
    if isinstance(tokenizer, ByteTokenizer):
        roles = {tokenizer.pad_id: "pad", tokenizer.eos_id: "eos", tokenizer.mask_id: "mask", tokenizer.bos_id: "bos"}
        return BYTE_SPECIALS[roles[token_id]]
    return tokenizer.token(token_id) if hasattr(tokenizer, "token") else None


def write_tokenizer(tokenizer: Tokenizer, out: Path, max_len: int) -> list[str]:
    """Write the run's tokenizer into the export folder `out` (a model of `max_len` positions); returns the
    names written (none for a tokenizer that is neither bigtrain's byte tokenizer nor a tokenizer.json)."""
    if isinstance(tokenizer, ByteTokenizer):
        (out / "tokenizer.json").write_text(byte_tokenizer_json(tokenizer))
    elif hasattr(tokenizer, "save"):  # a tokenizer.json run: with the special tokens bigtrain added
        tokenizer.save(out / "tokenizer.json")
    else:
        return []
    roles = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "pad_token": tokenizer.pad_id,
             "mask_token": tokenizer.mask_id}
    specials = {role: _spelling(tokenizer, token_id) for role, token_id in roles.items()}
    specials = {role: token for role, token in specials.items() if token is not None}
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "model_max_length": max_len,
                              "split_special_tokens": True, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n")
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
