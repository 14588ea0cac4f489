"""Selection baselines over the same G rollouts that CaT synthesises from (the paper's list).

Each returns, per question, the index of the chosen rollout (majority vote returns an answer).
- single sample: rollout 0 (rollouts are i.i.d., so any fixed index is an unbiased sample);
- majority vote: the most common normalised final answer (verifiable tasks only);
- min perplexity: the lowest mean token NLL under the policy;
- self-selected best-of-N: the model is shown all candidates and names the best;
- mutual predictability: for rollout j, condition on the other G-1 rollouts and score j's
  tokens; pick the rollout the others predict best (mean log-prob per token).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from catjax import sampling, scoring
from catjax.cat import answers, prompts
from catjax.models import ModelConfig, Params

_CHOICE_TAG = re.compile(r"<choice>\s*(\d{1,6})\s*</choice>", re.ASCII | re.IGNORECASE)
_LEADING_NUMBER = re.compile(r"\s*(\d{1,6})\b", re.ASCII)


def single_sample(num_questions: int) -> list[int]:
    return [0] * num_questions


def majority(answers_per_question: Sequence[Sequence[str | None]]) -> list[str | None]:
    return [answers.majority_vote(list(a)) for a in answers_per_question]


def min_perplexity(model_logprobs_rn: np.ndarray, lengths_r: np.ndarray,
                   num_samples: int) -> list[int]:
    """Argmin over each group of the mean token NLL (rows of length 0 are never chosen)."""
    lengths = np.maximum(lengths_r, 1)
    nll = -np.asarray(model_logprobs_rn).sum(-1) / lengths
    nll = np.where(lengths_r > 0, nll, np.inf)
    return [int(i) for i in nll.reshape(-1, num_samples).argmin(-1)]


def parse_choice(text: str, num_candidates: int) -> int | None:
    """1-based `<choice>k</choice>` (else a leading number) -> 0-based index, if in range. The
    tag wins over a number the reply starts with ("2 candidates are close, but <choice>3</choice>")."""
    head = text[:2000]
    m = _CHOICE_TAG.search(head) or _LEADING_NUMBER.match(head)
    if not m:
        return None
    k = int(m.group(1))
    return k - 1 if 1 <= k <= num_candidates else None


def self_select(cfg: ModelConfig, params: Params, tokenizer: Any,
                rollouts: Sequence[Sequence[str]], rng: jax.Array, rc: Any,
                max_new_tokens: int = 16) -> tuple[list[int], int]:
    """The model picks its own best rollout (greedy). Unparsable picks fall back to rollout 0;
    returns the picks and how many fell back. The prompt over G rollouts is fenced and fitted
    to the context as the synthesis prompt is (`rc`: the round's `RoundConfig`)."""
    from catjax.cat import round as cat_round

    budget = cat_round.prompt_budget(cfg, max_new_tokens)
    fitted = [cat_round.group_prompt(tokenizer, r, lambda texts: prompts.self_select(list(texts)),
                                     rc, budget, cfg, "self-selection", max_new_tokens,
                                     "self_select(max_new_tokens)") for r in rollouts]
    cat_round.warn_truncated(sum(cut for _, cut in fitted), "self-selection", cfg, counted=False)
    out = sampling.sample(cfg, params, [ids for ids, _ in fitted], max_new_tokens=max_new_tokens, rng=rng,
                          temperature=0.0, stop_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
                          logprobs=False)
    texts = [tokenizer.decode(c) for c in sampling.completions(out)]
    picks, fallbacks = [], 0
    for t, r in zip(texts, rollouts, strict=True):
        k = parse_choice(t, len(r))
        fallbacks += k is None
        picks.append(0 if k is None else k)
    return picks, fallbacks


def mutual_predictability(cfg: ModelConfig, params: Params, tokenizer: Any,
                          rollouts: Sequence[Sequence[str]], max_tokens: int = 512) -> list[int]:
    """Pick the rollout that the other rollouts predict best (mean log-prob per token)."""
    ctx_prompts, targets, owners = [], [], []
    for q, group in enumerate(rollouts):
        for j, text in enumerate(group):
            others = [t for i, t in enumerate(group) if i != j]
            context = ("Several independent responses to the same problem:\n\n"
                       + "\n\n".join(f"<response>\n{prompts.fence(t)}\n</response>" for t in others)
                       + "\n\nAnother response to the same problem:\n<response>\n")
            ctx_prompts.append(tokenizer.encode(context, add_bos=tokenizer.bos_id is not None))
            targets.append(tokenizer.encode(prompts.fence(text))[:max_tokens] or [tokenizer.pad_id])
            owners.append(q)
    lps = scoring.continuation_logprobs(cfg, params, ctx_prompts, targets, tokenizer.pad_id)
    scores = np.asarray([lp.mean() if lp.size else -np.inf for lp in lps])
    g = len(rollouts[0]) if rollouts else 0
    return [int(i) for i in scores.reshape(-1, g).argmax(-1)] if g else []
