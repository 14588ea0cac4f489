"""The tokenizer interface every backend implements, and what they share.

One contract across backends: `encode(text)` treats special-token strings in `text` as plain text
(a prompt cannot forge a turn marker); `encode(text, allow_special=True)` turns them into their
ids, which is how a rendered chat is tokenized (as transformers' `apply_chat_template` does).
Tokens a vocabulary always matches whole (Qwen's `<think>`, Gemma's `<start_of_turn>`) are matched
whole in both modes, as the reference libraries do.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Iterable, Sequence
from typing import Any

from catjax.text import chat as chat_lib

# Turn/generation enders across the model families we support; eos_ids adds those present.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>",
              "<end_of_turn>", "<eos>")


class Tokenizer(abc.ABC):
    """Text <-> token ids, plus chat formatting. Backends set the attributes in `__init__`."""

    name: str  # the file it came from, for error messages
    bos_id: int | None  # what encode(add_bos=True) prepends; None where the model uses no BOS
    pad_id: int
    eos_ids: tuple[int, ...]  # every id that ends a turn or a generation
    chat_template: str | None = None  # Jinja chat template carried by the files, if any
    # Strings the template may use for {{ bos_token }} etc. (as transformers passes them).
    template_tokens: dict[str, str]
    # Special and always-whole tokens (added tokens, control/user-defined pieces) by spelling.
    specials: dict[str, int]

    _chat_format: str | None = None

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (may be below the model's embedding rows)."""

    @abc.abstractmethod
    def encode(self, text: str, add_bos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings count as text unless `allow_special`."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids`; special tokens are dropped when `skip_special`."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of one vocabulary entry (as the vocabulary spells it), or None if absent."""

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """Vocabulary spelling of one id."""

    # -- chat -------------------------------------------------------------------------------

    @property
    def chat_format(self) -> str:
        """'template' (render `chat_template`) or a built-in format name; see `chat.FORMATS`."""
        if self._chat_format is None:
            self._chat_format = chat_lib.detect_format(self)
        return self._chat_format

    @chat_format.setter
    def chat_format(self, value: str | None) -> None:
        if value is not None and value not in chat_lib.FORMATS:
            raise ValueError(f"{self.name}: unknown chat format {value!r} "
                             f"(one of {chat_lib.FORMATS})")
        if value == "template" and not self.chat_template:
            raise ValueError(f"{self.name}: chat format 'template' asked for, but the files "
                             "carry no chat template")
        self._chat_format = value

    def chat_text(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                  **template_kwargs: Any) -> str:
        """The conversation rendered in this tokenizer's chat format.

        `no_think=True` prefixes `/no_think` to the last user message (the paper's way to switch off
        Qwen 3 thinking); other keywords go to the template (e.g. `enable_thinking=False`).
        """
        return chat_lib.render(self, messages, add_generation_prompt, **template_kwargs)

    def chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
             **template_kwargs: Any) -> list[int]:
        """Token ids of `chat_text(...)`, special tokens recognised, BOS only where the format
        writes one."""
        text = self.chat_text(messages, add_generation_prompt, **template_kwargs)
        return self.encode(text, allow_special=True)

    # -- helpers for backends ---------------------------------------------------------------

    def _with_bos(self, ids: list[int], add_bos: bool) -> list[int]:
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def _end_ids(self, *extra: int | None) -> tuple[int, ...]:
        """`extra` (the files' own eos ids) followed by the known enders this vocabulary has."""
        found = [i for i in extra if i is not None]
        found += [self.specials[t] for t in END_TOKENS if t in self.specials]
        return tuple(dict.fromkeys(found))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size})"


def special_splitter(tokens: Iterable[str]) -> re.Pattern[str] | None:
    """A regex that splits text around any of `tokens` (longest first, kept by the capture)."""
    toks = sorted({t for t in tokens if t}, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, toks)) + ")") if toks else None
