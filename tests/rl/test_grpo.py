"""GRPO maths against hand-computed values (the numbers are written out; no call into the code under
test produces an expected value)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from catjax.rl import grpo

EPS = 1e-6
AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def close(actual, expected, tol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=tol, atol=tol)


# --- advantages ------------------------------------------------------------------------------
# Three prompts, G = 4: a split group, an all-equal group, a 1-of-4 group.
REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
# group means 0.5, 1, 0.25; centred values:
CENTRED = [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.25, -0.25, -0.25, 0.75]
# unbiased group stds: sqrt(4 * 0.25 / 3) = sqrt(1/3); 0; sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5
GROUP_STD = [math.sqrt(1 / 3)] * 4 + [0.0] * 4 + [0.5] * 4
# batch: 7 ones, 5 zeros, mean 7/12: sum of squares = (7 * 25 + 5 * 49) / 144 = 420 / 144; / 11
BATCH_STD = math.sqrt(420 / 144 / 11)
# leave-one-out: 1 - 1/3, 0 - 2/3, ...; group 3: 0 - 1/3 (x3), 1 - 0
RLOO = [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0, -1 / 3, -1 / 3, -1 / 3, 1.0]


def test_grpo_group_zscore_is_the_paper():
    adv = grpo.advantages(jnp.array(REWARDS), 4)  # defaults: method "grpo", scale "group"
    expected = [c / (s + EPS) for c, s in zip(CENTRED, GROUP_STD, strict=True)]
    close(adv, expected)
    close(adv[:4], [0.8660254, -0.8660254, -0.8660254, 0.8660254], 1e-5)
    close(adv[8:], [-0.5, -0.5, -0.5, 1.5], 1e-5)
    assert adv.dtype == jnp.float32


@pytest.mark.parametrize("method,scale,expected", [
    ("grpo", "batch", [c / (BATCH_STD + EPS) for c in CENTRED]),
    ("grpo", "none", CENTRED),
    ("dr_grpo", "none", CENTRED),
    ("dr_grpo", "group", CENTRED),  # Dr. GRPO never divides: scale is ignored
    ("dr_grpo", "batch", CENTRED),
    ("rloo", "none", RLOO),
    ("rloo", "group", [c / (s + EPS) for c, s in zip(RLOO, GROUP_STD, strict=True)]),
    ("rloo", "batch", [c / (BATCH_STD + EPS) for c in RLOO]),
])
def test_advantage_methods_and_scales(method, scale, expected):
    close(grpo.advantages(jnp.array(REWARDS), 4, method, scale), expected)


@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_all_equal_group_is_exactly_zero(method, scale):
    # 0.1 is not exact in float32: a naive mean could leave a residue; the contract is exact 0.
    rewards = jnp.array([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.3, 0.9, 0.9], jnp.float32)
    adv = np.asarray(grpo.advantages(rewards, 3, method, scale))
    assert np.all(np.isfinite(adv))
    assert np.all(adv[:6] == 0.0)
    assert np.all(adv[6:] != 0.0)
    adv = np.asarray(grpo.advantages(jnp.full((8,), 0.1), 4, method, scale))
    assert np.all(adv == 0.0)


def test_tied_task_rewards_get_no_advantage_from_kl_noise():
    """Reward-level KL shifts each reward by ~1e-5: a group of tied task rewards must still get 0
    (the z-score alone blows the noise up to about +-1.5), and a split group keeps its sign."""
    task = jnp.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    noise = jnp.array([1e-5, 3e-5, 2e-5, 4e-5, 1e-5, 3e-5, 2e-5, 4e-5])
    penalised = task - noise
    unguarded = np.asarray(grpo.advantages(penalised, 4))
    assert np.abs(unguarded[:4]).max() > 1.0  # the failure being guarded against
    for method in ("grpo", "rloo"):
        adv = np.asarray(grpo.advantages(penalised, 4, method, "group", task_rewards_r=task))
        assert np.all(adv[:4] == 0.0), method
        assert np.all(np.sign(adv[4:]) == [1, -1, -1, 1]), method


@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_of_one_gives_zero(method, scale):
    adv = np.asarray(grpo.advantages(jnp.array([0.3, 0.7, 1.0]), 1, method, scale))
    assert np.all(adv == 0.0)


def test_advantage_errors():
    with pytest.raises(ValueError, match="groups of 4"):
        grpo.advantages(jnp.zeros(6), 4)
    with pytest.raises(ValueError, match="unknown advantage method"):
        grpo.advantages(jnp.zeros(4), 2, "ppo")
    with pytest.raises(ValueError, match="scale"):
        grpo.advantages(jnp.zeros(4), 2, "grpo", "global")


def test_register_advantage():
    @grpo.register_advantage("test_sign")
    def _sign(rewards_r, group_size, *, scale, eps):
        return jnp.sign(rewards_r - 0.5)

    try:
        close(grpo.advantages(jnp.array([0.0, 1.0]), 2, "test_sign"), [-1.0, 1.0])
        with pytest.raises(ValueError, match="already registered"):
            grpo.register_advantage("test_sign")(_sign)
    finally:
        del grpo.ADVANTAGES["test_sign"]


# --- KL estimators ---------------------------------------------------------------------------
LP = [-1.0, -2.0, -0.5]
REF = [-1.5, -1.0, -0.5]  # ref - lp = -0.5, 1.0, 0.0
K3 = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1, 0.0]  # 0.1065307, 0.7182818, 0


@pytest.mark.parametrize("name,expected", [
    ("k1", [0.5, -1.0, 0.0]),
    ("k2", [0.125, 0.5, 0.0]),
    ("k3", K3),
    ("low_var_kl", K3),
])
def test_kl_estimators(name, expected):
    close(grpo.KL_ESTIMATORS[name](jnp.array(LP), jnp.array(REF)), expected)


def test_k3_nonnegative_and_low_var_kl_clamped():
    d = np.linspace(-15, 15, 61, dtype=np.float32)
    assert np.all(np.asarray(grpo.KL_ESTIMATORS["k3"](jnp.zeros(61), jnp.asarray(d))) >= 0)
    # ref - lp = 30: k3 = e^30 - 31 ~ 1e13; low_var_kl clamps to 10
    close(grpo.KL_ESTIMATORS["low_var_kl"](jnp.array([-30.0]), jnp.array([0.0])), [10.0])


def test_kl_penalized_rewards():
    lp = jnp.array([[-1.0, -2.0, -jnp.inf], [-1.0, 7.0, jnp.nan]])  # padding holds garbage
    ref = jnp.array([[-1.5, -1.0, 0.0], [-2.0, jnp.inf, 3.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    rewards = jnp.array([1.0, 0.0])
    # k1: row 0 sums 0.5 - 1.0 = -0.5 -> 1 + 0.05; row 1: 1.0 -> 0 - 0.1
    close(grpo.kl_penalized_rewards(rewards, lp, ref, mask, 0.1, "k1"), [1.05, -0.1])
    # k3: row 0: 0.1065307 + 0.7182818; row 1: ref - lp = -1 -> e^-1
    expected = [1.0 - 0.1 * (K3[0] + K3[1]), 0.0 - 0.1 * math.exp(-1.0)]
    close(grpo.kl_penalized_rewards(rewards, lp, ref, mask, 0.1, "k3"), expected)
    # the KL is a constant: no gradient reaches the log-probs
    g = jax.grad(lambda x: jnp.sum(grpo.kl_penalized_rewards(rewards, x, ref, mask, 0.1, "k3")))(lp)
    assert np.all(np.asarray(g) == 0.0)


# --- the clipped loss --------------------------------------------------------------------------
# 4 rows x 3 tokens, epsilon 0.2, epsilon_high 0.28 -> clip range [0.8, 1.28]
MASK = np.array([[1, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 0]], np.float32)
RATIO = np.array([[1.0, 1.3, 0.7], [0.7, 1.3, 1.0], [1.0, 1.0, 1.0], [1.2, 1.0, 1.0]], np.float32)
ADV = np.array([1.0, -2.0, 0.5, 0.5], np.float32)
OLD = np.array([[-1.0, -1.5, -2.0], [-0.5, -1.0, -3.0], [-1.0, -1.0, -1.0], [-2.0, -1.0, -1.0]],
               np.float32)
LOGP = OLD + np.log(RATIO)
# per valid token, -min(ratio * A, clip(ratio) * A):
#   row 0 (A=1):  1.0 -> -1.0;  1.3 -> clip 1.28 -> -1.28 (high clip);  0.7 -> -0.7 (not clipped)
#   row 1 (A=-2): 0.7 -> clip 0.8 -> +1.6 (low clip);  1.3 -> +2.6 (not clipped)
#   row 2: no valid token;  row 3 (A=0.5): 1.2 -> -0.6
TOKEN_LOSS = {0: [-1.0, -1.28, -0.7], 1: [1.6, 2.6], 3: [-0.6]}
# token_mean: (-2.98 + 4.2 - 0.6) / 6;  seq means: (-2.98/3 + 4.2/2 - 0.6) / 3;
# sum_norm (max_tokens 4): (-2.98/4 + 4.2/4 - 0.6/4) / 3
EXPECTED = {"token_mean": 0.62 / 6, "seq_mean_token_mean": (-2.98 / 3 + 2.1 - 0.6) / 3,
            "seq_mean_token_sum_norm": (-2.98 + 4.2 - 0.6) / 4 / 3}
NUM_DEN = {"token_mean": (0.62, 6.0), "seq_mean_token_mean": (-2.98 / 3 + 2.1 - 0.6, 3.0),
           "seq_mean_token_sum_norm": ((-2.98 + 4.2 - 0.6) / 4, 3.0)}


def _garbage_padding(x, value):
    x = np.array(x)
    x[MASK == 0] = value
    return jnp.asarray(x)


@pytest.mark.parametrize("agg", AGGS)
def test_aggregations_ragged_with_empty_row(agg):
    lp = _garbage_padding(LOGP, np.nan)
    old = _garbage_padding(OLD, -np.inf)
    loss, mets = grpo.policy_loss(lp, old, jnp.asarray(ADV), jnp.asarray(MASK), epsilon=0.2,
                                  epsilon_high=0.28, loss_agg=agg, max_tokens=4)
    close(loss, EXPECTED[agg])
    num, den, _ = grpo.policy_loss_terms(lp, old, jnp.asarray(ADV), jnp.asarray(MASK), epsilon=0.2,
                                         epsilon_high=0.28, loss_agg=agg, max_tokens=4)
    close([num, den], NUM_DEN[agg])
    m = grpo.combine_metrics(mets)
    close(m["loss"], EXPECTED[agg])
    close(m["clip_frac"], 2 / 6)
    close(m["clip_frac_low"], 1 / 6)
    close(m["clip_frac_high"], 1 / 6)
    close(m["ratio_mean"], (1.0 + 1.3 + 0.7 + 0.7 + 1.3 + 1.2) / 6)
    close(m["adv_mean"], 0.0)
    close(mets["adv_mean"], [0.0, 4.0])
    close(mets["kl"], [0.0, 0.0])  # no reference: (0, 0)
    assert m["kl"] == 0.0
    assert all(v[0].dtype == jnp.float32 and v[1].dtype == jnp.float32 for v in mets.values())


def test_symmetric_clip_by_default():
    # epsilon_high None -> 0.2: row 0's ratio 1.3 is clipped at 1.2 instead of 1.28
    loss, mets = grpo.policy_loss(jnp.asarray(LOGP), jnp.asarray(OLD), jnp.asarray(ADV),
                                  jnp.asarray(MASK), epsilon=0.2, loss_agg="token_mean")
    close(loss, (-1.0 - 1.2 - 0.7 + 1.6 + 2.6 - 0.6) / 6)
    close(grpo.combine_metrics(mets)["clip_frac"], 2 / 6)
    # ratio 1.2 with A > 0 is exactly on the boundary: clip(1.2) == 1.2, not counted as clipped


def test_sum_norm_needs_max_tokens():
    with pytest.raises(ValueError, match="max_tokens"):
        grpo.policy_loss(jnp.asarray(LOGP), jnp.asarray(OLD), jnp.asarray(ADV), jnp.asarray(MASK),
                         loss_agg="seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        grpo.policy_loss(jnp.asarray(LOGP), jnp.asarray(OLD), jnp.asarray(ADV), jnp.asarray(MASK),
                         loss_agg="sum")


@pytest.mark.parametrize("estimator,per_token", [("k3", math.exp(-1.0)), ("k1", 1.0)])
def test_loss_level_kl(estimator, per_token):
    ref = jnp.asarray(LOGP - 1.0)  # ref - lp = -1: k3 = e^-1, k1 = 1 on every token
    base = {"token_mean": 0.62 / 6, "seq_mean_token_mean": EXPECTED["seq_mean_token_mean"]}
    for agg, value in base.items():
        loss, mets = grpo.policy_loss(jnp.asarray(LOGP), jnp.asarray(OLD), jnp.asarray(ADV),
                                      jnp.asarray(MASK), epsilon=0.2, epsilon_high=0.28, loss_agg=agg,
                                      ref_logprobs_rt=ref, kl_coef=0.1, kl_estimator=estimator)
        close(loss, value + 0.1 * per_token)  # every sequence mean shifts by the same constant
        close(grpo.combine_metrics(mets)["kl"], math.exp(-1.0))  # the metric is always k3
        close(mets["kl"][1], 6.0)
    # a reference with kl_coef 0: the metric is reported, the loss is unchanged
    loss, mets = grpo.policy_loss(jnp.asarray(LOGP), jnp.asarray(OLD), jnp.asarray(ADV),
                                  jnp.asarray(MASK), epsilon_high=0.28, loss_agg="token_mean",
                                  ref_logprobs_rt=ref)
    close(loss, 0.62 / 6)
    close(grpo.combine_metrics(mets)["kl"], math.exp(-1.0))


def test_all_masked_batch_is_zero_not_nan():
    for agg in AGGS:
        loss, mets = grpo.policy_loss(jnp.full((2, 3), jnp.nan), jnp.zeros((2, 3)), jnp.ones(2),
                                      jnp.zeros((2, 3)), loss_agg=agg, max_tokens=3)
        assert float(loss) == 0.0
        assert all(v == 0.0 for k, v in grpo.combine_metrics(mets).items() if k != "adv_mean")
        g = jax.grad(lambda x, a=agg: grpo.policy_loss(x, jnp.zeros((2, 3)), jnp.ones(2),
                                                       jnp.zeros((2, 3)), loss_agg=a,
                                                       max_tokens=3)[0])(jnp.zeros((2, 3)))
        assert np.all(np.asarray(g) == 0.0)


# --- gradients ---------------------------------------------------------------------------------
# 2 rows: row 0 has 2 tokens (ratios 1.1 and 1.5; 1.5 is clipped with A = 1 -> zero gradient),
# row 1 has 1 token (ratio 0.9, A = -0.5) and a padded slot. d(-ratio * A)/d lp = -A * ratio.
G_MASK = np.array([[1, 1], [1, 0]], np.float32)
G_RATIO = np.array([[1.1, 1.5], [0.9, 1.0]], np.float32)
G_OLD = np.array([[-1.0, -2.0], [-0.5, -1.0]], np.float32)
G_ADV = np.array([1.0, -0.5], np.float32)


@pytest.mark.parametrize("agg,expected", [
    # seq mean: per token -A * ratio / n_tokens(row) / n_seqs(2)
    ("seq_mean_token_mean", [[-1.0 * 1.1 / 2 / 2, 0.0], [0.5 * 0.9 / 1 / 2, 0.0]]),
    # token mean: -A * ratio / 3 valid tokens
    ("token_mean", [[-1.0 * 1.1 / 3, 0.0], [0.5 * 0.9 / 3, 0.0]]),
    # sum norm (max_tokens 5): -A * ratio / 5 / n_seqs(2)
    ("seq_mean_token_sum_norm", [[-1.0 * 1.1 / 5 / 2, 0.0], [0.5 * 0.9 / 5 / 2, 0.0]]),
])
def test_gradient_matches_hand_derivation(agg, expected):
    old = jnp.asarray(G_OLD)
    f = lambda lp: grpo.policy_loss(lp, old, jnp.asarray(G_ADV), jnp.asarray(G_MASK), loss_agg=agg,
                                    max_tokens=5)[0]
    close(jax.grad(f)(jnp.asarray(G_OLD + np.log(G_RATIO))), expected, 1e-5)


def test_gradient_with_loss_level_k3():
    # d k3 / d lp = d/d lp [e^(ref-lp) - (ref-lp) - 1] = 1 - e^(ref-lp); ref - lp = -1 everywhere
    lp = jnp.asarray(G_OLD + np.log(G_RATIO))
    f = lambda x: grpo.policy_loss(x, jnp.asarray(G_OLD), jnp.asarray(G_ADV), jnp.asarray(G_MASK),
                                   loss_agg="token_mean", ref_logprobs_rt=lp - 1.0, kl_coef=0.1)[0]
    dk = 0.1 * (1.0 - math.exp(-1.0))
    expected = [[(-1.1 + dk) / 3, dk / 3], [(0.5 * 0.9 + dk) / 3, 0.0]]
    close(jax.grad(f)(lp), expected, 1e-5)


def test_on_policy_ratio_is_one():
    # num_iterations == 1, old == stop_gradient(current): ratio 1, no clipping, grad = -A / n
    lp = jnp.asarray(G_OLD)
    f = lambda x: grpo.policy_loss(x, jax.lax.stop_gradient(x), jnp.asarray(G_ADV),
                                   jnp.asarray(G_MASK), loss_agg="seq_mean_token_mean")
    (loss, mets), g = jax.value_and_grad(f, has_aux=True)(lp)
    close(loss, (-1.0 + 0.5) / 2)
    m = grpo.combine_metrics(mets)
    close([m["ratio_mean"], m["clip_frac"]], [1.0, 0.0])
    close(g, [[-1.0 / 2 / 2, -1.0 / 2 / 2], [0.5 / 1 / 2, 0.0]])


# --- micro-batch accumulation -------------------------------------------------------------------


@pytest.mark.parametrize("agg", AGGS)
def test_two_micro_batches_equal_the_full_batch(agg):
    kw = dict(epsilon=0.2, epsilon_high=0.28, loss_agg=agg, max_tokens=4,
              ref_logprobs_rt=jnp.asarray(LOGP - 0.5), kl_coef=0.01)
    args = [jnp.asarray(x) for x in (LOGP, OLD, ADV, MASK)]
    full_loss, full_mets = grpo.policy_loss(*args, **kw)
    halves = []
    for sl in (slice(0, 2), slice(2, 4)):
        kw_h = dict(kw, ref_logprobs_rt=kw["ref_logprobs_rt"][sl])
        halves.append(grpo.policy_loss_terms(*(a[sl] for a in args), **kw_h))
    (n1, d1, m1), (n2, d2, m2) = halves
    close((n1 + n2) / max(float(d1 + d2), 1.0), full_loss, 1e-6)
    # the hand value without KL, plus 0.01 * k3 with ref - lp = -0.5 on every valid token: a constant
    # per token for the means; for sum_norm each row adds c * n_tokens / 4: c * (3 + 2 + 1) / 4 / 3
    c = 0.01 * (math.exp(-0.5) + 0.5 - 1)
    close(full_loss, EXPECTED[agg] + (c * 6 / 4 / 3 if agg == "seq_mean_token_sum_norm" else c), 1e-6)
    combined = grpo.combine_metrics([m1, m2])
    whole = grpo.combine_metrics(full_mets)
    assert combined.keys() == whole.keys()
    for k in whole:
        close(combined[k], whole[k], 1e-6)
    summed = jax.jit(grpo.sum_metrics)(m1, m2)
    for k in whole:
        close(summed[k], full_mets[k], 1e-6)


def test_metric_helpers():
    a = {"x": (jnp.float32(3.0), jnp.float32(2.0)), "y": (jnp.float32(0.0), jnp.float32(0.0))}
    b = {"x": (jnp.float32(1.0), jnp.float32(2.0)), "y": (jnp.float32(0.0), jnp.float32(0.0))}
    assert grpo.combine_metrics([a, b]) == {"x": 1.0, "y": 0.0}
    close(grpo.sum_metrics(a, b)["x"], [4.0, 4.0])
    with pytest.raises(ValueError, match="keys differ"):
        grpo.sum_metrics(a, {"x": b["x"]})


# --- jit --------------------------------------------------------------------------------------


def test_everything_jits():
    adv = jax.jit(grpo.advantages, static_argnums=(1, 2, 3))(jnp.array(REWARDS), 4, "grpo", "group")
    close(adv[8:], [-0.5, -0.5, -0.5, 1.5], 1e-5)
    static = ("epsilon", "epsilon_high", "loss_agg", "kl_estimator", "max_tokens")
    loss_fn = jax.jit(grpo.policy_loss, static_argnames=static)
    for agg in AGGS:
        loss, mets = loss_fn(jnp.asarray(LOGP), jnp.asarray(OLD), jnp.asarray(ADV), jnp.asarray(MASK),
                             epsilon=0.2, epsilon_high=0.28, loss_agg=agg, max_tokens=4,
                             ref_logprobs_rt=jnp.asarray(LOGP), kl_coef=jnp.float32(0.1))  # traced coef
        close(loss, EXPECTED[agg])  # ref == lp: the KL term is 0
        close(grpo.combine_metrics(mets)["kl"], 0.0)
    pen = jax.jit(grpo.kl_penalized_rewards, static_argnames=("estimator",))
    close(pen(jnp.array([1.0]), jnp.array([[-1.0]]), jnp.array([[-2.0]]), jnp.ones((1, 1)), 0.1,
              estimator="k1"), [0.9])
