"""A gs:// workdir (emulated GCS): every file a job writes lands in the bucket, nothing named `gs:`
appears locally, a rerun resumes from what is in the bucket, and an unreachable bucket fails in one
line within seconds. Local workdirs are used as they are.

The jobs run the tiny random model (1 question x G=2, 4 new tokens; evaluation and training share
their sampler's compiled shapes) under a persistent compilation cache, so reruns skip compiling.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from catjax import evaluate, metrics, storage
from catjax.cat import round as cat_round
from tests.gcs_emulator import gcs_emulator  # noqa: F401  (pytest fixture)
from tests.tiny_model import compile_cache, override

ROOT = Path(__file__).resolve().parents[1]
TINY = {"batch_size": 1, "round.num_rollouts": 2, "round.max_new_tokens": 4,
        "round.synthesis_max_new_tokens": 4}


@pytest.fixture
def fast_retries():
    saved = dict(storage.GCS_RETRIES)
    storage.set_retries(max_retries=2, initial_delay_s=0.05, max_delay_s=0.1, timeout_s=5.0)
    yield
    storage.set_retries(**saved)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """An empty cwd and a private temp dir: a stray `gs:` directory or a leftover mirror shows here."""
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    yield tmp_path
    assert not _named_gs(tmp_path) and not _named_gs(ROOT, deep=False)


def _named_gs(root: Path, deep: bool = True) -> list[str]:
    if not deep:
        return [n for n in os.listdir(root) if n.startswith("gs:")]
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files
            if n.startswith("gs:")]


def _mirrors(tmp_path: Path) -> list[str]:
    gc.collect()
    return [n for n in os.listdir(tmp_path / "tmp") if n.startswith("catjax-workdir-")]


def _rows(emu, name: str) -> list[dict]:
    return [json.loads(line) for line in emu.objects(name)[name].decode().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------- Workdir


def test_local_workdir_is_used_as_it_is(tmp_path):
    wd = storage.Workdir(str(tmp_path / "run"))
    assert wd.local == str(tmp_path / "run") and wd.file("a.json") == str(tmp_path / "run" / "a.json")
    assert not wd.pull("a.json")
    os.makedirs(wd.local)
    Path(wd.file("a.json")).write_text("{}")
    assert wd.pull("a.json")
    wd.push("a.json")  # nothing to do
    wd.close()
    assert os.listdir(tmp_path / "run") == ["a.json"]
    writer = metrics.MetricWriter(str(tmp_path / "run"), enabled=True)
    writer.write(1, {"x": 1.0})
    writer.close()
    assert writer.path == str(tmp_path / "run" / "metrics.jsonl")
    assert metrics.read(writer.path) == [{"step": 1, "x": 1.0}]


def test_push_pull_and_an_unreachable_bucket_fails_fast_in_one_line(
        gcs_emulator, fast_retries, isolated):  # noqa: F811
    emu = gcs_emulator
    wd = storage.Workdir(f"{emu.url}/run")
    assert not wd.pull("records.jsonl")
    Path(wd.file("records.jsonl")).write_text("a\n")
    os.makedirs(wd.file("tb"))
    Path(wd.file("tb/events.1")).write_text("e")
    wd.push("records.jsonl", "tb")
    writes = len(emu.requests)
    wd.push("tb")  # unchanged files under a directory are not sent again
    assert len(emu.requests) == writes
    assert emu.objects("run/") == {"run/records.jsonl": b"a\n", "run/tb/events.1": b"e"}
    again = storage.Workdir(f"{emu.url}/run")
    assert again.pull("records.jsonl") and Path(again.file("records.jsonl")).read_text() == "a\n"
    again.close()
    for outage in (emu.stop, lambda: (emu.start(), emu.fail_after_writes(0))):
        outage()
        for call in (lambda: wd.push("records.jsonl"), lambda: storage.Workdir(f"{emu.url}/x").pull("m"),
                     lambda: metrics.MetricWriter(f"{emu.url}/x", enabled=True)):
            t0 = time.monotonic()
            with pytest.raises(storage.StorageError) as e:
                call()
            assert time.monotonic() - t0 < 10
            msg = str(e.value)
            assert msg.startswith(f"{emu.url}/") and "GCS unreachable after 2 attempts" in msg, msg
            assert "\n" not in msg
    emu.recover()
    wd.close()


def test_metric_writer_on_gs_uploads_rows_and_continues_the_buckets_rows(
        gcs_emulator, isolated, monkeypatch):  # noqa: F811
    emu, url = gcs_emulator, f"{gcs_emulator.url}/run"
    # An interval no run of this test outlasts (a loaded CI machine took over a second once).
    monkeypatch.setattr(metrics, "PUSH_INTERVAL_S", 3600.0)
    writer = metrics.MetricWriter(url, enabled=True)
    for step in (1, 2, 3):  # within the interval: the first row goes up at once, the others at close
        writer.write(step, {"loss": float(step)})
    assert [r["step"] for r in _rows(emu, "run/metrics.jsonl")] == [1]
    writer.close()
    assert [r["step"] for r in _rows(emu, "run/metrics.jsonl")] == [1, 2, 3]
    assert any(n.startswith("run/tb/events.") for n in emu.objects("run/tb/"))
    # A resumed run (a fresh mirror) from step 2: row 3 is redone, not duplicated.
    resumed = metrics.MetricWriter(url, enabled=True)
    resumed.truncate_after(2)
    assert [r["step"] for r in _rows(emu, "run/metrics.jsonl")] == [1, 2]
    resumed.write(3, {"loss": 0.5})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in _rows(emu, "run/metrics.jsonl")] == [(1, 1.0), (2, 2.0),
                                                                                   (3, 0.5)]
    del writer, resumed
    assert not _mirrors(isolated)



# ------------------------------------------------------------------------------ the jobs


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """Questions of one length (every step and batch has the same shapes) and a compile cache."""
    root = tmp_path_factory.mktemp("gs_jobs")
    (root / "questions.jsonl").write_text("".join(
        json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(3)))
    return root




@functools.lru_cache(maxsize=1)
def _tiny_model() -> cat_round.Model:
    """configs/cat_rl.py's model=tiny (random tiny Qwen 3, SmolLM2's tokenizer), numpy-initialized."""
    from catjax import loading, models, text
    from tests.tiny_model import numpy_params

    cfg = models.get_preset("tiny_qwen3", vocab_size=49_152)
    return cat_round.Model(cfg, numpy_params(cfg), text.load_tokenizer(loading.resolve_init("smollm2")))


def _policy() -> cat_round.Model:
    m = _tiny_model()  # the trainer donates the weights it is given: a copy each run
    return cat_round.Model(m.cfg, jax.tree.map(jnp.copy, m.params), m.tokenizer)





def _eval_config(shared: Path):
    from configs import eval_math500

    c = eval_math500.get_config("model=tiny,n=3,g=2")
    return override(c, {**{k: v for k, v in TINY.items() if k != "batch_size"},
                        "data.path": str(shared / "questions.jsonl"), "eval.batch_size": 1,
                        "eval.g_values": (2,), "eval.baselines": ("majority", "min_ppl")})


def test_evaluate_on_gs_writes_to_the_bucket_and_resumes_from_it(
        gcs_emulator, isolated, shared, monkeypatch):  # noqa: F811
    emu, url = gcs_emulator, f"{gcs_emulator.url}/runs/eval"
    real, done = evaluate.evaluate_batch, []

    def batch(policy, examples, *args, **kwargs):
        if len(done) == 1 and crash:
            raise RuntimeError("simulated crash")
        done.extend(ex.id for ex in examples)
        return real(policy, examples, *args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_batch", batch)
    with compile_cache(shared / "jax-cache"):
        crash = True
        with pytest.raises(RuntimeError, match="simulated crash"):
            evaluate.run(_eval_config(shared), url, policy=_policy())
        first = [r["id"] for r in _rows(emu, "runs/eval/records.jsonl")]
        assert first == done and len(first) == 1  # the finished batch reached the bucket
        crash = False
        summary = evaluate.run(_eval_config(shared), url, policy=_policy())
        assert len(done) == 3 and done[0] not in done[1:]  # only the missing questions were run
        names = set(emu.objects("runs/eval/"))
        assert {f"runs/eval/{n}" for n in ("records.jsonl", "summary.json", "scores.jsonl",
                                           "accuracy_vs_g.png")} <= names
        assert [r["id"] for r in _rows(emu, "runs/eval/records.jsonl")] == done
        assert len(_rows(emu, "runs/eval/scores.jsonl")) == 3
        # Everything done: a rerun samples nothing and summarises the bucket's records.
        again = evaluate.run(_eval_config(shared), url, policy=_policy())
    assert len(done) == 3 and again["accuracy"] == summary["accuracy"]
    assert not _mirrors(isolated)


def test_trainer_on_gs_writes_to_the_bucket_and_resumes_from_it(
        gcs_emulator, isolated, shared, capsys):  # noqa: F811
    from catjax.rl import trainer
    from configs import cat_rl

    emu, url = gcs_emulator, f"{gcs_emulator.url}/runs/rl"
    config = lambda steps: override(cat_rl.get_config("model=tiny,runlocal"), {
        **TINY, "steps": steps, "data.path": str(shared / "questions.jsonl")})
    with compile_cache(shared / "jax-cache"):
        trainer.train(config(1), url, policy=_policy())
        assert not _mirrors(isolated)  # the rerun can only resume from the bucket
        names = set(emu.objects("runs/rl/"))
        assert {"runs/rl/metrics.jsonl", "runs/rl/curves.png", "runs/rl/export/config.json",
                "runs/rl/export/model.safetensors"} <= names, names
        assert any(n.startswith("runs/rl/tb/events.") for n in names), names
        assert any(n.startswith("runs/rl/checkpoints/1/") for n in names), names
        assert [r["step"] for r in _rows(emu, "runs/rl/metrics.jsonl")] == [1]
        capsys.readouterr()
        trainer.train(config(2), url, policy=_policy())
    assert "resumed from step 1" in capsys.readouterr().out
    assert [r["step"] for r in _rows(emu, "runs/rl/metrics.jsonl")] == [1, 2]
    assert any(n.startswith("runs/rl/checkpoints/2/") for n in emu.objects("runs/rl/"))
    assert not _mirrors(isolated)


def test_download_fetches_an_object_again_when_it_was_rewritten(gcs_emulator, isolated):  # noqa: F811
    """The cache is keyed by the object's generation, not its size alone: a rewrite with the
    same size is fetched again; an unchanged object is not (a listing, no media request)."""
    emu, src, cache = gcs_emulator, isolated / "src", str(isolated / "cache")
    src.mkdir()
    (src / "config.json").write_text('{"a": 1}')
    (src / "w.bin").write_bytes(b"1234")
    storage.upload_dir(str(src), f"{emu.url}/model")
    local = storage.download(f"{emu.url}/model", cache)
    assert sorted(os.listdir(local)) == ["config.json", "w.bin"]  # the stamps live apart
    sent = len(emu.requests)
    assert storage.download(f"{emu.url}/model", cache) == local
    assert not [r for r in emu.requests[sent:] if "alt=media" in r]
    (src / "config.json").unlink()
    (src / "w.bin").write_bytes(b"5678")  # same size, new content
    storage.upload_dir(str(src), f"{emu.url}/model")  # w.bin only
    sent = len(emu.requests)
    storage.download(f"{emu.url}/model", cache)
    assert Path(local, "w.bin").read_bytes() == b"5678"
    fetched = [r for r in emu.requests[sent:] if "alt=media" in r]
    assert len(fetched) == 1 and "w.bin" in fetched[0], fetched
    assert Path(storage.download(f"{emu.url}/model/config.json", cache)).read_text() == '{"a": 1}'
    Path(local, "w.bin").write_bytes(b"56")  # a cached file cut short: fetched again
    storage.download(f"{emu.url}/model", cache)
    assert Path(local, "w.bin").read_bytes() == b"5678"
