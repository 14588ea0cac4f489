"""The supervised recipe behind the shipped toy model: it learns, and it resumes exactly."""

import jax
import numpy as np
import pytest

from catjax import main, metrics, models, sft
from catjax.checkpoint import Checkpointer
from configs import toy_sft


def _config(steps: int, eval_questions: int = 8):
    c = toy_sft.get_config()
    c.steps = steps
    c.warmup_steps = 2
    c.policy_batch = 8
    c.synthesis_batch = 2
    c.eval_every = 1000
    c.eval_questions = eval_questions  # 0: no evaluation (it does not change the weights)
    c.checkpoint_every = 2
    c.model.hidden_size, c.model.num_heads, c.model.mlp_dim = 64, 2, 128
    return c


def test_loss_falls_and_a_resumed_run_equals_a_straight_one(tmp_path, monkeypatch):
    straight = main.run(_config(6), str(tmp_path / "a"))
    rows = metrics.read(str(tmp_path / "a" / "metrics.jsonl"))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    assert "accuracy_synthesis" in rows[-1]  # evaluated at the last step
    # A crash during step 5: the run resumes from its last checkpoint and ends the same.
    real_step, calls = sft.sft_step, []

    def crashing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(sft, "sft_step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main.run(_config(6, eval_questions=0), str(tmp_path / "b"))
    # The save of step 4, begun just before the crash, was waited for: the retry below resumes
    # from it (it used to race it: resume from step 2, then collide with step 4's late save).
    with Checkpointer(str(tmp_path / "b" / "checkpoints")) as reader:
        assert reader.latest_step() == 4
    monkeypatch.setattr(sft, "sft_step", real_step)
    resumed = main.run(_config(6, eval_questions=0), str(tmp_path / "b"))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed["params"]),
                 jax.device_get(straight["params"]))
    cfg, params = models.from_pretrained(str(tmp_path / "a" / "export"))
    assert cfg.hidden_size == 64
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params),
                 jax.device_get(straight["params"]))
