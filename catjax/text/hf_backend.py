"""Hugging Face `tokenizers` files: tokenizer.json (+ tokenizer_config.json) as on the hub
(Qwen 3, Llama 3.1), and the BPE tokenizers built from GGUF metadata."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from catjax.text.base import Tokenizer

_BOS_NAMES = ("<|begin_of_text|>", "<bos>", "<s>")
_PAD_NAMES = ("<pad>", "<|finetune_right_pad_id|>", "<|endoftext|>", "[PAD]")


def _token_str(v: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from None


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` plus what tokenizer_config.json says about BOS/EOS/pad/template.

    `config` uses tokenizer_config.json's keys: bos_token, eos_token, pad_token, unk_token,
    add_bos_token, chat_template. `extra_eos` are further end ids (generation_config.json)."""

    def __init__(self, backend: Any, name: str, config: dict[str, Any] | None = None,
                 extra_eos: Iterable[int] = ()):
        self.tk, self.name = backend, name
        config = config or {}
        self._lock = threading.Lock()  # encode_special_tokens is a flag on the shared backend
        self.specials = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}

        names = {k: _token_str(config.get(k))
                 for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        if "bos_token" not in config:  # no config: guess BOS from the usual spellings
            names["bos_token"] = next((t for t in _BOS_NAMES if t in self.specials), None)
        bos = self._id(names["bos_token"])
        self.bos_id = None if config.get("add_bos_token") is False else bos
        self.eos_ids = self._end_ids(self._id(names["eos_token"]), *extra_eos)
        pad = self._id(names["pad_token"])
        if pad is None:
            pad = next((self.specials[t] for t in _PAD_NAMES if t in self.specials), None)
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self.template_tokens = {k: v for k, v in names.items() if v is not None}
        self.chat_template = _pick_template(config.get("chat_template"), name)

    @classmethod
    def from_files(cls, path: str | Path) -> HFTokenizer:
        """From a tokenizer.json, or a directory with one; reads the config files beside it."""
        import tokenizers

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        folder = file.parent
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"{file}: not a tokenizers JSON file ({e})") from None
        cfg_file = folder / "tokenizer_config.json"
        config = _read_json(cfg_file) if cfg_file.exists() else {}
        # transformers 5 saves the template beside the config rather than inside it.
        jinja = folder / "chat_template.jinja"
        if jinja.exists():
            config.setdefault("chat_template", jinja.read_text(encoding="utf-8"))
        extra: list[int] = []
        gen_file = folder / "generation_config.json"
        if gen_file.exists():
            eos = _read_json(gen_file).get("eos_token_id")
            extra = [eos] if isinstance(eos, int) else [i for i in eos or () if isinstance(i, int)]
        return cls(backend, str(file), config, extra)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tk.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False, allow_special: bool = False) -> list[int]:
        with self._lock:
            self.tk.encode_special_tokens = not allow_special
            ids = self.tk.encode(text, add_special_tokens=False).ids
        return self._with_bos(ids, add_bos)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self.tk.id_to_token(int(token_id))


def _pick_template(value: Any, name: str) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of named templates."""
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    raise ValueError(f"{name}: chat_template must be a string or a list of named templates")
