"""One CaT round, shared by the evaluation job and the trainer.

questions -> G rollouts from the policy -> the frozen anchor synthesises one reference per
question from the rollouts only (never the question) -> a reward for every rollout -> records.

Choices the paper leaves open (documented, configurable):
- The anchor decodes the synthesis greedily by default (`anchor_temperature=0`).
- A rollout with no extractable answer gets reward 0; a synthesis with no extractable answer
  gives every rollout of its group reward 0 (counted as `synthesis_no_answer`).
- Rubric: retried, then a single equivalence criterion (see `rubrics.propose_rubric`);
  unparsable verdicts count as not met (see `rubrics.rubric_reward`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from catjax import sampling
from catjax.cat import answers, prompts, rubrics
from catjax.cat.judges import Judge
from catjax.models import ModelConfig, Params


@dataclasses.dataclass(frozen=True)
class Model:
    """A model in the round: config, parameters and tokenizer (the anchor may share arrays)."""

    cfg: ModelConfig
    params: Params
    tokenizer: Any


@dataclasses.dataclass(frozen=True)
class RoundConfig:
    task: str = "math"  # "math" (verifiable) | "freeform" (rubric + judge)
    num_rollouts: int = 8
    max_new_tokens: int = 1536
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    synthesis_max_new_tokens: int = 1536
    anchor_temperature: float = 0.0
    reward_mode: str = "exact"  # "exact" (the paper) | "equivalent"
    extract_modes: tuple[str, ...] = ("boxed",)
    rubric_min_items: int = 5
    rubric_retries: int = 2
    length_penalty_tokens: int = 0  # > 0: reward -1 over this many tokens (paper: 750)
    chat_kwargs: tuple[tuple[str, Any], ...] = ()  # e.g. (("no_think", True),) for Qwen 3

    def __post_init__(self):
        if self.task not in ("math", "freeform"):
            raise ValueError(f"round.task={self.task!r}: use 'math' or 'freeform'")
        if self.reward_mode not in ("exact", "equivalent"):
            raise ValueError(f"round.reward_mode={self.reward_mode!r}: use 'exact' or 'equivalent'")
        unknown = set(self.extract_modes) - set(answers.EXTRACTORS)
        if unknown:
            raise ValueError(f"round.extract_modes: unknown {sorted(unknown)}; "
                             f"choose from {sorted(answers.EXTRACTORS)}")
        if self.num_rollouts < 1:
            raise ValueError(f"round.num_rollouts={self.num_rollouts} must be >= 1")


@dataclasses.dataclass
class RoundResult:
    rollouts: sampling.SampleOutput  # row i*G + j: sample j of question i
    prompt_ids: list[list[int]]  # the policy prompt of each question
    rewards: np.ndarray  # [B*G] float32
    records: list[dict]  # one per question
    metrics: dict[str, float]


def policy_prompt(example: Any, task: str) -> list[dict[str, str]]:
    if task == "math":
        return prompts.math_problem(example.question)
    return [dict(m) for m in example.messages]


def synthesize(anchor: Model, rollout_texts: Sequence[Sequence[str]], task: str, rng: jax.Array,
               rc: RoundConfig) -> list[str]:
    """The anchor's reference for each group of rollouts (question-blind)."""
    kind = "math" if task == "math" else "freeform"
    convs = [prompts.synthesis(list(group), kind) for group in rollout_texts]
    texts, _ = sampling.sample_text(
        anchor.cfg, anchor.params, anchor.tokenizer, convs,
        max_new_tokens=rc.synthesis_max_new_tokens, rng=rng, temperature=rc.anchor_temperature,
        top_k=rc.top_k if rc.anchor_temperature else 0,
        top_p=rc.top_p if rc.anchor_temperature else 1.0, chat_kwargs=dict(rc.chat_kwargs))
    return [t[0] for t in texts]


def run_round(policy: Model, anchor: Model, examples: Sequence[Any], rng: jax.Array,
              rc: RoundConfig, judge: Judge | None = None) -> RoundResult:
    """Rollouts, synthesis and rewards for a batch of questions."""
    g = rc.num_rollouts
    k_roll, k_syn = jax.random.split(rng)
    tok = policy.tokenizer
    prompt_ids = [tok.chat(policy_prompt(ex, rc.task), add_generation_prompt=True,
                           **dict(rc.chat_kwargs)) for ex in examples]
    out = sampling.sample(policy.cfg, policy.params, prompt_ids, num_samples=g,
                          max_new_tokens=rc.max_new_tokens, rng=k_roll,
                          temperature=rc.temperature, top_k=rc.top_k, top_p=rc.top_p,
                          stop_ids=tok.eos_ids, pad_id=tok.pad_id)
    flat = [tok.decode(ids) for ids in sampling.completions(out)]
    groups = [flat[i * g:(i + 1) * g] for i in range(len(examples))]
    references = synthesize(anchor, groups, rc.task, k_syn, rc)
    lengths = np.asarray(out.lengths)
    metrics: Counter = Counter()
    records = []
    if rc.task == "math":
        rewards = np.zeros(len(flat), np.float32)
        for i, (ex, group, ref_text) in enumerate(zip(examples, groups, references, strict=True)):
            ref, ref_mode = answers.extract_answer(ref_text, rc.extract_modes)
            metrics[f"synthesis_extract_{ref_mode or 'none'}"] += 1
            extracted = []
            for j, text in enumerate(group):
                ans, mode = answers.extract_answer(text, rc.extract_modes)
                metrics[f"rollout_extract_{mode or 'none'}"] += 1
                extracted.append(ans)
                rewards[i * g + j] = answers.verifiable_reward(ans, ref, rc.reward_mode)
            metrics["synthesis_no_answer"] += ref is None
            records.append(dict(
                id=ex.id, question=ex.question, gold=ex.answer, rollouts=group,
                rollout_answers=extracted, synthesis=ref_text, reference_answer=ref,
                rewards=rewards[i * g:(i + 1) * g].tolist(),
                rollout_lengths=lengths[i * g:(i + 1) * g].tolist()))
    else:
        if judge is None:
            raise ValueError("round.task='freeform' needs a judge")
        rewards, records = _freeform_rewards(anchor, judge, examples, groups, references,
                                             lengths, rc, metrics)
    n = max(len(examples), 1)
    summary = {k: v / (n if k.startswith("synthesis") else n * g) for k, v in metrics.items()}
    return RoundResult(out, prompt_ids, rewards, records, summary)


def _anchor_generate(anchor: Model, rc: RoundConfig, rng: jax.Array):
    """A batch of chat conversations -> one greedy completion each (for rubric proposals)."""
    def generate(convs: list[list[dict]]) -> list[str]:
        texts, _ = sampling.sample_text(anchor.cfg, anchor.params, anchor.tokenizer, convs,
                                        max_new_tokens=rc.synthesis_max_new_tokens, rng=rng,
                                        temperature=0.0, chat_kwargs=dict(rc.chat_kwargs))
        return [t[0] for t in texts]
    return generate


def _freeform_rewards(anchor, judge, examples, groups, references, lengths, rc, metrics):
    g = rc.num_rollouts
    criteria, rstats = rubrics.propose_rubric(
        _anchor_generate(anchor, rc, jax.random.key(0)), list(references),
        min_items=rc.rubric_min_items, retries=rc.rubric_retries)
    for k, v in rstats.as_metrics().items():
        metrics[f"synthesis_rubric_{k}"] += v
    pairs, index = [], []
    for i, (crit, group) in enumerate(zip(criteria, groups, strict=True)):
        for j, text in enumerate(group):
            for c in crit:
                pairs.append((c, text))
                index.append((i, j))
    verdicts = judge.judge(pairs)
    per_rollout: dict[tuple[int, int], list] = {}
    for key, v in zip(index, verdicts, strict=True):
        per_rollout.setdefault(key, []).append(v.met)
        metrics["verdict_unparsable"] += v.met is None
    rewards = np.zeros(len(examples) * g, np.float32)
    records = []
    for i, ex in enumerate(examples):
        for j in range(g):
            r = rubrics.rubric_reward(per_rollout.get((i, j), []))
            if rc.length_penalty_tokens and lengths[i * g + j] > rc.length_penalty_tokens:
                r = rubrics.length_penalty(int(lengths[i * g + j]), rc.length_penalty_tokens)
            rewards[i * g + j] = r
        records.append(dict(
            id=ex.id, question=ex.question, rollouts=groups[i], synthesis=references[i],
            rubric=criteria[i], verdicts=[per_rollout.get((i, j), []) for j in range(g)],
            rewards=rewards[i * g:(i + 1) * g].tolist(),
            rollout_lengths=lengths[i * g:(i + 1) * g].tolist()))
    return rewards, records
