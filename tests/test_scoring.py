"""Teacher-forced scoring equals log-probs read off a plain full forward pass."""

import textwrap

import jax
import numpy as np
import pytest

from catjax import models, scoring
from tests.devices import run_on_devices
from tests.tiny_model import forward_rows, noisy_params


def test_continuation_logprobs_and_last_token_logits_match_forward():
    cfg = models.get_preset("tiny_gemma3")
    params = models.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 500, n).tolist() for n in (3, 17, 9)]
    conts = [rng.integers(1, 500, n).tolist() for n in (5, 1, 12)]
    got = scoring.continuation_logprobs(cfg, params, prompts, conts, batch_size=2)
    last = scoring.last_token_logits(cfg, params, prompts, batch_size=2)
    full = forward_rows(cfg, params, [p + c for p, c in zip(prompts, conts, strict=True)])
    for p, c, lp, lg, logits in zip(prompts, conts, got, last, full, strict=True):
        logp = np.asarray(jax.nn.log_softmax(logits, -1))
        want = logp[np.arange(len(p) - 1, len(p) + len(c) - 1), c]
        np.testing.assert_allclose(lp, want, atol=1e-5)
        np.testing.assert_allclose(lg, logits[len(p) - 1], atol=1e-4)


@pytest.mark.parametrize("overrides", [{}, {"sliding_pattern": (False, True, True)}])
def test_grouped_prompts_share_their_prefix_with_the_same_logits(overrides):
    # Rows judging one response share its tokens: those run once, then each row's own end (the
    # last layer whole only at its last token; sliding, in the second case).
    cfg = models.get_preset("tiny_gemma3", **overrides)  # sliding-window layers too
    assert cfg.sliding_window and cfg.sliding_window < 40
    params = noisy_params(models.init_params(cfg, jax.random.key(1)), jax.random.key(3))
    rng = np.random.default_rng(1)
    shared = rng.integers(1, 500, 40).tolist()
    prompts, groups = [], []
    for key, items in {
        "a": [shared + rng.integers(1, 500, n).tolist() for n in (3, 10, 1)],
        "solo": [rng.integers(1, 500, 7).tolist()],
        "same": [shared[:12]] * 2,  # identical: the last token is each row's own part
        "none": [[5, 6, 7], [8, 6, 7, 9]],  # nothing in common
        "big": [shared[:20] + [i + 1] * (i % 3 + 1) for i in range(6)],  # more rows than a batch
    }.items():
        prompts += items
        groups += [key] * len(items)
    order = rng.permutation(len(prompts))  # groups interleaved
    prompts, groups = [prompts[i] for i in order], [groups[i] for i in order]
    full = forward_rows(cfg, params, prompts)
    want = np.stack([row[len(p) - 1] for row, p in zip(full, prompts, strict=True)])
    got = scoring.last_token_logits(cfg, params, prompts, batch_size=4, groups=groups)
    np.testing.assert_allclose(got, want, atol=1e-4)
    alone = scoring.last_token_logits(cfg, params, prompts, batch_size=4)  # each its own group
    np.testing.assert_allclose(alone, want, atol=1e-4)
    assert np.abs(want).max() > 1e-3  # not all zeros
    assert scoring.last_token_logits(cfg, params, []).shape == (0, cfg.vocab_size)
    with pytest.raises(ValueError, match="3 groups for 14 prompts"):
        scoring.last_token_logits(cfg, params, prompts, groups=groups[:3])


def test_empty_prompts_and_out_of_vocabulary_ids_are_one_line_errors():
    cfg = models.get_preset("tiny_qwen3")
    params = models.init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="last_token_logits: an empty prompt"):
        scoring.last_token_logits(cfg, params, [[], [5, 6]])
    with pytest.raises(ValueError, match="continuation_logprobs: an empty prompt"):
        scoring.continuation_logprobs(cfg, params, [[]], [[7, 8]])
    with pytest.raises(ValueError, match=r"last_token_logits: pad_id=\d+ is outside"):
        scoring.last_token_logits(cfg, params, [[5, 6]], pad_id=cfg.vocab_size)
    with pytest.raises(ValueError, match=r"continuation_logprobs: sequence 0 holds token id"):
        scoring.continuation_logprobs(cfg, params, [[5]], [[cfg.vocab_size]])


MESH = textwrap.dedent("""
    import jax, numpy as np
    from catjax import hlo, models, parallel, scoring
    cfg = models.get_preset("tiny_qwen3")
    params = models.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts, groups = [], []
    for key in range(7):  # responses judged on 1-5 criteria each
        shared = rng.integers(1, 500, int(rng.integers(20, 60))).tolist()
        for _ in range(int(rng.integers(1, 6))):
            prompts.append(shared + rng.integers(1, 500, int(rng.integers(1, 9))).tolist())
            groups.append(key)
    want = scoring.last_token_logits(cfg, params, prompts, batch_size=8, groups=groups)
    calls = []
    program = scoring._shared_prefix_logits
    scoring._shared_prefix_logits = lambda *a, **k: calls.append((a, k)) or program(*a, **k)
    first = {}  # each mesh's first compiled call
    for dims in ((4, 1, 1), (2, 2, 1), (2, 1, 2)):  # (data, fsdp, tensor)
        first[dims] = len(calls)
        mesh = parallel.make_mesh(*dims)
        on_mesh = jax.device_put(params, parallel.param_shardings(
            models.param_shapes(cfg), models.logical_axes(cfg), mesh))
        got = scoring.last_token_logits(cfg, on_mesh, prompts, batch_size=8, groups=groups)
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert calls[-1][1]["shards"] == dims[0] * dims[1]
    # On a data mesh each device scores its own rows, their prefixes beside them: nothing moves.
    # (With an fsdp axis the weights are gathered: the check sees collectives where they are.)
    def compiled(dims):
        args, kw = calls[first[dims]]
        return program.lower(*args, **kw).compile().as_text()

    moved = hlo.collectives(compiled((4, 1, 1)))
    assert not moved, sorted(set(moved))
    assert any(op == "all-gather" for _, op in hlo.collectives(compiled((2, 2, 1))))
    print("OK")
""")


def test_rows_split_over_a_mesh_give_the_same_logits_and_stay_on_their_device():
    run_on_devices(MESH, 4, timeout=400)
