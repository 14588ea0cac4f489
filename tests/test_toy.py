"""The synthetic task, its vocabulary, the supervised examples, and the shipped toy model."""

import collections

import numpy as np
import pytest

from catjax import data, loading, toy
from catjax.cat import answers, prompts
from catjax.datasets import toy as toy_data


def test_questions_are_deterministic_distinct_and_disjoint():
    test = toy_data.questions("test", 500)
    assert test == toy_data.questions("test", 500) and len(set(test)) == 500
    assert not set(test) & set(toy_data.questions("train", 5000))
    with pytest.raises(ValueError, match="no split 'dev'"):
        toy_data.questions("dev", 3)


def test_solution_shows_every_step_and_boxes_the_answer():
    assert toy_data.answer("37+8-5+9-2") == 47
    assert toy_data.solution("37+8-5+9-2") == "37+8=45,45-5=40,40+9=49,49-2=47 \\boxed{47}"
    for q in toy_data.questions("test", 200):
        assert answers.extract_boxed(toy_data.solution(q)) == str(toy_data.answer(q))
        assert 0 <= toy_data.answer(q) <= 99


def test_noisy_solutions_err_independently_at_the_configured_rate():
    q = "53+5+2-5+9"
    rng = np.random.default_rng(0)
    task = toy_data.ToyTask(slip_prob=0.18, miscopy_prob=0.07)
    finals = [answers.extract_boxed(toy_data.noisy_solution(q, rng, task)) for _ in range(4000)]
    right = np.mean([f == "64" for f in finals])
    assert 0.3 < right < 0.5  # about (0.82 * 0.93) ** 4, plus errors that cancel
    wrong = collections.Counter(f for f in finals if f != "64")
    assert len(wrong) >= 10  # mistakes scatter: a majority vote is not trivially right
    clean = toy_data.ToyTask(slip_prob=0.0, miscopy_prob=0.0)
    assert toy_data.noisy_solution(q, rng, clean) == toy_data.solution(q)


def test_data_load_serves_toy_and_arith():
    ex = data.load("toy", split="test", limit=3)
    assert [e.answer for e in ex] == [str(toy_data.answer(e.question)) for e in ex]
    arith = data.load("arith", split="test", limit=20)
    assert len({e.question for e in arith}) == 20 and all(e.answer.isdigit() for e in arith)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("toytok")
    toy.write_tokenizer(d)
    return toy.load_tokenizer(d)


def test_tokenizer_round_trips_and_numbers_are_single_tokens(tok):
    text = "37+8=45,45-5=40 \\boxed{40}"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert [tok.id_to_token(i) for i in ids[:4]] == ["37", "+8", "=", "45"]
    assert tok.chat_format == "template" and tok.eos_ids == (toy.VOCAB.index("</s>"),)


def test_examples_use_the_rounds_own_prompts(tok):
    rng = np.random.default_rng(0)
    task = toy_data.ToyTask()
    p, t = toy.policy_example(tok, "53+5+2-5+9", rng, task)
    assert tok.decode(p, skip_special=False) == "<s>Q:53+5+2-5+9A:"
    assert p == tok.chat(prompts.math_problem("53+5+2-5+9", "toy"), add_generation_prompt=True)
    assert t[-1] == tok.eos_ids[0]
    p, t = toy.synthesis_example(tok, "53+5+2-5+9", 3, rng, task)
    shown = tok.decode(p, skip_special=False)
    assert shown.startswith("<s>S:") and shown.endswith("A:") and shown.count("|") == 2
    assert "53+5+2-5+9" not in shown  # question-blind: only the rollouts
    assert tok.decode(t) == toy_data.solution("53+5+2-5+9")
    tokens, mask = toy.pad_batch([(p, t)], 224, tok.pad_id)
    assert mask.sum() == len(t) and tokens[0, len(p)] == t[0]


def test_toy_synthesis_prompt_strips_structure_from_rollouts():
    msgs = prompts.synthesis(["1+2=3 |S:Q:A: \\boxed{3}", "x"], "math", "toy")
    assert msgs[0]["content"] == "S:1+2=3  \\boxed{3}|x"


def test_shipped_model_loads_and_is_small():
    files = {p.name: p.stat().st_size for p in toy.SHIPPED_MODEL.iterdir()}
    assert sum(files.values()) <= 10 * 2**20
    import ml_collections

    m = loading.load_model(ml_collections.ConfigDict(dict(init="toy", tokenizer="")))
    assert m.cfg == toy.model_config()
    assert m.tokenizer.vocab_size == len(toy.VOCAB)


def test_toy_task_settings_are_checked_and_a_short_task_never_hangs():
    import time

    with pytest.raises(ValueError, match=r"max_operand=12 must be in \[2, 9\]"):
        toy_data.ToyTask(max_operand=12)
    with pytest.raises(ValueError, match="num_steps=0"):
        toy_data.ToyTask(num_steps=0)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"only \d+ distinct train questions found, 50000 asked"):
        toy_data.load("train", task=toy_data.ToyTask(num_steps=1))
    assert time.monotonic() - t0 < 30
