"""CaT-RL trainer: a CPU run end to end, exact resume, and 8 devices == 1 device."""

import glob
import importlib
import os
import textwrap

import jax
import numpy as np
import pytest

from catjax import main, metrics
from tests.devices import run_on_devices

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "*.py")))


@pytest.mark.parametrize("path", [p for p in CONFIGS if not p.endswith(("__init__.py", "common.py"))],
                         ids=os.path.basename)
def test_every_config_builds(path):
    name = os.path.splitext(os.path.basename(path))[0]
    module = importlib.import_module(f"configs.{name}")
    config = module.get_config()
    assert config.job in ("evaluate", "train", "sft", "demo")
    if name == "cat_rl":
        for model in ("gemma3_4b", "qwen3_4b", "llama31_8b", "smollm2", "tiny"):
            for task in ("math500", "gsm8k", "healthbench"):
                c = module.get_config(f"model={model},task={task}")
                assert c.round.num_rollouts == 8 and c.optimizer.lr == 5e-7
        assert module.get_config("model=qwen3_4b").round.chat_kwargs.no_think is True


def _tiny(steps: int):
    from configs import cat_rl

    config = cat_rl.get_config("model=tiny,runlocal")
    config.steps = steps
    return config


def test_runlocal_leaves_checkpoints_metrics_plot_and_export(tmp_path):
    import json
    import signal

    # Rows of an attempt that died before its first checkpoint: a fresh start drops them.
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": k, "loss": 9.0}) + "\n"
                                                    for k in (0, 1, 2, 3)))
    handler = signal.getsignal(signal.SIGTERM)
    out = main.run(_tiny(2), str(tmp_path))
    assert signal.getsignal(signal.SIGTERM) is handler  # the preemption handler is put back
    assert not out["preempted"]
    assert os.path.exists(tmp_path / "curves.png")
    assert os.path.exists(tmp_path / "export" / "config.json")
    rows = metrics.read(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward_mean", "frac_reward_zero_std", "loss", "kl_ref", "clip_frac", "entropy",
                "grad_norm", "tokens_per_s", "step_time_s", "response_length"):
        assert key in rows[-1], key
    assert os.listdir(tmp_path / "checkpoints")
    assert out["params"] is not None


def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    from catjax import checkpoint, loading
    from catjax.cat import round as cat_round

    def tiny(steps):  # loss-level KL: moves the weights whatever rl.tied_groups says
        config = _tiny(steps)
        config.rl.kl_mode = "loss"
        return config

    straight = main.run(tiny(3), str(tmp_path / "a"))["params"]
    # An error in step 2, just after step 1's save began: the run waits for that save before the
    # error leaves it, so a retry in this process resumes from step 1 (and does not race it).
    real_round, calls = cat_round.run_round, []

    def failing_round(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure")
        return real_round(*args, **kwargs)

    monkeypatch.setattr(cat_round, "run_round", failing_round)
    with pytest.raises(RuntimeError, match="simulated failure"):
        main.run(tiny(3), str(tmp_path / "b"))
    monkeypatch.setattr(cat_round, "run_round", real_round)
    with checkpoint.Checkpointer(str(tmp_path / "b" / "checkpoints")) as reader:
        assert reader.latest_step() == 1
    resumed = main.run(tiny(3), str(tmp_path / "b"))["params"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(straight))
    start = loading.load_model(tiny(1).model, seed=tiny(1).seed).params
    assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree.leaves(jax.device_get(straight)),
                               jax.tree.leaves(jax.device_get(start)), strict=True)) > 1e-5
    rows = metrics.read(str(tmp_path / "b" / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3]


EIGHT = textwrap.dedent("""
    import jax, numpy as np, optax
    from catjax import models, parallel
    from catjax.rl import trainer
    cfg = models.get_preset("tiny_qwen3")
    rl = trainer.RLConfig(num_rollouts=4, micro_batch=8)
    # The first stage keeps the gradients it is given as its state, for the comparison below.
    keep = optax.GradientTransformation(lambda p: jax.tree.map(np.zeros_like, p),
                                        lambda g, state, params=None: (g, g))
    # Adam's eps well above the gradients' round-off: with the default 1e-8, g / (|g| + eps) blows
    # the sum-order noise of a near-zero gradient up to a good part of lr.
    opt = optax.chain(keep, optax.adamw(1e-2, eps=1e-5))
    rng = np.random.default_rng(0)
    r, p, n = 16, 16, 8
    batch = dict(tokens=rng.integers(1, 500, (r, p + n)).astype(np.int32),
                 positions=np.broadcast_to(np.arange(p + n), (r, p + n)).astype(np.int32),
                 key_mask=np.ones((r, p + n), bool),
                 pred_index=np.broadcast_to(np.arange(p - 1, p + n - 1), (r, n)).astype(np.int32),
                 mask=(np.arange(n)[None] < rng.integers(2, n + 1, (r, 1))).astype(np.float32),
                 rewards=rng.integers(0, 2, r).astype(np.float32))
    batch["targets"] = batch["tokens"][:, p:]
    def run(mesh):
        params = models.init_params(cfg, jax.random.key(0))
        anchor = models.init_params(cfg, jax.random.key(0))
        if mesh is not None:
            shard = parallel.param_shardings(models.param_shapes(cfg), models.logical_axes(cfg), mesh)
            params, anchor = jax.device_put(params, shard), jax.device_put(anchor, shard)
            b = {k: jax.device_put(v, parallel.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
        else:
            b = batch
        opt_state = opt.init(params)
        params, state, mets = trainer.train_step(cfg, params, opt_state, anchor, b, rl=rl, opt=opt,
                                                 mesh=mesh)
        return jax.device_get(params), jax.device_get(state[0])
    one, g1 = run(None)
    mesh = parallel.make_mesh(data=2, fsdp=4)
    eight, g8 = run(mesh)
    # The gradients differ only by the order of the sums across devices (~1e-6 of each leaf).
    grad_err = max(float(np.abs(a - b).max() / np.abs(a).max())
                   for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)))
    err = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)))
    moved = max(float(np.abs(a - b).max()) for a, b in
                zip(jax.tree.leaves(one), jax.tree.leaves(models.init_params(cfg, jax.random.key(0)))))
    print("max relative gradient diff", grad_err, "max param diff", err, "update size", moved)
    # A gradient's sum-order error d moves an update by at most lr * d / eps: ~1e-6 here, 4e-7 seen.
    assert grad_err <= 1e-5 and err <= 1e-5 and moved > 1e-4
    print("OK")
""")


def test_one_step_on_8_devices_equals_1_device():
    print(run_on_devices(EIGHT, 8))


def test_non_finite_update_is_skipped_and_counted():
    import optax

    from catjax import models
    from catjax.rl import trainer

    cfg = models.get_preset("tiny_qwen3")
    rng = np.random.default_rng(0)
    r, p, n = 4, 8, 4
    tokens = rng.integers(1, 500, (r, p + n)).astype(np.int32)
    batch = dict(tokens=tokens, targets=tokens[:, p:],
                 positions=np.broadcast_to(np.arange(p + n), (r, p + n)).astype(np.int32),
                 key_mask=np.ones((r, p + n), bool),
                 pred_index=np.broadcast_to(np.arange(p - 1, p + n - 1), (r, n)).astype(np.int32),
                 mask=np.ones((r, n), np.float32),
                 rewards=np.asarray([1, np.nan, 1, 0], np.float32))  # a poisoned reward
    rl = trainer.RLConfig(num_rollouts=2, kl_mode="none")
    opt = optax.adamw(1e-2)
    params = models.init_params(cfg, jax.random.key(0))
    before = jax.device_get(params)
    new, _, mets = trainer.train_step(cfg, params, opt.init(params),
                                      models.init_params(cfg, jax.random.key(0)), batch, rl=rl,
                                      opt=opt)
    assert float(mets["skipped"][0]) == 1.0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(new), before)


def test_config_errors_stop_before_any_compile(tmp_path):
    config = _tiny(1)
    config.batch_size = 3
    config.mesh.fsdp = 1
    config.mesh.data = 1
    config.round.num_rollouts = 4
    config.rl.micro_batch = 5
    with pytest.raises(ValueError, match="rl.micro_batch=5"):
        main.run(config, str(tmp_path))


def test_bf16_policy_trains_float32_master_weights(tmp_path, monkeypatch):
    """At the paper's lr (5e-7) a bf16 weight cannot move (the step is below its resolution):
    the trainer keeps float32 master weights and computes in bf16."""
    import itertools

    from catjax import loading
    from catjax.cat import answers

    # A random model answers nothing right: alternate the rewards so that there is a gradient
    # (tied rewards have none).
    flip = itertools.cycle([0.0, 1.0])
    monkeypatch.setattr(answers, "verifiable_reward", lambda *a, **k: next(flip))
    config = _tiny(1)
    config.model.dtype = "bfloat16"
    config.optimizer.lr = 5e-7
    config.export = False
    out = main.run(config, str(tmp_path))["params"]
    start = loading.load_model(config.model).params
    leaves = jax.tree.leaves(jax.device_get(out))
    assert all(x.dtype == np.float32 for x in leaves)
    moved = [np.mean(np.asarray(a, np.float32) != np.asarray(b, np.float32))
             for a, b in zip(leaves, jax.tree.leaves(jax.device_get(start)), strict=True)]
    assert np.mean(moved) > 0.5, moved  # most weights took the update


@pytest.mark.parametrize("field,value", [
    ("kl_estimator", "k4"), ("scale", "global"), ("kl_mode", "both"), ("advantage", "ppo"),
    ("loss_agg", "sum"), ("epsilon", -0.1), ("epsilon_high", float("nan")), ("kl_coef", "1e-3"),
    ("micro_batch", -4), ("num_iterations", 0), ("logprob_chunk", 1.5),
])
def test_rl_config_errors_name_the_field_at_start_up(field, value):
    from catjax.rl import trainer

    with pytest.raises(ValueError, match=rf"^config\.rl\.{field}="):
        trainer.RLConfig.from_config({field: value}, 8)


@pytest.mark.parametrize("field,value", [
    ("clip_norm", 0.0), ("lr", -1e-6), ("warmup_steps", -1), ("b2", 1.0), ("weight_decay", -0.1),
])
def test_optimizer_errors_name_the_field_before_the_model_loads(tmp_path, monkeypatch, field, value):
    from catjax import loading

    config = _tiny(1)
    config.optimizer[field] = value
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match=rf"^config\.optimizer\.{field}={value} must be"):
        main.run(config, str(tmp_path))


def test_cosine_without_warmup_starts_at_the_learning_rate():
    import jax.numpy as jnp
    import ml_collections

    from catjax.rl import trainer

    oc = ml_collections.ConfigDict(dict(lr=1.0, schedule="cosine", warmup_steps=0, b1=0.0, b2=0.0,
                                        weight_decay=0.0, clip_norm=1e9))
    opt = trainer.make_optimizer(oc, total_steps=4)
    updates, _ = opt.update(jnp.ones(()), opt.init(jnp.zeros(())), jnp.zeros(()))
    np.testing.assert_allclose(-float(updates), 1.0, rtol=1e-5)  # step 0 learns (was lr 0)


def test_rl_config_unknown_field_is_one_line():
    from catjax.rl import trainer

    with pytest.raises(ValueError, match=r"config\.rl: unknown field\(s\) \['kl_coeff'\]"):
        trainer.RLConfig.from_config({"kl_coeff": 1e-3}, 8)


def test_learning_rate_schedule_counts_training_steps_not_updates():
    """rl.num_iterations=2 applies two updates a step: both get the step's learning rate, and a
    cosine over 4 steps is still above 0 at the 4th step (it reached 0 at the 2nd)."""
    import jax.numpy as jnp
    import ml_collections
    import optax

    from catjax.rl import trainer

    oc = ml_collections.ConfigDict(dict(lr=1.0, schedule="cosine", warmup_steps=1, b1=0.0, b2=0.0,
                                        weight_decay=0.0, clip_norm=1e9))
    opt = trainer.make_optimizer(oc, total_steps=4, updates_per_step=2)
    params = jnp.zeros(())
    state = opt.init(params)
    sizes = []
    for _ in range(8):  # Adam with b1 = b2 = 0 moves a weight by lr on a unit gradient
        updates, state = opt.update(jnp.ones(()), state, params)
        sizes.append(-float(updates))
    want = [float(optax.warmup_cosine_decay_schedule(0.0, 1.0, 1, 4)(k)) for k in range(4)]
    np.testing.assert_allclose(sizes, np.repeat(want, 2), rtol=1e-5, atol=1e-6)
    assert sizes[-1] > 0.1


def test_gold_accuracies_count_only_questions_with_gold():
    """Training data may lack gold (MATH's train split): the monitors average over the
    questions that have one; the majority-vs-synthesis rate needs no gold at all."""
    from catjax.cat import round as cat_round
    from catjax.rl import trainer

    def rec(gold, ref, rollouts):
        return {"gold": gold, "reference_answer": ref, "rollout_answers": rollouts}

    records = [rec("2", "2", ["2", "2"]), rec(None, "5", ["5", "5"]), rec("7", "1", ["7", "7"])]
    got = trainer._round_metrics(cat_round.RoundResult(_Lengths(), [], np.zeros(6, np.float32),
                                                       records, {}), 2)
    assert got["gold_questions"] == 2.0
    assert got["reward_accuracy"] == 0.5  # 2 = 2; 1 != 7 (the question without gold left out)
    assert got["rollout_accuracy"] == 1.0  # 4 of the 4 rollouts with gold
    assert got["synthesis_vs_majority_disagree"] == pytest.approx(1 / 3)  # 7 vs 1
    records = [rec(None, "5", ["5", "5"])]
    got = trainer._round_metrics(cat_round.RoundResult(_Lengths(), [], np.zeros(2, np.float32),
                                                       records, {}), 2)
    assert "reward_accuracy" not in got and "gold_questions" not in got
    assert got["synthesis_vs_majority_disagree"] == 0.0


class _Lengths:
    lengths = np.asarray([3, 4])


def test_round_metrics_merge_over_processes_by_their_own_units(monkeypatch):
    """Two processes, as many questions each: rollout rates average; the verdict rate (per
    judged pair) is weighted by each process's pairs; rewards are pooled."""
    from catjax import parallel
    from catjax.rl import trainer

    mine = {"round/rollout_extract_boxed": 0.5, "round/judge_pairs": 5.0,
            "round/verdict_unparsable": 0.2, "round/prompt_truncated": 1.0}
    theirs = {"round/rollout_extract_boxed": 1.0, "round/judge_pairs": 15.0,
              "round/verdict_unparsable": 0.0, "round/prompt_truncated": 2.0}
    monkeypatch.setattr(trainer.jax, "process_count", lambda: 2)
    monkeypatch.setattr(parallel, "allgather_json", lambda obj: [
        obj, {"m": theirs, "r": [1.0, 1.0]}])
    mine.update(gold_questions=1.0, reward_accuracy=1.0)  # theirs: no question with gold
    got = trainer._merge_over_processes(mine, np.asarray([0.0, 1.0]), 2)
    assert got["gold_questions"] == 1.0 and got["reward_accuracy"] == 1.0
    assert got["round/rollout_extract_boxed"] == 0.75
    assert got["round/verdict_unparsable"] == pytest.approx(0.05)  # 1 of 5 + 0 of 15 pairs
    assert got["round/judge_pairs"] == 10.0  # criteria per rollout: a rate
    assert got["round/prompt_truncated"] == 3.0  # a count: they add up
    assert got["reward_mean"] == 0.75 and got["frac_reward_zero_std"] == 0.5
