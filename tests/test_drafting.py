"""Prompt-lookup drafting: the drafts, and greedy decoding with them equal to greedy without."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from catjax import drafting, models, sampling
from catjax.cat import round as cat_round
from tests.devices import run_on_devices
from tests.hf_fixtures import hf_greedy

STOP = 11
# The second prompt repeats itself; a tiny random model's greedy text loops, so drafts are kept.
PROMPTS = [[5, 17, 33], [7, 8, 9, 10, 12, 7, 8, 9, 10, 12, 7, 8], [250, 3, 99, 98, 12]]


def reference_draft(ctx: list[int], k: int, max_ngram: int) -> list[int]:
    """The rule `ngram_draft` documents, in plain Python."""
    best = None  # (n, following tokens, j)
    for n in range(1, max_ngram + 1):
        if len(ctx) < n + 1:
            continue
        key = ctx[len(ctx) - n:]
        for j in range(n - 1, len(ctx) - 1):
            if ctx[j - n + 1:j + 1] == key:
                cand = (n, min(len(ctx) - 1 - j, k), j)
                best = cand if best is None or cand > best else best
    if best is None:
        return [-1] * k
    j = best[2]
    follow = ctx[j + 1:j + 1 + k]
    return follow + [-1] * (k - len(follow))


@pytest.mark.parametrize("k,max_ngram", [(1, 1), (3, 2), (5, 3)])
def test_ngram_draft_follows_the_longest_then_fullest_then_latest_match(k, max_ngram):
    rng = np.random.default_rng(k)
    rows = [list(rng.integers(0, 4, size=int(n))) for n in rng.integers(1, 30, size=40)]
    rows += [[1], [1, 1], [2, 3, 2], [5, 6, 7, 5, 6, 7, 5, 6], [9, 8, 7, 6]]
    width = 32
    ctx = np.full((len(rows), width), 77, np.int32)  # filler past each row's end never matches
    for i, r in enumerate(rows):
        ctx[i, :len(r)] = r
    got = np.asarray(drafting.ngram_draft(jnp.asarray(ctx), jnp.asarray([len(r) for r in rows]),
                                          k, max_ngram))
    for i, r in enumerate(rows):
        assert got[i].tolist() == reference_draft([int(t) for t in r], k, max_ngram), (r, got[i])


@pytest.mark.parametrize("k", [1, 4])
def test_drafted_greedy_equals_plain_greedy_and_transformers(hf_pair, k):
    model, cfg, params = hf_pair
    n = 24
    kw = dict(num_samples=2, max_new_tokens=n, rng=jax.random.key(0), temperature=0.0,
              stop_ids=(STOP,), pad_id=0, logprobs=True)
    plain = sampling.sample(cfg, params, PROMPTS, **kw)
    drafted = sampling.sample(cfg, params, PROMPTS, draft_tokens=k, **kw)
    np.testing.assert_array_equal(drafted.tokens, plain.tokens)
    np.testing.assert_array_equal(drafted.lengths, plain.lengths)
    np.testing.assert_array_equal(drafted.stopped, plain.stopped)
    np.testing.assert_array_equal(drafted.prompt_lengths, plain.prompt_lengths)
    np.testing.assert_allclose(drafted.model_logprobs, plain.model_logprobs, atol=1e-4)
    np.testing.assert_array_equal(drafted.logprobs, plain.logprobs)  # zeros: a greedy law
    got = sampling.completions(drafted, strip_stop=False)
    for i, prompt in enumerate(PROMPTS):
        assert got[2 * i] == hf_greedy(model, prompt, n, STOP), i


def test_drafts_cut_the_passes_and_stop_tokens_end_a_row_inside_a_draft():
    cfg = models.get_preset("tiny_llama")
    params = models.init_params(cfg, jax.random.key(0))
    n = 40
    kw = dict(num_samples=1, max_new_tokens=n, stop_ids=(), pad_id=0, cache_dtype="float32",
              mesh=None, unrolled=True)
    tokens, lengths = sampling.pad_prompts(PROMPTS, 0, None)
    plain = sampling.sample(cfg, params, PROMPTS, max_new_tokens=n, rng=jax.random.key(0),
                            temperature=0.0, logprobs=False)
    out, passes = drafting.sample_drafted(cfg, params, jnp.asarray(tokens), jnp.asarray(lengths),
                                          draft_tokens=4, **kw)
    np.testing.assert_array_equal(out.tokens, plain.tokens)
    # The loop runs until its slowest row is done; every row's text loops in part (a tiny
    # random model's does), the third's after 14 tokens: alone, a quarter of its tokens come
    # from kept drafts at least.
    assert int(passes) < n, int(passes)
    alone, passes = drafting.sample_drafted(cfg, params, jnp.asarray(tokens[2:]),
                                            jnp.asarray(lengths[2:]), draft_tokens=4, **kw)
    np.testing.assert_array_equal(alone.tokens, plain.tokens[2:])
    assert int(passes) <= n * 3 // 4, int(passes)
    # A stop token the greedy text reaches after a few tokens ends every row there.
    row = np.asarray(plain.tokens)[1]
    stop = int(row[6])
    first = int(np.argmax(row == stop))
    stopped = sampling.sample(cfg, params, PROMPTS, max_new_tokens=n, rng=jax.random.key(0),
                              temperature=0.0, logprobs=False, stop_ids=(stop,))
    kw["stop_ids"] = (stop,)
    out, _ = drafting.sample_drafted(cfg, params, jnp.asarray(tokens), jnp.asarray(lengths),
                                     draft_tokens=4, **kw)
    assert int(out.lengths[1]) == first + 1 and bool(out.stopped[1])
    for field in ("tokens", "lengths", "stopped"):
        np.testing.assert_array_equal(getattr(out, field), getattr(stopped, field))


@pytest.mark.parametrize("n", [2, 3, 9])
def test_short_budgets_and_a_pad_id_that_is_a_stop_id(n):
    cfg = models.get_preset("tiny_qwen3")
    params = models.init_params(cfg, jax.random.key(1))
    # Prompts of unequal lengths, the longest filling its padded width (16).
    prompts = [list(range(3, 19)), [5, 6, 5, 6, 5], [9]]
    kw = dict(max_new_tokens=n, rng=jax.random.key(0), temperature=0.0, pad_id=0,
              stop_ids=(0, STOP), logprobs=True)
    plain = sampling.sample(cfg, params, prompts, **kw)
    drafted = sampling.sample(cfg, params, prompts, draft_tokens=5, **kw)
    for field in ("tokens", "lengths", "stopped"):
        np.testing.assert_array_equal(getattr(drafted, field), getattr(plain, field))
    np.testing.assert_allclose(drafted.model_logprobs, plain.model_logprobs, atol=1e-4)


def test_bad_draft_settings_name_the_field():
    cfg = models.get_preset("tiny_llama")
    params = models.init_params(cfg, jax.random.key(0))
    kw = dict(max_new_tokens=4, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="draft_tokens=2 needs temperature=0"):
        sampling.sample(cfg, params, PROMPTS, temperature=0.7, draft_tokens=2, **kw)
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="draft_tokens="):
            sampling.sample(cfg, params, PROMPTS, temperature=0.0, draft_tokens=bad, **kw)
    with pytest.raises(ValueError, match="round.anchor_draft_tokens=4 needs a greedy anchor"):
        cat_round.RoundConfig(anchor_draft_tokens=4, anchor_temperature=0.5)
    with pytest.raises(ValueError, match="round.anchor_draft_tokens=-1 must be >= 0"):
        cat_round.RoundConfig(anchor_draft_tokens=-1)


MESH = textwrap.dedent("""
    import re
    import jax, numpy as np
    from catjax import drafting, hlo, models, parallel, sampling
    cfg = models.get_preset("tiny_llama")
    params = models.init_params(cfg, jax.random.key(0))
    prompts = [[5, 6, 7, 5, 6], [8, 9, 10, 11, 12], [13, 14]]
    kw = dict(num_samples=2, max_new_tokens=12, rng=jax.random.key(3), stop_ids=(3,),
              temperature=0.0, logprobs=True, draft_tokens=3)
    single = sampling.sample(cfg, params, prompts, **kw)
    weights = {tuple(sorted(d for d in s[1:] if d > 1)) for s in jax.tree.leaves(
        models.param_shapes(cfg)["layers"], is_leaf=lambda x: isinstance(x, tuple))}
    weights.add(tuple(sorted((cfg.hidden_size, cfg.vocab_size))))  # the head
    calls = []
    program = drafting.sample_drafted
    drafting.sample_drafted = lambda *a, **k: calls.append((a, k)) or program(*a, **k)
    for shape in [(4, 1, 1), (1, 4, 1), (1, 2, 2)]:
        mesh = parallel.make_mesh(*shape)
        on_mesh = jax.device_put(params, parallel.param_shardings(
            models.param_shapes(cfg), models.logical_axes(cfg), mesh))
        for layout in ("scan", "unrolled"):
            sharded = sampling.sample(cfg, on_mesh, prompts, mesh=mesh, decode_layout=layout, **kw)
            np.testing.assert_array_equal(sharded.tokens, single.tokens)
            np.testing.assert_allclose(sharded.model_logprobs, single.model_logprobs, atol=1e-5)
            # Rows stay on their device, weights in place: a data mesh's loop moves only its
            # "all done" flag, an fsdp axis's a few rows' partial sums, never a weight.
            text = program.lower(*calls[-1][0], **calls[-1][1]).compile().as_text()
            moved = set(hlo.collectives(text, in_loops=True))
            if shape == (4, 1, 1):
                assert moved == {("pred[]", "all-reduce")}, sorted(moved)
            for kind, _ in moved:
                for dims in re.findall(r"\\[([\\d,]*)\\]", kind):
                    big = tuple(sorted(int(d) for d in dims.split(",") if d and int(d) > 1))
                    assert big not in weights, (shape, layout, kind)
    print("OK")
""")


def test_drafted_sampling_on_meshes_matches_one_device():
    run_on_devices(MESH, 4, timeout=400)
