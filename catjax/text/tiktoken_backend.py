"""tiktoken ranks files in Llama 3's layout (its original `tokenizer.model`).

The ranks file holds only the merges (`base64-token rank` per line). The split regex and the 256
special tokens that follow the ranks are Llama 3's convention, fixed in code, so we build the
`tiktoken.Encoding` here (never `tiktoken.get_encoding`, which downloads).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from pathlib import Path

from catjax.text.base import Tokenizer

# Llama 3's pre-tokenizer: contractions, letters with one optional leading non-letter, numbers
# in groups of up to three digits, punctuation runs, newlines, other whitespace.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_SPECIAL = 256

# Named special tokens by offset after the ranks; every other offset is a reserved token.
_NAMED = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>",
          5: "<|step_id|>", 6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>",
          9: "<|eot_id|>", 10: "<|python_tag|>", 11: "<|image|>"}


def llama3_special_tokens(num_base: int) -> dict[str, int]:
    """Llama 3's special tokens, numbered from `num_base` (128000 for the real vocabulary)."""
    out, reserved = {}, 0
    for k in range(NUM_SPECIAL):
        name = _NAMED.get(k)
        if name is None:
            name, reserved = f"<|reserved_special_token_{reserved}|>", reserved + 1
        out[name] = num_base + k
    return out


def is_ranks_file(head: bytes) -> bool:
    """Whether the first bytes of a file look like tiktoken ranks (`base64 rank` text lines)."""
    line = head.split(b"\n", 1)[0].strip()
    parts = line.split(b" ")
    if len(parts) != 2 or not parts[1].isdigit():
        return False
    try:
        base64.b64decode(parts[0], validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def load_ranks(path: str | Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise ValueError(f"{path}:{n}: not a tiktoken ranks line ('base64 rank')") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: tiktoken ranks are not 0..{len(ranks) - 1} without gaps")
    return ranks


class TiktokenTokenizer(Tokenizer):
    def __init__(self, path: str | Path):
        import tiktoken

        self.name = str(path)
        ranks = load_ranks(path)
        self.num_base = len(ranks)
        self._ranks = ranks
        self.specials = llama3_special_tokens(self.num_base)
        self.enc = tiktoken.Encoding(name=Path(path).name, pat_str=LLAMA3_SPLIT,
                                     mergeable_ranks=ranks, special_tokens=self.specials)
        self.bos_id = self.specials["<|begin_of_text|>"]
        self.pad_id = self.specials["<|finetune_right_pad_id|>"]
        self.eos_ids = self._end_ids(self.specials["<|end_of_text|>"])
        self.template_tokens = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}

    @property
    def vocab_size(self) -> int:
        return self.num_base + NUM_SPECIAL

    def encode(self, text: str, add_bos: bool = False, allow_special: bool = False) -> list[int]:
        ids = (self.enc.encode(text, allowed_special="all") if allow_special
               else self.enc.encode_ordinary(text))
        return self._with_bos(ids, add_bos)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i < self.num_base]
        return self.enc.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        if token in self.specials:
            return self.specials[token]
        return self._ranks.get(token.encode("utf-8"))

    def id_to_token(self, token_id: int) -> str:
        return self.enc.decode_single_token_bytes(int(token_id)).decode("utf-8", errors="replace")
