"""The rollout sampler: exact greedy parity, log-probs, determinism, truncated distributions."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from catjax import models, sampling
from tests.hf_fixtures import hf_greedy
from tests.tiny_model import forward_rows

PROMPTS = [[5, 17, 33], [7, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13], [250, 3, 99, 98, 12]]
STOP = 11


def forward_logprobs(cfg, params, prompts, gens) -> list[np.ndarray]:
    """Each generated token's log-prob under one forward pass over prompt + completion."""
    full = forward_rows(cfg, params, [p + g for p, g in zip(prompts, gens, strict=True)])
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(full), axis=-1))
    return [row[np.arange(len(p) - 1, len(p) + len(g) - 1), g]
            for row, p, g in zip(logp, prompts, gens, strict=True)]


def test_greedy_matches_transformers_generate(hf_pair):
    model, cfg, params = hf_pair
    n = 24
    out = sampling.sample(cfg, params, PROMPTS, num_samples=2, max_new_tokens=n,
                          rng=jax.random.key(0), temperature=0.0, stop_ids=(STOP,), pad_id=0)
    got = sampling.completions(out, strip_stop=False)
    for i, prompt in enumerate(PROMPTS):
        ref = hf_greedy(model, prompt, n, STOP)
        assert got[2 * i] == ref and got[2 * i + 1] == ref, (i, got[2 * i], ref)


def test_logprobs_equal_a_full_forward_recomputation(hf_pair):
    _, cfg, params = hf_pair
    out = sampling.sample(cfg, params, PROMPTS, num_samples=3, max_new_tokens=16,
                          rng=jax.random.key(1), temperature=0.8, top_k=40, top_p=0.9,
                          stop_ids=(STOP,), logprobs=True)
    rows = sampling.completions(out, strip_stop=False)
    mlp = np.asarray(out.model_logprobs)
    lp = np.asarray(out.logprobs)
    wants = forward_logprobs(cfg, params, [PROMPTS[r // 3] for r in range(len(rows))], rows)
    for r, (gen, want) in enumerate(zip(rows, wants, strict=True)):
        np.testing.assert_allclose(mlp[r, :len(gen)], want, atol=1e-4)
        assert np.all(mlp[r, len(gen):] == 0) and np.all(lp[r, len(gen):] == 0)
        assert np.all(lp[r, :len(gen)] <= 1e-6)  # a valid log-prob of the truncated law


def test_a_prompt_longer_than_one_prefill_block_gives_the_forward_pass_logprobs():
    """The prefill runs in chunks of `default_prefill_chunk()` positions: a prompt longer than
    one chunk crosses chunks, its sliding-window layers mask within and across them, and the
    chunks past it are skipped."""
    cfg = models.get_preset("tiny_gemma3", sliding_window=64)
    params = models.init_params(cfg, jax.random.key(0))
    n = sampling.default_prefill_chunk() + 172  # 300 on CPUs (chunks of 128), 1196 elsewhere
    long_prompt = [int(t) for t in jax.random.randint(jax.random.key(1), (n,), 5, 250)]
    prompts = [long_prompt, PROMPTS[1]]
    assert sampling.bucket_length(n) > sampling.default_prefill_chunk()
    # A float32 cache (accelerators default to bfloat16, ~6e-4 off a float32 forward pass).
    out = sampling.sample(cfg, params, prompts, num_samples=2, max_new_tokens=6,
                          rng=jax.random.key(2), temperature=1.0, stop_ids=(), logprobs=True,
                          cache_dtype="float32")
    mlp = np.asarray(out.model_logprobs)
    gens = sampling.completions(out)
    wants = forward_logprobs(cfg, params, [prompts[r // 2] for r in range(len(gens))], gens)
    for r, want in enumerate(wants):
        np.testing.assert_allclose(mlp[r], want, atol=1e-4)


@pytest.mark.parametrize("preset", ["tiny_qwen3", "tiny_gemma3"])
def test_every_decode_layout_draws_the_same_samples(preset):
    cfg = models.get_preset(preset)
    params = models.init_params(cfg, jax.random.key(0))
    # A float32 cache everywhere (accelerators default to bfloat16): the layouts must agree to
    # float rounding, 1e-5 on CPUs; on an H200 the Pallas attention of the GPUs' "unrolled"
    # default sums in another order (Gemma 3: 7.6e-5, tests/models/test_decode_kernel.py).
    kw = dict(num_samples=3, max_new_tokens=12, temperature=0.9, top_p=0.95, stop_ids=(3,),
              rng=jax.random.key(5), logprobs=True, cache_dtype="float32")
    tol = 1e-4 if jax.default_backend() == "gpu" else 1e-5
    ref = sampling.sample(cfg, params, PROMPTS, decode_layout="scan", **kw)
    # Windows of 3 and 5: generated blocks 3, 3, 6 and 5, 5, 2, each attended from its own loop.
    for layout, window in (("unrolled", 0), ("weights_first", 0), ("rows_first", 3),
                           ("weights_first", 5)):
        out = sampling.sample(cfg, params, PROMPTS, decode_layout=layout, decode_window=window,
                              **kw)
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens),
                                      err_msg=f"{layout}, window {window}")
        np.testing.assert_allclose(np.asarray(out.model_logprobs),
                                   np.asarray(ref.model_logprobs), atol=tol)
    assert sampling.default_decode_layout() == (
        {"cpu": "weights_first", "tpu": "scan"}.get(jax.default_backend(), "unrolled"))
    gpu = jax.default_backend() == "gpu"
    assert [sampling.default_decode_window(k) for k in sampling.DECODE_LAYOUTS] == (
        [0, 0, 128, 128] if gpu else [0, 0, 0, 0])
    with pytest.raises(ValueError, match="decode_layout='unroled'"):
        sampling.sample(cfg, params, PROMPTS, decode_layout="unroled", **kw)
    with pytest.raises(ValueError, match="decode_window=-8 must be >= 0"):
        sampling.sample(cfg, params, PROMPTS, decode_window=-8, **kw)
    with pytest.raises(ValueError, match="decode_window='64' must be an integer"):
        sampling.sample(cfg, params, PROMPTS, decode_window="64", **kw)
    with pytest.raises(ValueError, match="decode_window=4: windows need decode_layout in"):
        sampling.sample(cfg, params, PROMPTS, decode_layout="scan", decode_window=4, **kw)


def test_same_seed_same_samples_and_stop_padding():
    cfg = models.get_preset("tiny_qwen3")
    params = models.init_params(cfg, jax.random.key(0))
    kw = dict(num_samples=4, max_new_tokens=20, temperature=1.0, stop_ids=(3, 4), pad_id=0)
    a = sampling.sample(cfg, params, PROMPTS, rng=jax.random.key(7), **kw)
    b = sampling.sample(cfg, params, PROMPTS, rng=jax.random.key(7), **kw)
    c = sampling.sample(cfg, params, PROMPTS, rng=jax.random.key(8), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    toks, lengths, stopped = map(np.asarray, (a.tokens, a.lengths, a.stopped))
    for row, n, st in zip(toks, lengths, stopped, strict=True):
        assert np.all(row[n:] == 0)
        assert st == (row[n - 1] in (3, 4))
        assert not np.isin(row[: n - 1], [3, 4]).any()
    assert a.tokens.shape == (12, 20)


def _empirical(logits, sp, n=20000):
    keys = jax.random.split(jax.random.key(0), n)
    batch = jnp.broadcast_to(logits, (n, logits.shape[0]))
    # The batch is an argument: closed over, XLA constant-folds the draw over it (20 s a compile).
    toks, lps, model_lps = jax.jit(lambda b, k: sampling.draw(b, k, sp))(batch, keys[0])
    # The plain model's log-prob of each drawn token, whatever the temperature and truncation.
    want = np.asarray(jax.nn.log_softmax(logits))[np.asarray(toks)]
    np.testing.assert_allclose(np.asarray(model_lps), want, atol=1e-5)
    # Without log-probs, the same draw.
    bare = jax.jit(lambda b, k: sampling.draw(b, k, sp, logprobs=False))(batch, keys[0])
    np.testing.assert_array_equal(np.asarray(bare[0]), np.asarray(toks))
    assert bare[1:] == (None, None)
    return np.bincount(np.asarray(toks), minlength=logits.shape[0]) / n, np.asarray(lps), toks


@pytest.mark.parametrize("sp", [
    sampling.SamplingParams(1.0, 0, 1.0),
    sampling.SamplingParams(0.7, 3, 1.0),
    sampling.SamplingParams(1.0, 0, 0.75),
    sampling.SamplingParams(0.7, 0, 0.9),
    sampling.SamplingParams(1.3, 4, 0.8),
])
def test_truncated_distribution_is_followed(sp):
    logits = jnp.log(jnp.asarray([0.3, 0.25, 0.2, 0.1, 0.08, 0.04, 0.02, 0.01]))
    # The target, written out the plain (sorting) way.
    p = np.asarray(jax.nn.softmax(logits / sp.temperature))
    order = np.argsort(-p)
    keep = np.zeros(8, bool)
    keep[order[: sp.top_k or 8]] = True
    q = np.where(keep, p, 0)
    q /= q.sum()
    before = np.cumsum(q[order]) - q[order]
    keep2 = np.zeros(8, bool)
    keep2[order[before < sp.top_p]] = True
    target = np.where(keep2, q, 0)
    target /= target.sum()
    freq, lps, toks = _empirical(logits, sp)
    np.testing.assert_allclose(freq, target, atol=0.012)
    np.testing.assert_allclose(lps, np.log(target[np.asarray(toks)]), atol=1e-5)


def _sorted_nucleus(logits_bv, top_p):
    p = np.asarray(jax.nn.softmax(jnp.asarray(logits_bv), -1), np.float64)
    keep = np.zeros(p.shape, bool)
    for r in range(p.shape[0]):
        order = np.argsort(-p[r], kind="stable")
        keep[r, order[(np.cumsum(p[r][order]) - p[r][order]) < top_p]] = True
    return keep


def _crowded_block_row(v: int) -> np.ndarray:
    """Log-probs whose nucleus (top_p 0.85) needs all 20 tokens of one block and 60 of 100
    tokens spread over others, each group with distinct values."""
    rng = np.random.default_rng(1)
    p = np.full(v, 0.05 / v)
    p[rng.choice(np.arange(2000, v, 157), 30, replace=False)] = 0.02 + rng.uniform(0, 1e-3, 30)
    p[200:220] = 0.01 + np.linspace(0, 2e-4, 20)  # one block (156 wide at 20011 / 128)
    p[np.arange(2001, v, 173)[:100]] = 0.0015 + np.linspace(0, 1e-4, 100)
    return np.log(p / p.sum()).astype(np.float32)


@pytest.mark.parametrize("case", ["spread", "one_block", "crowded", "flat"])
def test_blockwise_candidates_equal_a_full_sort(case):
    # The accelerator path (candidates from the best blocks of 64) forced here on the CPU, on a
    # vocabulary that does not divide into blocks: nuclei spread out, packed into two blocks or
    # mixing both take the fast cut; a flat row needs more than 256 candidates and falls back
    # to the threshold search, here with the accelerators' 16 ways.
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 20011)).astype(np.float32) * 5
    top_p = 0.9
    if case == "one_block":
        logits[1, 3000:3100] += 25.0
    if case == "crowded":
        logits[0] = _crowded_block_row(logits.shape[1])
        logits[1:] = logits[0]
        top_p = 0.85
    if case == "flat":  # distinct, nearly equal: the bisection's cut is exact to a few tokens
        logits[2] = rng.permutation(np.linspace(0.0, 0.01, logits.shape[1]))
    want = _sorted_nucleus(logits, top_p)
    with mock.patch.object(sampling, "_on_cpu", return_value=False):
        got = np.asarray(jax.jit(lambda x: sampling._nucleus_mask(x, top_p, block=64))(logits))
    rows = [0, 1, 3] if case == "flat" else [0, 1, 2, 3]
    np.testing.assert_array_equal(got[rows], want[rows])
    assert abs(int(got[2].sum()) - int(want[2].sum())) <= 5
    for k in (20, 64):
        vals, idx, _ = sampling._top_k(jnp.asarray(logits), k, block=64)
        ref_vals, _ = jax.lax.top_k(jnp.asarray(logits), k)
        np.testing.assert_array_equal(np.asarray(vals), np.asarray(ref_vals))
        np.testing.assert_array_equal(np.take_along_axis(logits, np.asarray(idx), -1), vals)


def test_flat_distribution_takes_the_bisection_path():
    # 1000 near-equal tokens: the top-256 candidates hold < top_p, so the bisection decides.
    logits = jnp.concatenate([jnp.linspace(0.0, 0.01, 1000), jnp.full(24, -30.0)])
    mask = np.asarray(sampling._nucleus_mask(logits[None], 0.9))[0]
    assert 895 <= mask.sum() <= 905 and mask[999] and not mask[1000:].any()
    peaked = jnp.log(jnp.asarray([0.5, 0.3, 0.15, 0.05] + [1e-6] * 300))
    mask = np.asarray(sampling._nucleus_mask(peaked[None], 0.9))[0]
    assert mask[:3].all() and not mask[3:].any()


@pytest.mark.parametrize("v", [8, 64, 65])
def test_top_p_on_a_small_vocabulary_on_the_accelerator_path(v):
    """Fewer tokens than the 256 nucleus candidates: the block size must not go negative."""
    logits = jnp.log(jnp.linspace(1.0, 2.0, v))[None].repeat(2, 0)
    with mock.patch.object(sampling, "_on_cpu", return_value=False):
        got = np.asarray(jax.jit(lambda x: sampling._nucleus_mask(x, 0.75))(logits))
    np.testing.assert_array_equal(got, _sorted_nucleus(np.asarray(logits), 0.75))


def test_bad_sampler_inputs_are_one_line_errors():
    cfg = models.get_preset("tiny_qwen3")
    params = models.init_params(cfg, jax.random.key(0))
    kw = dict(max_new_tokens=4, rng=jax.random.key(0))
    cases = [
        (dict(prompts=PROMPTS, pad_id=cfg.vocab_size), r"pad_id=\d+ is outside the vocabulary"),
        (dict(prompts=[[5, 6], [7, cfg.vocab_size + 3]]), r"sequence 1 holds token id \d+, outside"),
        (dict(prompts=[[5, -1]]), "sequence 0 holds token id -1"),
        (dict(prompts=PROMPTS, stop_ids=2), "stop_ids=2: a sequence of token ids"),
        (dict(prompts=PROMPTS, temperature=float("nan")), "temperature=nan must be a finite"),
        (dict(prompts=PROMPTS, prompt_length=8), "prompt_length=8 is shorter than the longest"),
        (dict(prompts=np.asarray([[]], np.int32)), "every prompt needs at least one token"),
    ]
    for args, want in cases:
        with pytest.raises(ValueError, match=want):
            sampling.sample(cfg, params, **{**kw, **args})


def test_the_context_limit_counts_real_prompt_tokens_not_the_bucket():
    cfg = models.get_preset("tiny_qwen3").replace(max_position=40)
    params = models.init_params(cfg, jax.random.key(0))
    out = sampling.sample(cfg, params, [[5] * 17], max_new_tokens=20, rng=jax.random.key(0),
                          temperature=0.0)  # 17 + 20 fits 40, though 17 pads to a 32 bucket
    assert int(out.lengths[0]) == 20
    with pytest.raises(ValueError, match=r"longest prompt \(17 tokens\) \+ max_new_tokens \(24\)"):
        sampling.sample(cfg, params, [[5] * 17], max_new_tokens=24, rng=jax.random.key(0))


@pytest.mark.parametrize("v", [8, 640, 20011])
def test_blocked_argmax_is_jnp_argmax(v):
    """First maximum on ties (across and within blocks), -inf rows, bf16; vocabularies below
    one block, dividing into blocks of 128 and padded to blocks of 256. NaN logits (a broken
    model) give some token of the vocabulary: XLA:CPU's max does not always propagate NaN."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, v)).astype(np.float32)
    x[1, [v - 1, v // 2, 3]] = 9.0  # ties: the first one wins
    x[2, :] = -np.inf
    x[3, [v // 3, v - 2]] = np.nan
    x[4, :] = 1.0
    for arr in (jnp.asarray(x), jnp.asarray(x, jnp.bfloat16)):
        got = np.asarray(jax.jit(sampling.argmax)(arr))
        finite = [0, 1, 2, 4, 5]
        np.testing.assert_array_equal(got[finite], np.asarray(jnp.argmax(arr, axis=-1))[finite])
        assert got.dtype == np.int32 and 0 <= got[3] < v
    assert got[1] == 3 and got[2] == got[4] == 0


def test_row_blocks_divide_the_vocabulary_when_they_can():
    assert [sampling._row_block(v) for v in (49152, 151936, 128256, 262144, 192, 20011, 8)] == \
        [256, 128, 256, 256, 64, 256, 256]


@pytest.mark.parametrize("sp", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 0.9), (0.8, 0, 0.9)])
def test_log_probs_are_optional_and_change_no_token(sp):
    cfg = models.get_preset("tiny_qwen3")
    params = models.init_params(cfg, jax.random.key(0))
    t, k, p = sp
    kw = dict(num_samples=3, max_new_tokens=10, rng=jax.random.key(4), temperature=t, top_k=k,
              top_p=p, stop_ids=(3,), cache_dtype="float32")  # against a float32 forward pass
    bare = sampling.sample(cfg, params, PROMPTS, logprobs=False, **kw)
    full = sampling.sample(cfg, params, PROMPTS, logprobs=True, **kw)
    np.testing.assert_array_equal(np.asarray(bare.tokens), np.asarray(full.tokens))
    np.testing.assert_array_equal(np.asarray(bare.lengths), np.asarray(full.lengths))
    assert bare.logprobs is None and bare.model_logprobs is None
    assert full.logprobs.shape == full.model_logprobs.shape == full.tokens.shape
    # The model's log-probs, against a forward pass over prompt + completion.
    gens = sampling.completions(full, strip_stop=False)
    wants = forward_logprobs(cfg, params, [PROMPTS[r // 3] for r in range(len(gens))], gens)
    for r, (gen, want) in enumerate(zip(gens, wants, strict=True)):
        np.testing.assert_allclose(np.asarray(full.model_logprobs)[r, :len(gen)], want, atol=1e-4)
        if t == 1.0:  # the sampling law is the model's
            np.testing.assert_allclose(np.asarray(full.logprobs)[r, :len(gen)], want, atol=1e-4)
