"""Tokenizers (sentencepiece, HF tokenizers, tiktoken, GGUF-embedded) and chat formats.

    tok = text.load_tokenizer(path)
    ids = tok.encode("2 + 2 =")                      # special-token strings stay text
    prompt = tok.chat([{"role": "user", "content": q}], no_think=True)
    stop = tok.eos_ids
"""

from catjax.text.base import Tokenizer
from catjax.text.chat import FORMATS as CHAT_FORMATS
from catjax.text.chat import NO_THINK
from catjax.text.hf_backend import HFTokenizer
from catjax.text.sp_backend import SentencePieceTokenizer
from catjax.text.tiktoken_backend import TiktokenTokenizer
from catjax.text.tokenizers import load_tokenizer

__all__ = ["CHAT_FORMATS", "NO_THINK", "HFTokenizer", "SentencePieceTokenizer",
           "TiktokenTokenizer", "Tokenizer", "load_tokenizer"]
