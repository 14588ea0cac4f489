"""`load_tokenizer(path)`: pick the backend from what the file is.

- a directory: its tokenizer.json, else tokenizer.model, else its one .gguf file
- tokenizer.json (hub layout, with tokenizer_config.json beside it): `HFTokenizer`
- a .gguf file: its embedded tokenizer and chat template
- tokenizer.model: tiktoken ranks (text lines `base64 rank`, Llama 3's original file) or a
  sentencepiece protobuf (Gemma 3)
"""

from __future__ import annotations

from pathlib import Path

from catjax.gguf_file import MAGIC as GGUF_MAGIC
from catjax.text.base import Tokenizer
from catjax.text.gguf_backend import load_gguf_tokenizer
from catjax.text.hf_backend import HFTokenizer
from catjax.text.sp_backend import SentencePieceTokenizer
from catjax.text.tiktoken_backend import TiktokenTokenizer, is_ranks_file


def load_tokenizer(path: str | Path, chat_format: str | None = None) -> Tokenizer:
    """Load a tokenizer file or directory. `chat_format` forces a chat format ('template',
    'gemma3', 'llama3', 'qwen3', 'chatml'); by default the files' template, else detected."""
    path = Path(path)
    if path.is_dir():
        path = _pick_in_dir(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such tokenizer file")
    with open(path, "rb") as f:
        head = f.read(256)
    tok: Tokenizer
    if head.startswith(GGUF_MAGIC):
        tok = load_gguf_tokenizer(path)
    elif head.lstrip().startswith(b"{"):
        tok = HFTokenizer.from_files(path)
    elif is_ranks_file(head):
        tok = TiktokenTokenizer(path)
    elif head[:1] == b"\x0a":  # a protobuf whose first field (the pieces) is length-delimited
        tok = SentencePieceTokenizer(path)
    else:
        raise ValueError(f"{path}: not a tokenizer file I recognise (expected tokenizer.json, "
                         "a sentencepiece model, a tiktoken ranks file or a .gguf)")
    if chat_format is not None:
        tok.chat_format = chat_format
    return tok


def _pick_in_dir(d: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer.model"):
        if (d / name).is_file():
            return d / name
    ggufs = sorted(d.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    found = ", ".join(p.name for p in ggufs) or "none"
    raise ValueError(f"{d}: no tokenizer.json or tokenizer.model, and not exactly one .gguf "
                     f"(found {found})")
