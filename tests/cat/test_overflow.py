"""Prompts longer than the model's context: cut to fit and counted ("truncate"), or one clear line
("reject"), for the policy prompts and the synthesis prompt over G long rollouts."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest

from catjax import models, sampling, text
from catjax.cat import round as cat_round
from catjax.data import Example
from tests.assets import smollm2_gguf
from tests.tiny_model import numpy_params

# A context just big enough for the synthesis template (about 200 tokens) and a little more.
CONTEXT = 288


@pytest.fixture(scope="module")
def tiny():
    tok = text.load_tokenizer(smollm2_gguf())
    cfg = models.get_preset("tiny_qwen3", vocab_size=49_152).replace(max_position=CONTEXT)
    return cat_round.Model(cfg, numpy_params(cfg), tok)


def _rc(**kw):
    base = dict(num_rollouts=2, max_new_tokens=48, synthesis_max_new_tokens=8,
                extract_modes=("boxed",))
    return cat_round.RoundConfig(**{**base, **kw})


@pytest.mark.parametrize(("context", "max_new"), [(288, 32), (288, 8), (4096, 1536), (600, 100),
                                                  (40, 8), (20, 8)])
def test_prompt_budget_is_what_the_sampler_accepts(context, max_new):
    budget = cat_round.prompt_budget(models.get_preset("tiny_qwen3").replace(max_position=context),
                                     max_new)
    if budget:
        assert sampling.bucket_length(budget) + max_new <= context
    assert sampling.bucket_length(budget + 1) + max_new > context


def test_synthesis_prompt_keeps_every_rollouts_end(tiny):
    rc = _rc(num_rollouts=3)
    budget = cat_round.prompt_budget(tiny.cfg, rc.synthesis_max_new_tokens)
    group = ["Short: \\boxed{1}", "Let me think. " * 300 + "So the answer is \\boxed{7}",
             "Compute carefully; " * 200 + "final: \\boxed{8}"]
    ids, cut = cat_round.synthesis_prompt(tiny.tokenizer, group, "math", rc, budget, tiny.cfg)
    assert cut and len(ids) <= budget
    body = tiny.tokenizer.decode(ids)
    assert body.count('<response id="') == 3 and body.count("</response>") == 3
    assert "Short: \\boxed{1}" in body  # the short rollout is whole
    for end in ("So the answer is \\boxed{7}\n</response>", "final: \\boxed{8}\n</response>"):
        assert end in body  # the long ones keep their ends, marked as cut
    assert body.count("[...]") == 2
    assert body.rstrip().endswith("assistant")  # the template's tail (generation prompt) is there
    unchanged, cut = cat_round.synthesis_prompt(tiny.tokenizer, group[:1], "math", rc, budget, tiny.cfg)
    assert not cut


def test_reject_stops_with_one_line_naming_the_setting(tiny):
    rc = _rc(prompt_overflow="reject")
    budget = cat_round.prompt_budget(tiny.cfg, rc.synthesis_max_new_tokens)
    with pytest.raises(ValueError) as e:
        cat_round.synthesis_prompt(tiny.tokenizer, ["word " * 400] * 2, "math", rc, budget, tiny.cfg)
    msg = str(e.value)
    assert "\n" not in msg and "round.prompt_overflow='reject'" in msg and f"{CONTEXT}" in msg
    long_q = Example(id="q", question="Add these numbers: " + "1 + " * 400 + "1", messages=(),
                     answer="401", rubrics=(), meta={})
    with pytest.raises(ValueError, match=r"round.prompt_overflow='reject': a policy prompt of \d+ tokens"):
        cat_round.run_round(tiny, tiny, [long_q], jax.random.key(0), rc)  # before any sampling
    with pytest.raises(ValueError, match="round.prompt_overflow='sometimes'"):
        _rc(prompt_overflow="sometimes")


def test_round_truncates_and_counts_long_prompts(tiny, caplog):
    long_q = Example(id="q", question="Add these numbers: " + "1 + " * 400 + "1", messages=(),
                     answer="401", rubrics=(), meta={})
    short_q = Example(id="s", question="What is 2 + 2?", messages=(), answer="4", rubrics=(),
                      meta={})
    rc = _rc()
    with caplog.at_level(logging.WARNING, logger="catjax.cat.round"):
        res = cat_round.run_round(tiny, tiny, [long_q, short_q], jax.random.key(0), rc)
    budget = cat_round.prompt_budget(tiny.cfg, rc.max_new_tokens)
    assert len(res.prompt_ids[0]) == budget and len(res.prompt_ids[1]) < budget
    # 1 policy prompt; the synthesis prompts (about 200 tokens + 2 x 48 random ones) as well.
    assert res.metrics["prompt_truncated"] >= 1 + 1
    lines = [r.getMessage() for r in caplog.records if "prompt_truncated" in r.getMessage()]
    assert lines and all("\n" not in m for m in lines)
    assert res.rewards.shape == (4,) and np.all(np.isfinite(res.rewards))


def test_new_tokens_that_fill_the_context_are_named_not_the_overflow_setting(tiny):
    q = Example(id="q", question="1 + 1", messages=(), answer="2", rubrics=(), meta={})
    with pytest.raises(ValueError, match=rf"^round\.max_new_tokens={CONTEXT} leaves no room"):
        cat_round.run_round(tiny, tiny, [q], jax.random.key(0), _rc(max_new_tokens=CONTEXT))


def test_self_selection_prompt_is_fitted_like_the_synthesis_prompt(tiny):
    from catjax.cat import selection

    long_group = ["Let me think. " * 300 + "\\boxed{7}", "Compute carefully; " * 200 + "\\boxed{8}"]
    picks, fallbacks = selection.self_select(tiny.cfg, tiny.params, tiny.tokenizer,
                                             [long_group], jax.random.key(0), _rc(), 4)
    assert len(picks) == 1 and 0 <= picks[0] < 2 and fallbacks in (0, 1)
    with pytest.raises(ValueError, match="a self-selection prompt of"):
        selection.self_select(tiny.cfg, tiny.params, tiny.tokenizer, [long_group],
                              jax.random.key(0), _rc(prompt_overflow="reject"), 4)


def test_synthesis_new_tokens_that_fill_the_context_are_named(tiny):
    rc = _rc(synthesis_max_new_tokens=CONTEXT, prompt_overflow="reject")
    budget = cat_round.prompt_budget(tiny.cfg, rc.synthesis_max_new_tokens)
    with pytest.raises(ValueError, match=rf"^round\.synthesis_max_new_tokens={CONTEXT} leaves no room"):
        cat_round.synthesis_prompt(tiny.tokenizer, ["a", "b"], "math", rc, budget, tiny.cfg)
