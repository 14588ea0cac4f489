"""catjax.plan against real arrays and real memory, its verdicts, and its command line.

"Measured" here means: bytes of arrays actually created (parameters, AdamW state, a KV cache, on
one device and as shards on a 4-device mesh), XLA's buffer assignment of the real `train_step`
compiled for the real batch, and the process's peak resident memory (VmHWM, reset just before)
while that step runs. The planner fits the update from two other row counts, so the comparison
checks its extrapolation as well as its accounting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from catjax import plan as planner
from tests.devices import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "--config=configs/cat_rl.py:model=tiny,runlocal"
BATCH = 3  # 12 update rows: the planner's fit compiles 4 and 8, so this is an extrapolation

MEASURE = textwrap.dedent("""
    import json, gc
    import jax, jax.numpy as jnp, numpy as np
    from catjax import models, parallel, plan, sampling
    from catjax.rl import trainer
    from configs import cat_rl

    def nbytes(tree, shard=False):
        leaves = jax.tree.leaves(tree)
        return int(sum(x.addressable_shards[0].data.nbytes if shard else x.nbytes for x in leaves))

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    config = cat_rl.get_config("model=tiny,runlocal")
    config.batch_size = BATCH
    cfg = plan.model_config(config)
    g, n = config.round.num_rollouts, config.round.max_new_tokens
    rows, width = BATCH * g, sampling.bucket_length(512)
    opt = trainer.make_optimizer(config.optimizer, config.steps)
    rl = trainer.RLConfig(num_rollouts=g, temperature=config.round.temperature, **dict(config.rl))
    out = {}

    # One device: parameters, AdamW state, a rollout KV cache.
    params = jax.jit(models.init_params, static_argnums=0)(cfg, jax.random.key(0))
    anchor = jax.tree.map(jnp.copy, params)
    opt_state = jax.jit(opt.init)(params)
    out["params"], out["opt"] = nbytes(params), nbytes(opt_state)

    # Shards on a 4-device fsdp mesh, placed as the trainer places them.
    mesh = parallel.make_mesh(**dict(config.mesh))
    sharded = trainer._shard_params(cfg, params, mesh)
    out["params_shard"] = nbytes(sharded, shard=True)
    place = trainer._opt_shardings(opt, sharded, mesh)
    out["opt_shard"] = nbytes(jax.jit(opt.init, out_shardings=place)(sharded), shard=True)
    del sharded

    # Then one real update on one device.
    cache = models.init_cache(cfg, rows, width + n, jnp.bfloat16)
    out["kv"] = nbytes(cache)
    del cache
    rng = np.random.default_rng(0)
    t = width + n
    batch = dict(tokens=rng.integers(1, cfg.vocab_size, (rows, t)).astype(np.int32),
                 positions=np.broadcast_to(np.arange(t), (rows, t)).astype(np.int32),
                 key_mask=np.ones((rows, t), bool),
                 pred_index=np.broadcast_to(np.arange(width - 1, t - 1), (rows, n)).astype(np.int32),
                 mask=np.ones((rows, n), np.float32), rewards=rng.integers(0, 2, rows).astype(np.float32))
    batch["targets"] = batch["tokens"][:, width:]
    batch = jax.device_put(batch)
    lowered = trainer.train_step.lower(cfg, params, opt_state, anchor, batch, rl=rl, opt=opt)
    compiled = lowered.compile({"xla_backend_optimization_level": LLVM_LEVEL})
    out["xla_temp"] = int(compiled.memory_analysis().temp_size_in_bytes)
    jax.block_until_ready((params, opt_state, anchor, batch))
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    before = status("VmRSS")
    jax.block_until_ready(compiled(params, opt_state, anchor, batch))
    out["rss_peak_delta"] = status("VmHWM") - before
    print("OK " + json.dumps(out))
""").replace("BATCH", str(BATCH)).replace("LLVM_LEVEL", "0")


def _popen(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=300)
    return p.returncode, out, err


@pytest.fixture(scope="module")
def runs():
    """Every subprocess of this module, started together so they share the CPUs' wall time."""
    cli = [sys.executable, "-m", "catjax.plan", CONFIG, f"--config.batch_size={BATCH}"]
    procs = {
        "json": _popen(cli + ["--devices=1", "--hbm_gb=16", "--json"]),
        "measure": _popen([sys.executable, "-c", MEASURE],
                          {"XLA_FLAGS": xla_flags(4)}),
        "bad_topology": _popen(cli + ["--topology=v9x-8"]),
        "bad_devices": _popen(cli + ["--devices=3", "--hbm_gb=16", "--config.mesh.tensor=2"]),
    }
    return {k: _finish(p) for k, p in procs.items()}


@pytest.fixture(scope="module")
def cli_plan(runs):
    rc, out, err = runs["json"]
    assert rc == 0, err[-3000:]
    return json.loads(out)


@pytest.fixture(scope="module")
def measured(runs):
    rc, out, err = runs["measure"]
    assert rc == 0 and out.startswith("OK "), err[-3000:]
    return json.loads(out[3:])


def _config(batch: int = BATCH):
    from configs import cat_rl

    config = cat_rl.get_config("model=tiny,runlocal")
    config.batch_size = batch
    return config


def _fit(cli_plan) -> planner.TrainFit:
    f = cli_plan["train_fit"]
    return planner.TrainFit(**{**f, "rows": tuple(f["rows"]), "temp": tuple(f["temp"]),
                               "notes": tuple(f["notes"])})


def _plan(cli_plan, devices: int = 1, hbm_gib: float = 16.0, batch: int = BATCH) -> planner.Plan:
    return planner.plan(_config(batch), devices, int(hbm_gib * planner.GiB), train_fit=_fit(cli_plan))


def _close(planned: float, measured: float, tol: float = 0.2) -> bool:
    return abs(planned - measured) <= tol * measured


def test_cli_prints_one_json_object(runs, cli_plan):
    out = runs["json"][1]
    assert out.strip().count("\n") == 0
    assert cli_plan["devices"] == 1 and cli_plan["batch_size"] == BATCH
    assert cli_plan["fits"] is True and cli_plan["max_batch_size"] >= BATCH
    assert set(cli_plan["phases"]) == {"persistent", "rollouts", "synthesis", "training"}


def test_weights_optimizer_and_kv_cache_match_real_arrays(cli_plan, measured):
    b = cli_plan["bytes"]
    assert _close(b["policy_params"], measured["params"]) and b["anchor_params"] == b["policy_params"]
    assert _close(b["optimizer_state"], measured["opt"])
    assert _close(b["rollout_kv_cache"], measured["kv"])
    # Per-chip shards on a 4-chip fsdp mesh.
    sharded = _plan(cli_plan, devices=4).bytes
    assert sharded["policy_params"] < b["policy_params"] / 2  # the split happened at all
    assert _close(sharded["policy_params"], measured["params_shard"])
    assert _close(sharded["optimizer_state"], measured["opt_shard"])


def test_update_memory_matches_xla_and_resident_peak(cli_plan, measured):
    planned = cli_plan["phases"]["training"]
    assert planned > 100 * 2**20  # big enough that allocator noise does not decide the test
    assert _close(planned, measured["xla_temp"]), (planned, measured["xla_temp"])
    # The resident peak adds what XLA:CPU's runtime allocates outside its buffer assignment:
    # 95-145 MB over a 504 MB temp on an AVX-512 EPYC (2026-11-29, five runs), less elsewhere.
    rss = measured["rss_peak_delta"]
    assert 0.8 * planned <= rss <= 1.35 * planned, (planned, rss)


def test_verdict_flips_as_hbm_shrinks_and_largest_batch_is_monotone(cli_plan):
    big = _plan(cli_plan, hbm_gib=16)
    assert big.fits and big.max_batch_size >= BATCH
    small = _plan(cli_plan, hbm_gib=0.9 * big.peak_bytes / planner.GiB)
    assert not small.fits and small.max_batch_size < BATCH
    sizes = [_plan(cli_plan, hbm_gib=h).max_batch_size for h in (0.05, 0.25, 0.5, 1, 2, 4, 8, 16)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    # The largest batch fits and the next valid one does not.
    top = _plan(cli_plan, hbm_gib=1).max_batch_size
    assert _plan(cli_plan, hbm_gib=1, batch=top).fits
    assert not _plan(cli_plan, hbm_gib=1, batch=top + 1).fits


def test_bad_topology_and_devices_are_one_line_errors(runs):
    for key, flag in (("bad_topology", "--topology"), ("bad_devices", "--devices")):
        rc, out, err = runs[key]
        assert rc == 2 and not out, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and flag in lines[0], err
    with pytest.raises(ValueError, match="--topology"):
        planner.topology("v9x-8")
    assert planner.topology("v5p-8") == (4, 95 * planner.GiB)
    assert planner.topology("v5litepod-8") == (8, 16 * planner.GiB)


def test_paper_config_is_planned_from_shapes_alone(cli_plan):
    """Qwen 3 4B's weights and caches from shapes (no compile: the tiny update fit stands in)."""
    from configs import cat_rl

    config = cat_rl.get_config("model=qwen3_4b")
    p = planner.plan(config, 8, 16 * planner.GiB, train_fit=_fit(cli_plan))
    assert p.mesh == {"data": 1, "fsdp": 8, "tensor": 1}
    full = planner.models.get_preset("qwen3_4b").num_params() * 2
    assert abs(p.bytes["anchor_params"] - full / 8) < 0.01 * full / 8  # bf16
    assert p.bytes["policy_params"] == 2 * p.bytes["anchor_params"]  # float32 master weights
    assert p.bytes["policy_compute_copy"] == p.bytes["anchor_params"]
    # 32 rows of 512 + 1536 slots, 36 layers x 8 kv heads x 128 x 2 (k, v) x 2 bytes.
    assert p.bytes["rollout_kv_cache"] == 32 * 2048 * 36 * 8 * 128 * 2 * 2
    assert p.synthesis_prompt_len >= 8 * 1536
