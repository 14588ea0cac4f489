"""SentencePiece models (Gemma 3's tokenizer.model)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from catjax.text.base import Tokenizer, special_splitter

# User-defined pieces that Gemma's own tokenizer treats as special (dropped when decoding with
# skip_special). Other user-defined pieces ("\n\n", "<table>") are ordinary text.
_MARKER = re.compile(r"<(?:start|end)_of_\w+>|<unused\d+>|<mask>|\[multimodal\]")


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str | Path):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as model_pb2

        self.name = str(path)
        try:
            self.sp = sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path}: not a sentencepiece model ({e})") from None
        # Piece types from the model proto (one parse beats 262k per-id calls into the library).
        proto = model_pb2.ModelProto()
        proto.ParseFromString(sp.serialized_model_proto())
        kind = model_pb2.ModelProto.SentencePiece
        typed = [(i, p.piece, p.type) for i, p in enumerate(proto.pieces) if p.type != kind.NORMAL]
        # Control pieces (<bos>, <eos>, <pad>, and <unk>) are never matched in text by
        # sentencepiece itself: allow_special splits them out first, as transformers does.
        self._control = {p: i for i, p, t in typed if t in (kind.CONTROL, kind.UNKNOWN)}
        self._control_ids = set(self._control.values())
        self._splitter = special_splitter(self._control)
        self.specials = {p: i for i, p, t in typed if t != kind.BYTE}
        self._skip_on_decode = self._control_ids | {
            i for i, p, t in typed if t == kind.USER_DEFINED and _MARKER.fullmatch(p)}

        ident = lambda i: i if i >= 0 else None  # noqa: E731  (sentencepiece says -1 for "none")
        self.bos_id = ident(sp.bos_id())
        self.eos_ids = self._end_ids(ident(sp.eos_id()))
        pad = ident(sp.pad_id())
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self.template_tokens = {
            k: sp.id_to_piece(i) for k, i in
            (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("pad_token", sp.pad_id()),
             ("unk_token", sp.unk_id())) if i >= 0}

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, add_bos: bool = False, allow_special: bool = False) -> list[int]:
        if not (allow_special and self._splitter):
            return self._with_bos(self.sp.encode(text), add_bos)
        parts = self._splitter.split(text)  # text, special, text, special, ..., text
        encoded = self.sp.encode(parts[::2])
        ids: list[int] = []
        for k, chunk in enumerate(encoded):
            ids += chunk
            if 2 * k + 1 < len(parts):
                ids.append(self._control[parts[2 * k + 1]])
        return self._with_bos(ids, add_bos)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            return self.sp.decode([i for i in ids if i not in self._skip_on_decode])
        # sentencepiece renders control pieces as "", so spell those out between runs of text.
        out, run = [], []
        for i in ids:
            if i in self._control_ids:
                out += [self.sp.decode(run), self.sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if self.sp.is_unknown(i) and self.sp.id_to_piece(i) != token else i

    def id_to_token(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))
