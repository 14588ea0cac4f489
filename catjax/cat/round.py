"""One CaT round, shared by the evaluation job and the trainer.

questions -> G rollouts from the policy -> the frozen anchor synthesises one reference per
question from the rollouts only (never the question) -> a reward for every rollout -> records.

Choices the paper leaves open (documented, configurable):
- The anchor decodes the synthesis greedily by default (`anchor_temperature=0`).
- A rollout with no extractable answer gets reward 0; a synthesis with no extractable answer
  gives every rollout of its group reward 0 (counted as `synthesis_no_answer`).
- Rubric: retried, then a single equivalence criterion (see `rubrics.propose_rubric`);
  unparsable verdicts count as not met (see `rubrics.rubric_reward`).
- Prompts longer than the model's context (`round.prompt_overflow`): "truncate" (default) cuts
  them to fit, counted as `prompt_truncated` with one warning line per round; "reject" stops
  with one line. A synthesis prompt keeps every rollout's end (where its final answer is) and
  drops the starts of the longest rollouts first; other prompts lose their middle.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from catjax import faults, parallel, sampling
from catjax.cat import answers, prompts, rubrics
from catjax.cat.judges import Judge
from catjax.models import ModelConfig, Params

_log = logging.getLogger(__name__)
PROMPT_OVERFLOW = ("truncate", "reject")


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
    # Greedy anchor only: tokens drafted from its prompt per decoding pass (`catjax.drafting`):
    # the same text, fewer passes where it restates the rollouts. 0: off (on a CPU a pass over
    # k+1 tokens costs up to 2.4x one over 1, so it pays only on repetitive text; bench/RESULTS.md).
    anchor_draft_tokens: int = 0
    reward_mode: str = "exact"  # "exact" (the paper) | "equivalent"
    extract_modes: tuple[str, ...] = ("boxed",)
    rubric_min_items: int = 5
    rubric_retries: int = 2
    length_penalty_tokens: int = 0  # > 0: -1 added to a reply longer than this (paper: 750)
    chat_kwargs: tuple[tuple[str, Any], ...] = ()  # e.g. (("no_think", True),) for Qwen 3
    prompt_style: str = "default"  # "default" (English templates) | "toy" (the synthetic task)
    prompt_overflow: str = "truncate"  # prompts over the context: "truncate" (counted) | "reject"

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
        if self.prompt_style not in prompts.STYLES:
            raise ValueError(f"round.prompt_style={self.prompt_style!r}: use one of {prompts.STYLES}")
        if self.prompt_overflow not in PROMPT_OVERFLOW:
            raise ValueError(f"round.prompt_overflow={self.prompt_overflow!r}: use one of "
                             f"{PROMPT_OVERFLOW}")
        # Numbers checked here, at start-up, not after the model has loaded and sampled.
        ranges = {"max_new_tokens": (self.max_new_tokens >= 1, ">= 1"),
                  "synthesis_max_new_tokens": (self.synthesis_max_new_tokens >= 1, ">= 1"),
                  "temperature": (self.temperature >= 0, ">= 0"),
                  "anchor_temperature": (self.anchor_temperature >= 0, ">= 0"),
                  "anchor_draft_tokens": (self.anchor_draft_tokens >= 0, ">= 0 (0: off)"),
                  "top_k": (self.top_k >= 0, ">= 0"),
                  "top_p": (0 < self.top_p <= 1, "in (0, 1]"),
                  "rubric_min_items": (1 <= self.rubric_min_items <= rubrics.MAX_ITEMS,
                                       f"in [1, {rubrics.MAX_ITEMS}]"),
                  "rubric_retries": (self.rubric_retries >= 0, ">= 0"),
                  "length_penalty_tokens": (self.length_penalty_tokens >= 0, ">= 0 (0: none)")}
        for name, (ok, want) in ranges.items():
            if not ok:
                raise ValueError(f"round.{name}={getattr(self, name)} must be {want}")
        if self.anchor_draft_tokens and self.anchor_temperature:
            raise ValueError(f"round.anchor_draft_tokens={self.anchor_draft_tokens} needs a greedy "
                             f"anchor (round.anchor_temperature=0, not {self.anchor_temperature}): "
                             "drafts are checked against its argmax")
        if self.length_penalty_tokens and self.task != "freeform":
            raise ValueError(f"round.length_penalty_tokens={self.length_penalty_tokens} applies to "
                             "task='freeform' (the paper's HealthBench penalty); math rewards have "
                             "none: set it to 0")


@dataclasses.dataclass
class RoundResult:
    rollouts: sampling.SampleOutput  # row i*G + j: sample j of question i
    prompt_ids: list[list[int]]  # the policy prompt of each question
    rewards: np.ndarray  # [B*G] float32
    records: list[dict]  # one per question
    metrics: dict[str, float]


def policy_prompt(example: Any, task: str, style: str = "default") -> list[dict[str, str]]:
    if task == "math":
        return prompts.math_problem(example.question, style)
    return [dict(m) for m in example.messages]


# --- prompts that must fit the model's context ------------------------------------------------

def chat_ids(tokenizer: Any, messages: prompts.Messages, chat_kwargs: dict | None = None) -> list[int]:
    """Token ids of a conversation (generation prompt added) whose contents cannot spell one of
    the tokenizer's special tokens: only the chat format itself puts control tokens in."""
    specials = getattr(tokenizer, "specials", None) or ()
    safe = [{**m, "content": prompts.fence_specials(m["content"], specials)} for m in messages]
    return tokenizer.chat(safe, add_generation_prompt=True, **(chat_kwargs or {}))


def prompt_budget(cfg: ModelConfig, max_new_tokens: int) -> int:
    """The longest prompt (tokens) the sampler takes before `max_new_tokens` more: its padded
    width (`sampling.bucket_length`) plus the new tokens must fit `cfg.max_position`."""
    lo, hi = 0, cfg.max_position - max_new_tokens
    while lo < hi:  # the largest n with bucket_length(n) + max_new_tokens <= max_position
        mid = (lo + hi + 1) // 2
        if sampling.bucket_length(mid) + max_new_tokens <= cfg.max_position:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _no_room(what: str, field: str, max_new: int, cfg: ModelConfig) -> ValueError:
    return ValueError(f"{field}={max_new} leaves no room for a {what} prompt in the model's "
                      f"context of {cfg.max_position} tokens; lower it")


def _too_long(what: str, n: int, budget: int, cfg: ModelConfig, max_new: int) -> ValueError:
    return ValueError(f"round.prompt_overflow='reject': a {what} prompt of {n} tokens does not fit "
                      f"the model's context of {cfg.max_position} with {max_new} new tokens "
                      f"(at most {budget} prompt tokens); shorten it or use 'truncate'")


def fit_prompt(ids: list[int], budget: int, tokenizer: Any, rc: RoundConfig, what: str,
               cfg: ModelConfig, max_new: int) -> tuple[list[int], bool]:
    """`ids` if they fit; else (truncate) the first quarter and the end with a mark between, or
    (reject) a one-line ValueError. Returns (ids, whether they were cut)."""
    if len(ids) <= budget:
        return ids, False
    if budget < 1:
        field = "round.max_new_tokens" if what == "policy" else "round.synthesis_max_new_tokens"
        raise _no_room(what, field, max_new, cfg)
    if rc.prompt_overflow == "reject":
        raise _too_long(what, len(ids), budget, cfg, max_new)
    mark = tokenizer.encode(" [...] ") if rc.prompt_style != "toy" else []
    if budget <= 2 * len(mark):
        mark = []
    head = (budget - len(mark)) // 4
    tail = budget - len(mark) - head
    return ids[:head] + mark + ids[len(ids) - tail:], True


def _cap(lengths: Sequence[int], avail: int) -> int:
    """The largest per-item cap c with sum(min(len, c)) <= avail (short items stay whole)."""
    lo, hi = 0, max(lengths, default=0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in lengths) <= avail:
            lo = mid
        else:
            hi = mid - 1
    return lo


def synthesis_prompt(tokenizer: Any, group: Sequence[str], kind: str, rc: RoundConfig,
                     budget: int, cfg: ModelConfig) -> tuple[list[int], bool]:
    """Token ids of the synthesis request over `group`, cut to `budget` tokens if need be.

    Truncation keeps each rollout's end (its final answer) and shortens the longest rollouts
    first, marking each cut with "[...]"; the prompt's own structure is never cut."""
    return group_prompt(tokenizer, group,
                        lambda texts: prompts.synthesis(list(texts), kind, rc.prompt_style),
                        rc, budget, cfg, "synthesis", rc.synthesis_max_new_tokens,
                        "round.synthesis_max_new_tokens")


def group_prompt(tokenizer: Any, group: Sequence[str],
                 messages: Callable[[Sequence[str]], prompts.Messages], rc: RoundConfig,
                 budget: int, cfg: ModelConfig, what: str, max_new: int,
                 max_new_field: str) -> tuple[list[int], bool]:
    """Token ids of `messages(group)` (a prompt over G rollouts), cut to `budget` as
    `synthesis_prompt` describes; `what` names the prompt in errors, `max_new_field` the setting
    that holds its `max_new` new tokens."""
    if budget < 1:
        raise _no_room(what, max_new_field, max_new, cfg)
    chat_kwargs = dict(rc.chat_kwargs)

    def render(texts: Sequence[str]) -> list[int]:
        return chat_ids(tokenizer, messages(texts), chat_kwargs)

    ids = render(group)
    if len(ids) <= budget:
        return ids, False
    if rc.prompt_overflow == "reject":
        raise _too_long(what, len(ids), budget, cfg, max_new)
    overhead = len(render([""] * len(group)))
    if overhead >= budget:
        raise ValueError(f"round: the {what} prompt of {len(group)} empty rollouts is already "
                         f"{overhead} tokens, over the {budget} the model's context of "
                         f"{cfg.max_position} leaves beside {max_new_field}={max_new}")
    mark = "[...] " if rc.prompt_style != "toy" else ""
    n_mark = len(tokenizer.encode(mark)) if mark else 0
    toks = [tokenizer.encode(t) for t in group]
    avail = budget - overhead
    for _ in range(8):  # rendering (fences, merges at the cut) can shift counts: shrink, retry
        cap = _cap([len(t) for t in toks], max(avail, 0))
        texts = [text if len(t) <= cap else mark + tokenizer.decode(t[len(t) - max(cap - n_mark, 0):])
                 for text, t in zip(group, toks, strict=True)]
        ids = render(texts)
        if len(ids) <= budget:
            return ids, True
        avail -= len(ids) - budget
    ids = render([mark] * len(group))
    if len(ids) > budget:
        raise ValueError(f"round: cannot fit the {what} prompt into {budget} tokens")
    return ids, True


def warn_truncated(n: int, what: str, cfg: ModelConfig, counted: bool = True) -> None:
    """One warning line for `n` prompts cut to fit (`counted`: also in the round's metrics)."""
    if n:
        _log.warning("round: cut %d %s prompt(s) to fit the model's context of %d tokens "
                     "(round.prompt_overflow='truncate'%s)", n, what, cfg.max_position,
                     "; counted as prompt_truncated" if counted else "")


def synthesize(anchor: Model, rollout_texts: Sequence[Sequence[str]], task: str, rng: jax.Array,
               rc: RoundConfig, counts: Counter | None = None) -> list[str]:
    """The anchor's reference for each group of rollouts (question-blind). Synthesis prompts
    over the context follow `rc.prompt_overflow`; cuts are added to `counts["prompt_truncated"]`."""
    kind = "math" if task == "math" else "freeform"
    tok = anchor.tokenizer
    budget = prompt_budget(anchor.cfg, rc.synthesis_max_new_tokens)
    fitted = [synthesis_prompt(tok, group, kind, rc, budget, anchor.cfg) for group in rollout_texts]
    cut = sum(c for _, c in fitted)
    warn_truncated(cut, "synthesis", anchor.cfg)
    if counts is not None:
        counts["prompt_truncated"] += cut
    out = sampling.sample(
        anchor.cfg, anchor.params, [ids for ids, _ in fitted], num_samples=1,
        max_new_tokens=rc.synthesis_max_new_tokens, rng=rng, temperature=rc.anchor_temperature,
        top_k=rc.top_k if rc.anchor_temperature else 0,
        top_p=rc.top_p if rc.anchor_temperature else 1.0, stop_ids=tok.eos_ids, pad_id=tok.pad_id,
        logprobs=False, draft_tokens=rc.anchor_draft_tokens)
    return [tok.decode(ids) for ids in sampling.completions(out)]


def run_round(policy: Model, anchor: Model, examples: Sequence[Any], rng: jax.Array,
              rc: RoundConfig, judge: Judge | None = None,
              rollout_logprobs: bool = False) -> RoundResult:
    """Rollouts, synthesis and rewards for a batch of questions. `rollout_logprobs`: the
    rollouts' log-probs too (`sampling.sample(logprobs=True)`; the update scores its own)."""
    g = rc.num_rollouts
    k_roll, k_syn = jax.random.split(rng)
    tok = policy.tokenizer
    prompt_ids = [chat_ids(tok, policy_prompt(ex, rc.task, rc.prompt_style), dict(rc.chat_kwargs))
                  for ex in examples]
    budget = prompt_budget(policy.cfg, rc.max_new_tokens)
    fitted = [fit_prompt(ids, budget, tok, rc, "policy", policy.cfg, rc.max_new_tokens)
              for ids in prompt_ids]
    prompt_ids = [ids for ids, _ in fitted]
    overflow: Counter = Counter(prompt_truncated=sum(c for _, c in fitted))
    warn_truncated(overflow["prompt_truncated"], "policy", policy.cfg)
    out = sampling.sample(policy.cfg, policy.params, prompt_ids, num_samples=g,
                          max_new_tokens=rc.max_new_tokens, rng=k_roll,
                          temperature=rc.temperature, top_k=rc.top_k, top_p=rc.top_p,
                          stop_ids=tok.eos_ids, pad_id=tok.pad_id, logprobs=rollout_logprobs)
    flat = [tok.decode(ids) for ids in sampling.completions(out)]
    faults.point("rollout")  # crash tests only (CATJAX_FAULT); a no-op otherwise
    groups = [flat[i * g:(i + 1) * g] for i in range(len(examples))]
    references = synthesize(anchor, groups, rc.task, k_syn, rc, overflow)
    # Reply tokens, the stop token excluded: what the length penalty and the records count.
    lengths = np.asarray(out.lengths) - np.asarray(out.stopped)
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
                                             lengths, rc, metrics, overflow)
    summary = round_summary(metrics, len(examples), g)
    summary["prompt_truncated"] = float(overflow["prompt_truncated"])  # a count, not a rate
    return RoundResult(out, prompt_ids, rewards, records, summary)


VERDICT_RATES = ("verdict_unparsable", "verdict_judge_errors")  # per judged pair


def round_summary(counts: Counter, num_questions: int, group_size: int) -> dict[str, float]:
    """A round's counts as rates: `synthesis*` per question (one synthesis, one rubric each:
    `synthesis_rubric_fallbacks` is the fallback rate, `_criteria` the mean rubric size),
    `verdict_*` per judged (criterion, rollout) pair (`verdict_unparsable`: no verdict, for any
    reason; `verdict_judge_errors`: of those, the judge unreachable or failing), the rest per
    rollout (`judge_pairs`: criteria judged per rollout)."""
    n = max(num_questions, 1)
    out = {k: v / (n if k.startswith("synthesis") else n * group_size) for k, v in counts.items()}
    for k in VERDICT_RATES:
        if k in counts:
            out[k] = counts[k] / max(counts["judge_pairs"], 1)
    return out


def _anchor_generate(anchor: Model, rc: RoundConfig, rng: jax.Array, counts: Counter | None = None):
    """A batch of chat conversations -> one greedy completion each (for rubric proposals)."""
    def generate(convs: list[list[dict]]) -> list[str]:
        tok, max_new = anchor.tokenizer, rc.synthesis_max_new_tokens
        budget = prompt_budget(anchor.cfg, max_new)
        fitted = [fit_prompt(chat_ids(tok, c, dict(rc.chat_kwargs)),
                             budget, tok, rc, "rubric", anchor.cfg, max_new) for c in convs]
        if counts is not None:
            counts["prompt_truncated"] += sum(cut for _, cut in fitted)
        warn_truncated(sum(cut for _, cut in fitted), "rubric", anchor.cfg)
        out = sampling.sample(anchor.cfg, anchor.params, [ids for ids, _ in fitted],
                              max_new_tokens=max_new, rng=rng, temperature=0.0,
                              stop_ids=tok.eos_ids, pad_id=tok.pad_id, logprobs=False,
                              draft_tokens=rc.anchor_draft_tokens)
        return [tok.decode(ids) for ids in sampling.completions(out)]
    return generate


def _freeform_rewards(anchor, judge, examples, groups, references, reply_lengths, rc, metrics,
                      overflow=None):
    g = rc.num_rollouts
    criteria, rstats = rubrics.propose_rubric(
        _anchor_generate(anchor, rc, jax.random.key(0), overflow), list(references),
        min_items=rc.rubric_min_items, retries=rc.rubric_retries,
        # (Only with several processes are the anchor's arrays looked at: tests run a round
        # on a stub generate and no anchor.)
        collective=jax.process_count() > 1 and parallel.is_global(anchor.params))
    # Counts; the round divides them by the questions (fallbacks per question = the rate).
    for k in ("attempts", "parse_failures", "fallbacks", "criteria"):
        metrics[f"synthesis_rubric_{k}"] += getattr(rstats, k)
    pairs, index = [], []
    for i, (crit, group) in enumerate(zip(criteria, groups, strict=True)):
        for j, text in enumerate(group):
            for c in crit:
                pairs.append((c, text))
                index.append((i, j))
    stats = getattr(judge, "stats", None)  # a `judges.Judge` counts; a bare callable may not
    errors_before = stats.errors if stats is not None else 0
    verdicts = judge.judge(pairs)
    metrics["judge_pairs"] += len(pairs)
    # Pairs without a verdict because the judge was down, apart from replies with none in them.
    metrics["verdict_judge_errors"] += (stats.errors - errors_before) if stats is not None else 0
    per_rollout: dict[tuple[int, int], list] = {}
    for key, v in zip(index, verdicts, strict=True):
        per_rollout.setdefault(key, []).append(v.met)
        metrics["verdict_unparsable"] += v.met is None
    rewards = np.zeros(len(examples) * g, np.float32)
    records = []
    for i, ex in enumerate(examples):
        for j in range(g):
            r = rubrics.rubric_reward(per_rollout.get((i, j), []))
            if rc.length_penalty_tokens:
                r += rubrics.length_penalty(int(reply_lengths[i * g + j]), rc.length_penalty_tokens)
            rewards[i * g + j] = r
        records.append(dict(
            id=ex.id, question=ex.question, rollouts=groups[i], synthesis=references[i],
            rubric=criteria[i], verdicts=[per_rollout.get((i, j), []) for j in range(g)],
            rewards=rewards[i * g:(i + 1) * g].tolist(),
            rollout_lengths=reply_lengths[i * g:(i + 1) * g].tolist()))
    return rewards, records
