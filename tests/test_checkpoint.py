"""catjax.checkpoint: local and gs:// (emulated) round trips, retention, atomicity, resharding,
bounded failure when the store goes away, and the SIGTERM flag."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from catjax import checkpoint
from catjax.checkpoint import Checkpointer, CheckpointError
from tests.devices import xla_flags
from tests.gcs_emulator import gcs_emulator  # noqa: F401  (pytest fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_state(seed: int = 0) -> dict:
    k = jax.random.key(seed)
    params = {
        "w": jax.random.normal(k, (8, 16), jnp.float32),
        "emb": jax.random.normal(jax.random.fold_in(k, 1), (32, 8)).astype(jnp.bfloat16),
        "layers": {"0": {"scale": jnp.full((16,), 1.5 + seed, jnp.float32)},
                   "1": {"ids": jnp.arange(10, dtype=jnp.int32) * (seed + 1)}},
    }
    opt_state = optax.adamw(1e-3).init(params)
    # A non-trivial optimizer state: one real update so mu/nu/count are not zeros.
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1, params)
    _, opt_state = optax.adamw(1e-3).update(grads, opt_state, params)
    return {"params": params, "opt_state": opt_state,
            "rng": jax.random.key_data(jax.random.key(100 + seed)),  # uint32 key data
            "typed_key": jax.random.key(200 + seed),
            "counters": {"i8": jnp.array([-3, 7], jnp.int8), "u16": jnp.array(65535, jnp.uint16)}}


def abstract_of(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def assert_bit_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jax.dtypes.issubdtype(y.dtype, jax.dtypes.prng_key)
            assert jax.random.key_impl(x) == jax.random.key_impl(y)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def make_meta(step: int) -> dict:
    return {"step": step, "data": {"epoch": 1, "position": 37 * step}, "config_hash": "9f2c1e",
            "rng": np.asarray(jax.random.key_data(jax.random.key(step))), "lr": 1e-3,
            "key": jax.random.key(step), "tags": ["a", "b"], "none": None}


def assert_meta_equal(got: dict, want: dict):
    assert set(got) == set(want)
    for k, v in want.items():
        if isinstance(v, np.ndarray):
            assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k
        elif isinstance(v, jax.Array):
            assert np.array_equal(jax.random.key_data(got[k]), jax.random.key_data(v)), k
        else:
            assert got[k] == v, k


@pytest.fixture
def fast_gcs_retries():
    saved = dict(checkpoint.GCS_RETRIES)
    checkpoint.set_gcs_retries(max_retries=2, initial_delay_s=0.05, max_delay_s=0.2)
    yield
    checkpoint.set_gcs_retries(**saved)


def run_script(code: str, devices: int = 1, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices),
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------- local


def test_local_roundtrip_retention_and_types(tmp_path):
    d = str(tmp_path / "ckpt")
    states = {s: make_state(s) for s in (1, 2, 3)}
    with Checkpointer(d, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() is None
        for s in (1, 2, 3):
            assert ckpt.save(s, states[s], meta=make_meta(s))
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3]
        assert sorted(n for n in os.listdir(d) if n.isdigit()) == ["2", "3"]
        state, meta = ckpt.restore(abstract_state=abstract_of(states[3]))
        assert_bit_identical(state, states[3])
        assert isinstance(state["opt_state"][0], optax.ScaleByAdamState)
        assert_meta_equal(meta, make_meta(3))
        state2, meta2 = ckpt.restore(2, abstract_state=abstract_of(states[2]))
        assert_bit_identical(state2, states[2])
        assert meta2["data"] == {"epoch": 1, "position": 74}
    # A fresh process-level view of the directory agrees; no abstract state: arrays as saved.
    ckpt = Checkpointer(d)
    assert ckpt.latest_step() == 3
    state, _ = ckpt.restore()
    assert np.asarray(state["params"]["emb"]).dtype == jnp.bfloat16
    assert np.asarray(state["params"]["emb"]).tobytes() == np.asarray(states[3]["params"]["emb"]).tobytes()
    ckpt.close()


def test_restore_casts_to_requested_dtype_and_sharding(tmp_path):
    state = {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4)}
    with Checkpointer(str(tmp_path), async_save=False) as ckpt:
        ckpt.save(5, state)
        dev = jax.devices()[0]
        abstract = {"w": jax.ShapeDtypeStruct((3, 4), jnp.bfloat16,
                                              sharding=jax.sharding.SingleDeviceSharding(dev))}
        got, meta = ckpt.restore(abstract_state=abstract)
    assert meta == {}
    assert got["w"].dtype == jnp.bfloat16 and got["w"].sharding == abstract["w"].sharding
    assert np.array_equal(np.asarray(got["w"], np.float32), np.asarray(state["w"]))


def test_async_save_interval_force_and_wait(tmp_path):
    d = str(tmp_path)
    big = {"x": jnp.ones((512, 1024), jnp.float32)}  # 2 MB, enough to be in flight for a moment
    with Checkpointer(d, save_interval_steps=2, async_save=True) as ckpt:
        assert not ckpt.save(1, big, meta={"step": 1})  # not due
        assert ckpt.save(2, big, meta={"step": 2})
        # Arrays are copied off the device before save returns: the caller may now overwrite them.
        assert ckpt.save(3, {"x": big["x"] + 1}, meta={"step": 3}, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3]
        got, meta = ckpt.restore(abstract_state=abstract_of(big))
        assert meta == {"step": 3} and float(got["x"][0, 0]) == 2.0


def test_latest_step_ignores_unfinalized_dirs(tmp_path):
    d = tmp_path / "ckpt"
    ckpt = Checkpointer(str(d), async_save=False)
    ckpt.save(1, make_state(1), meta={"step": 1})
    ckpt.save(2, make_state(2), meta={"step": 2})
    # What a writer killed mid-save leaves: a temporary step directory, never renamed.
    junk = d / "3.orbax-checkpoint-tmp-1790000000000000"
    (junk / "state").mkdir(parents=True)
    (junk / "state" / "manifest.ocdbt").write_bytes(b"\0garbage")
    assert ckpt.latest_step() == 2
    state, meta = ckpt.restore(abstract_state=abstract_of(make_state(2)))
    assert meta == {"step": 2}
    assert_bit_identical(state, make_state(2))
    ckpt.close()
    # A reader leaves them alone (they may be a live writer's step in progress) ...
    with Checkpointer(str(d)) as reader:
        assert reader.all_steps() == [1, 2] and reader.restore()[1] == {"step": 2}
    assert junk.exists()
    # ... and the next writer removes them (before its first save).
    with Checkpointer(str(d)) as ckpt:
        ckpt.save(3, make_state(3), meta={"step": 3})
    assert not junk.exists()
    assert Checkpointer(str(d)).restore()[1] == {"step": 3}


def test_step_directories_without_a_checkpoint_are_ignored_then_set_aside(tmp_path, capsys):
    """A directory named by a step but holding no checkpoint (made by hand, or a copy that
    stopped short) is not the latest step; a writer moves it aside (kept) and saves that step."""
    d = tmp_path / "ckpt"
    with Checkpointer(str(d), async_save=False) as ckpt:
        ckpt.save(1, make_state(1), meta={"step": 1})
    (d / "2").mkdir()
    (d / "3" / "state").mkdir(parents=True)  # half a copy: no meta
    with Checkpointer(str(d)) as reader:
        assert reader.all_steps() == [1] and reader.restore()[1] == {"step": 1}
    assert "step directories [2, 3] hold no complete checkpoint" in capsys.readouterr().out
    with Checkpointer(str(d), async_save=False) as ckpt:
        assert ckpt.save(2, make_state(2), meta={"step": 2})
    assert sorted(os.listdir(d)) == ["1", "2", "2.incomplete", "3.incomplete"]
    with Checkpointer(str(d)) as reader:
        assert reader.all_steps() == [1, 2] and reader.restore()[1] == {"step": 2}


def test_writer_killed_mid_save_leaves_previous_step_loadable(tmp_path):
    d = str(tmp_path / "ckpt")
    # The child saves step 1, then is SIGKILLed while step 2 is fully written but not yet finalized
    # (Orbax's final rename blocks, announcing itself on stdout).
    code = f"""
        import sys, time
        import jax.numpy as jnp
        from orbax.checkpoint._src.path import atomicity
        from catjax.checkpoint import Checkpointer
        ckpt = Checkpointer({d!r}, async_save=True)
        ckpt.save(1, {{"x": jnp.full((64,), 1.0)}}, meta={{"step": 1}})
        ckpt.wait()
        async def stuck(self, *a, **k):
            print("WRITTEN", flush=True)
            time.sleep(600)
        atomicity.AtomicRenameTemporaryPath.finalize = stuck
        ckpt.save(2, {{"x": jnp.full((64,), 2.0)}}, meta={{"step": 2}})
        ckpt.wait()
        print("NOT REACHED", flush=True)
    """
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline and "WRITTEN" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert "WRITTEN" in line, "child never reached the final rename"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10)
    leftovers = [n for n in os.listdir(d) if n.startswith("2.")]
    assert leftovers, os.listdir(d)  # the half-finished step is there on disk...
    ckpt = Checkpointer(d)
    assert ckpt.latest_step() == 1  # ...but never reported or loaded
    got, meta = ckpt.restore(abstract_state={"x": jax.ShapeDtypeStruct((64,), jnp.float32)})
    assert meta == {"step": 1} and float(got["x"][0]) == 1.0
    assert ckpt.save(2, {"x": jnp.full((64,), 3.0)}, meta={"step": 2})  # and step 2 can be redone
    ckpt.close()
    assert Checkpointer(d).restore()[1] == {"step": 2}


def test_errors(tmp_path):
    empty = str(tmp_path / "nothing-here")
    ckpt = Checkpointer(empty)
    with pytest.raises(FileNotFoundError) as e:
        ckpt.restore()
    assert str(e.value) == f"{empty}: no checkpoint"
    assert not os.path.exists(empty)  # reading a mistyped path leaves no directory behind
    with pytest.raises(TypeError, match="not JSON"):
        ckpt.save(1, {"x": jnp.ones(2)}, meta={"bad": object()})
    ckpt.save(1, {"x": jnp.ones(2)})
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 7"):
        ckpt.restore(7)
    ckpt.close()


def test_preemption_handler_sets_flag_only():
    old = signal.getsignal(signal.SIGTERM)
    try:
        is_preempted = checkpoint.install_preemption_handler()
        assert not is_preempted()
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not is_preempted() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert is_preempted()  # and we are still alive: the handler did not exit or save
        is_preempted.uninstall()
        assert signal.getsignal(signal.SIGTERM) is old
    finally:
        signal.signal(signal.SIGTERM, old)


# ----------------------------------------------------------------------------------------- sharded


def test_sharded_save_restore_across_device_counts(tmp_path):
    d = str(tmp_path / "ckpt")
    save4 = f"""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding
        from catjax.checkpoint import Checkpointer
        assert jax.device_count() == 4
        mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
        y = (np.arange(4 * 8, dtype=np.float32).reshape(4, 8) / 7).astype(jnp.bfloat16)
        state = {{"x": jax.device_put(x, NamedSharding(mesh, P("data", None))),
                  "y": jax.device_put(y, NamedSharding(mesh, P(None, "data"))),
                  "r": jax.device_put(np.arange(5, dtype=np.int32), NamedSharding(mesh, P()))}}
        assert len(state["x"].addressable_shards) == 4
        ckpt = Checkpointer({d!r})
        ckpt.save(1, state, meta={{"n": 4}})
        ckpt.wait()
        one = SingleDeviceSharding(jax.devices()[0])
        mesh2 = jax.make_mesh((2,), ("m",), devices=jax.devices()[:2],
                              axis_types=(jax.sharding.AxisType.Auto,))
        for target, repl in ((one, one), (NamedSharding(mesh2, P("m")), NamedSharding(mesh2, P()))):
            abstract = {{k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=repl if k == "r" else target)
                        for k, v in state.items()}}
            got, meta = ckpt.restore(abstract_state=abstract)
            assert meta == {{"n": 4}}
            for k in state:
                assert got[k].sharding == abstract[k].sharding, k
                assert np.asarray(got[k]).tobytes() == np.asarray(state[k]).tobytes(), k
        ckpt.close()
        print("OK4")
    """
    restore2 = f"""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from catjax.checkpoint import Checkpointer
        assert jax.device_count() == 2
        mesh = jax.make_mesh((1, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
        abstract = {{"x": jax.ShapeDtypeStruct((8, 6), jnp.float32,
                                              sharding=NamedSharding(mesh, P(None, "b"))),
                    "y": jax.ShapeDtypeStruct((4, 8), jnp.bfloat16,
                                              sharding=NamedSharding(mesh, P("b", None))),
                    "r": jax.ShapeDtypeStruct((5,), jnp.int32, sharding=NamedSharding(mesh, P()))}}
        got, meta = Checkpointer({d!r}).restore(abstract_state=abstract)
        assert len(got["x"].addressable_shards) == 2 and got["x"].sharding == abstract["x"].sharding
        x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
        y = (np.arange(4 * 8, dtype=np.float32).reshape(4, 8) / 7).astype(jnp.bfloat16)
        assert np.asarray(got["x"]).tobytes() == x.tobytes()
        assert np.asarray(got["y"]).tobytes() == y.tobytes()
        assert np.array_equal(np.asarray(got["r"]), np.arange(5))
        print("OK2")
    """
    r = run_script(save4, devices=4)
    assert "OK4" in r.stdout, r.stderr[-3000:]
    r = run_script(restore2, devices=2)  # written on 4 devices, read on 2
    assert "OK2" in r.stdout, r.stderr[-3000:]


def test_two_processes_save_restore_and_agree_on_preemption(tmp_path):
    """The multi-host path: 2 processes x 1 device; only process 1 gets SIGTERM, both see it."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    d = str(tmp_path / "ckpt")
    code = """
        import os, signal, sys
        import jax, numpy as np
        pid = int(sys.argv[1])
        jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2,
                                   process_id=pid, initialization_timeout=60)
        from jax.experimental import multihost_utils
        from jax.sharding import NamedSharding, PartitionSpec as P
        from catjax.checkpoint import Checkpointer, install_preemption_handler
        mesh = jax.make_mesh((2,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
        sh = NamedSharding(mesh, P("d"))
        x = jax.make_array_from_process_local_data(sh, np.arange(4, dtype=np.float32) + 4 * pid, (8,))
        is_preempted = install_preemption_handler()
        assert not is_preempted()
        if pid == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        flag = is_preempted()
        ckpt = Checkpointer({d!r}, save_interval_steps=10)
        assert ckpt.save(3, {"x": x}, meta={"step": 3}, force=flag)
        ckpt.wait()
        got, meta = ckpt.restore(abstract_state={"x": jax.ShapeDtypeStruct((8,), np.float32, sharding=sh)})
        full = multihost_utils.process_allgather(got["x"], tiled=True)
        assert meta == {"step": 3} and np.array_equal(full, np.arange(8, dtype=np.float32)), full
        ckpt.close()
        print("OK", pid, flag, flush=True)
    """.replace("{port}", str(port)).replace("{d!r}", repr(d))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
           "XLA_FLAGS": xla_flags(1)}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(i)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=90))
    finally:
        for p in procs:
            p.kill()
    for i, (out, err) in enumerate(outs):
        assert f"OK {i} True" in out, err[-3000:]


# -------------------------------------------------------------------------------------- gs:// (emulated)


def _put(emu, name: str, data: bytes):
    from google.cloud import storage

    storage.Client().bucket(emu.bucket).blob(name).upload_from_string(data)


def test_gcs_roundtrip_retention_and_unfinalized(gcs_emulator, fast_gcs_retries):  # noqa: F811
    emu = gcs_emulator
    # Neighbours that must survive Orbax's deletions (a range delete without startOffset/endOffset
    # support in the store would remove every object in the bucket).
    for name in ("aaa/keep.txt", "run/checkpoints-other/keep.txt", "run/zzz.txt", "zzz/keep.txt"):
        _put(emu, name, b"keep")
    url = f"{emu.url}/run/checkpoints"
    states = {s: make_state(s) for s in (1, 2, 3)}
    with Checkpointer(url, max_to_keep=2) as ckpt:
        for s in (1, 2, 3):
            assert ckpt.save(s, states[s], meta=make_meta(s))
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3]
        state, meta = ckpt.restore(abstract_state=abstract_of(states[3]))
        assert_bit_identical(state, states[3])
        assert_meta_equal(meta, make_meta(3))
    names = set(emu.objects())
    assert not any(n.startswith("run/checkpoints/1/") for n in names)
    assert {"aaa/keep.txt", "run/checkpoints-other/keep.txt", "run/zzz.txt", "zzz/keep.txt"} <= names
    # A step written without its commit marker (writer died before committing) is ignored.
    for name, data in emu.objects("run/checkpoints/3/").items():
        if not name.endswith("commit_success.txt"):
            _put(emu, name.replace("/3/", "/4/", 1), data)
    ckpt = Checkpointer(url, max_to_keep=2)
    assert ckpt.latest_step() == 3
    state, meta = ckpt.restore(abstract_state=abstract_of(states[3]))
    assert meta["step"] == 3
    # A complete step written by another process is seen at once (no stale gcsfs listing).
    for name, data in emu.objects("run/checkpoints/2/").items():
        _put(emu, name.replace("/2/", "/7/", 1), data)
    assert ckpt.latest_step() == 7
    state, meta = ckpt.restore(abstract_state=abstract_of(states[2]))
    assert meta["step"] == 2
    assert_bit_identical(state, states[2])
    ckpt.close()


def test_gcs_outage_fails_fast_and_keeps_last_good(gcs_emulator, fast_gcs_retries):  # noqa: F811
    emu = gcs_emulator
    url = f"{emu.url}/ckpt"
    ckpt = Checkpointer(url, timeout_s=8)
    s1 = {"x": jnp.arange(16, dtype=jnp.float32)}
    ckpt.save(1, s1, meta={"step": 1})
    ckpt.wait()
    before = emu.objects()

    # 1) The store is gone (connection refused): the next save fails fast, one line, nothing lost.
    emu.stop()
    t0 = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        ckpt.save(2, {"x": s1["x"] + 1}, meta={"step": 2})
    assert time.monotonic() - t0 < 30
    msg = str(e.value)
    assert msg.startswith(f"{url}: save of step 2: GCS unreachable") and "\n" not in msg, msg
    emu.start()
    assert emu.objects() == before
    assert ckpt.save(2, {"x": s1["x"] + 1}, meta={"step": 2})  # back: saving works again
    ckpt.wait()
    before = emu.objects()

    # 2) The store goes away in the middle of writing step 3 (every request answered 503).
    emu.fail_after_writes(3)
    t0 = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        ckpt.save(3, {"x": s1["x"] + 2}, meta={"step": 3})
        ckpt.wait()
    assert time.monotonic() - t0 < 30
    assert str(e.value).startswith(f"{url}: save of step 3") and "\n" not in str(e.value)
    now = emu.objects()
    assert {k: now.get(k) for k in before} == before  # steps 1 and 2 untouched
    ckpt.close()  # returns at once: the stuck write is abandoned
    emu.recover()
    again = Checkpointer(url)
    assert again.latest_step() == 2
    got, meta = again.restore(abstract_state={"x": jax.ShapeDtypeStruct((16,), jnp.float32)})
    assert meta == {"step": 2} and np.array_equal(np.asarray(got["x"]), np.asarray(s1["x"] + 1))
    again.close()


def test_a_relative_directory_works(tmp_path, monkeypatch):
    """`--workdir=runs/demo` (the README's demo): Orbax needs absolute paths, the Checkpointer
    makes them so."""
    monkeypatch.chdir(tmp_path)
    with Checkpointer("runs/x/checkpoints", async_save=False) as ckpt:
        ckpt.save(1, {"w": np.arange(3.0)}, meta={"step": 1})
    state, meta = Checkpointer("runs/x/checkpoints").restore()
    np.testing.assert_array_equal(state["w"], np.arange(3.0))
    assert meta["step"] == 1 and (tmp_path / "runs" / "x" / "checkpoints" / "1").is_dir()


def test_restore_item_reads_one_entry_as_asked(tmp_path):
    state = {"params": {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4)},
             "anchor": {"w": jnp.zeros((3, 4))}, "opt_state": {"mu": jnp.ones(5)}}
    with Checkpointer(str(tmp_path), async_save=False) as ckpt:
        ckpt.save(2, state)
        got = ckpt.restore_item("params", {"w": np.zeros((3, 4), jnp.bfloat16)})
        assert got["w"].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got["w"], np.float32), np.asarray(state["params"]["w"]))
        with pytest.raises(checkpoint.ShapeMismatch, match="'params' do not match"):
            ckpt.restore_item("params", {"w": np.zeros((4, 4), np.float32)})
        with pytest.raises(ValueError, match="has no 'policy' item"):
            ckpt.restore_item("policy", {"w": np.zeros((3, 4), np.float32)})


def test_params_from_checkpoint_loads_the_policy_of_a_training_run(tmp_path):
    from catjax import loading, models

    cfg = models.get_preset("tiny_qwen3")
    like = models.init_params(cfg, jax.random.key(0))
    trained = jax.tree.map(lambda a: a + 1, like)
    with Checkpointer(str(tmp_path), async_save=False) as ckpt:
        ckpt.save(3, {"params": trained, "anchor": like, "opt_state": {"count": jnp.zeros(())}})
    got = loading.params_from_checkpoint(str(tmp_path), like)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(trained))
    other = models.init_params(cfg.replace(num_layers=cfg.num_layers + 1), jax.random.key(0))
    with pytest.raises(ValueError, match="do not match model.init's architecture"):
        loading.params_from_checkpoint(str(tmp_path), other)
