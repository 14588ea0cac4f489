"""A judge that is any catjax model on the same mesh: the verdict from one forward pass.

Rather than generating text, the prompt ends with the opening verdict tag and we compare the
next-token probabilities of "yes" and "no". Nothing the rollout says can become a verdict:
the verdict is read only from the judge model's own distribution at that position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from catjax import scoring
from catjax.cat import prompts
from catjax.cat.judges import Judge, Verdict
from catjax.models import ModelConfig, Params


def _answer_token(tokenizer: Any, before: list[int], word: str) -> int:
    """The first token of `word` written right after the `<verdict>` prefill (`before`, its
    ids). Encoded in that context: alone, a sentencepiece model that marks word starts gives
    "yes" a bare "▁" first (then p(yes) would be the probability of a space)."""
    after = tokenizer.encode(prompts.JUDGE_PREFILL + word)
    if len(after) > len(before) and after[:len(before)] == before:
        return after[len(before)]
    ids = tokenizer.encode(word)  # the tag and the word merged into one token: the word alone
    if not ids:
        raise ValueError(f"judge tokenizer cannot encode {word!r}")
    return ids[0]


class LocalJudge(Judge):
    """Yes/no verdicts from `p(yes) vs p(no)` after `<verdict>` under a local model."""

    def __init__(self, cfg: ModelConfig, params: Params, tokenizer: Any, *,
                 batch_size: int = 16, chat_kwargs: dict | None = None):
        super().__init__()
        self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
        self.batch_size = batch_size
        self.chat_kwargs = chat_kwargs or {}
        self.prefill = tokenizer.encode(prompts.JUDGE_PREFILL)
        # Both spellings a model may use right after the tag; probabilities are summed.
        self.yes_ids = sorted({_answer_token(tokenizer, self.prefill, w) for w in ("yes", "Yes")})
        self.no_ids = sorted({_answer_token(tokenizer, self.prefill, w) for w in ("no", "No")})
        if set(self.yes_ids) & set(self.no_ids):
            raise ValueError("judge tokenizer gives 'yes' and 'no' the same first token")

    def judge(self, pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
        if not pairs and not scoring.is_collective(self.params):  # else join the others' forward
            return []
        specials = getattr(self.tokenizer, "specials", None) or ()
        ids = [self.tokenizer.chat(
            [{**m, "content": prompts.fence_specials(m["content"], specials)}
             for m in prompts.judge(c, r)], add_generation_prompt=True, **self.chat_kwargs)
            + self.prefill for c, r in pairs]
        # The response comes before the criterion in the prompt: the rows judging one response
        # share its tokens, which run once (`groups`).
        logits = scoring.last_token_logits(self.cfg, self.params, ids, self.tokenizer.pad_id,
                                           self.batch_size, groups=[r for _, r in pairs])
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        p_yes = np.exp(logp[:, self.yes_ids]).sum(-1)
        p_no = np.exp(logp[:, self.no_ids]).sum(-1)
        prob = p_yes / np.maximum(p_yes + p_no, 1e-30)
        self._count(pairs=len(pairs), calls=len(pairs))
        return [Verdict(met=bool(p > 0.5), raw=f"p_yes={p:.4f}", prob_yes=float(p)) for p in prob]
