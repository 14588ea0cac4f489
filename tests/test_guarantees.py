"""Bad input gets one clear line: config, data, weights and an HTTP judge.

The command line (`python -m catjax.main`) is run for one case of each kind, in parallel processes:
exit status 2 and exactly one line on stderr. The other cases check, in-process, that the error a
run raises is that one line (what `catjax.main.cli` prints).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from catjax import main, models, storage
from catjax.cat import round as cat_round
from catjax.cat import rubrics
from catjax.cat.judges import HTTPJudge
from catjax.checkpoint import CheckpointError
from catjax.data import Example
from tests.tiny_model import numpy_params, override

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"problem": "What is 1 + 1?", "answer": "2"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "malformed.jsonl").write_text(json.dumps(GOOD) + '\n{"problem": "x", "answer": \n')
    # (Training takes a question without gold: a missing problem is what stops it.)
    (d / "missing.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps({"answer": "x"}) + "\n")
    (d / "empty.jsonl").write_text("")
    cfg = models.get_preset("tiny_qwen3")
    for name in ("truncated", "missing_tensor", "wrong_shape"):
        models.save_pretrained(cfg, numpy_params(cfg), str(d / name))
    weights = d / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for name, change in (("missing_tensor", {"num_hidden_layers": cfg.num_layers + 1}),
                         ("wrong_shape", {"intermediate_size": cfg.mlp_dim * 2})):
        path = d / name / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    return d


def _cli(args: list[str], workdir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "catjax.main", *args, f"--workdir={workdir}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


TINY = "--config=configs/cat_rl.py:model=tiny,runlocal"
CLI_CASES = {
    "unknown key": ([TINY, "--config.optimizer.learning_rate=1e-3"],
                    "unknown config field 'config.optimizer.learning_rate'"),
    "wrong type": ([TINY, "--config.steps=three"], "--config.steps=three: invalid literal for int()"),
    "unknown config arg": (["--config=configs/cat_rl.py:model=tiny,tsk=gsm8k"],
                           "config arg 'tsk' is unknown; known: ['model', 'runlocal', 'task']"),
    "impossible mesh": ([TINY, "--config.mesh.data=3"], "mesh: 1 devices do not divide into [3, -1, 1]"),
    "malformed JSONL": ([TINY, "--config.data.path={d}/malformed.jsonl"],
                        "{d}/malformed.jsonl:2: invalid JSON"),
    "truncated safetensors": ([TINY, "--config.model.init={d}/truncated"], "truncated safetensors file"),
    "no config": ([], "--config is required"),
}


def test_cli_bad_input_is_one_line_and_exit_2(inputs, tmp_path):
    def run(case):
        args, _ = CLI_CASES[case]
        return _cli([a.format(d=inputs) for a in args], tmp_path / case.replace(" ", "_"))

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(CLI_CASES, pool.map(run, CLI_CASES), strict=True))
    for case, proc in results.items():
        want = CLI_CASES[case][1].format(d=inputs)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (case, proc.returncode, proc.stderr[-2000:])
        assert lines[0].startswith("catjax: error: ") and want in lines[0], (case, lines[0])


def _tiny(**changes):
    from configs import cat_rl

    return override(cat_rl.get_config("model=tiny,runlocal"), changes)


@pytest.mark.parametrize(("changes", "want"), [
    ({"data.path": "{d}/missing.jsonl"}, "{d}/missing.jsonl:2: missing field 'problem'"),
    ({"data.path": "{d}/empty.jsonl"}, "{d}/empty.jsonl: empty file, no records"),
    ({"data.limit": 0}, "0 examples do not fill one batch of config.batch_size=2"),
    ({"data.path": "{d}/nowhere.jsonl"}, "nowhere.jsonl"),
    ({"model.init": "{d}/missing_tensor"}, "missing tensor 'model.layers.2."),
    ({"model.init": "{d}/wrong_shape"}, "has shape"),
    ({"model.init": "{d}/nowhere"}, "nowhere"),
    ({"round.prompt_overflow": "sometimes"}, "round.prompt_overflow='sometimes'"),
    ({"rl.kl_mode": "both"}, "rl.kl_mode='both'"),
    ({"mesh.tensor": 2}, "mesh:"),
], ids=["missing field", "empty file", "empty set", "no data file", "missing tensor", "wrong shape",
        "no model", "round setting", "rl setting", "impossible mesh"])
def test_bad_input_stops_the_run_with_one_line(inputs, tmp_path, changes, want):
    config = _tiny(**{k: v.format(d=inputs) if isinstance(v, str) else v for k, v in changes.items()})
    with pytest.raises((ValueError, OSError)) as e:
        main.run(config, str(tmp_path))
    line = main._one_line(e.value)
    assert "\n" not in line and want.format(d=inputs) in line, line
    assert not os.path.exists(tmp_path / "checkpoints")  # stopped before any training state


# ------------------------------------------------------------------------------ the HTTP judge


def _judge(url: str, **kw) -> HTTPJudge:
    return HTTPJudge(url, "judge", timeout_s=2.0, backoff_base_s=0.01, backoff_max_s=0.02,
                     trust_env=False, api_key_env="CATJAX_TEST_JUDGE_KEY", **kw)


@pytest.mark.parametrize(("plan", "want"), [
    ([("status", 500)] * 3, "unreachable for 2/2 pairs (last: HTTP 500 after 3 attempt(s))"),
    ([("status", 503)] * 3, "unreachable for 2/2 pairs (last: HTTP 503 after 3 attempt(s))"),
    ([("body", b"<html>502 Bad Gateway</html>")] * 4, "gave no verdict for 2/2 pairs after 2 ask(s)"),
    ([("body", b"\x00\xff garbage")] * 4, "gave no verdict for 2/2 pairs after 2 ask(s)"),
    ([("content", "Probably.")] * 4, "gave no verdict for 2/2 pairs after 2 ask(s) (last reply: "
                                     "'Probably.')"),
], ids=["500s", "503s", "html", "bytes", "no verdict"])
def test_http_judge_failures_are_one_warning_line_and_counted(server, caplog, plan, want):
    server.plan = list(plan) * 2  # two pairs
    judge = _judge(server.url, max_retries=2, verdict_retries=1)
    with caplog.at_level(logging.WARNING, logger="catjax.cat.judges"):
        got = judge.judge([("[yes] a", "x"), ("[yes] b", "y")])
    assert [v.met for v in got] == [None, None]  # scored as not met, the run goes on
    assert judge.stats.errors + judge.stats.unparsable == 2
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "\n" not in lines[0] and want in lines[0], lines


def test_malformed_rubric_and_verdicts_fall_back_and_are_counted_in_the_round(server, monkeypatch):
    """The anchor's rubric never parses (re-asked, then the single-criterion fallback) and the
    judge's replies hold no verdict (re-asked, then scored as not met): all counted."""
    asks = []

    def anchor_generate(anchor, rc, rng, counts=None):
        def generate(convs):
            asks.append(len(convs))
            return ["<rubric><criterion>only one, and never closed"] * len(convs)
        return generate

    monkeypatch.setattr(cat_round, "_anchor_generate", anchor_generate)
    server.plan = [("content", "<verdict>perhaps</verdict>")] * 8
    judge = _judge(server.url, verdict_retries=1)
    rc = cat_round.RoundConfig(task="freeform", num_rollouts=2, rubric_retries=1)
    ex = Example(id="h", question="q", messages=({"role": "user", "content": "q"},), answer=None,
                 rubrics=(), meta={})
    metrics: Counter = Counter()
    rewards, records = cat_round._freeform_rewards(None, judge, [ex], [["a", "b"]], ["reference"],
                                                   np.asarray([3, 3]), rc, metrics)
    assert asks == [1, 1]  # asked, re-asked once, then the fallback
    assert metrics["synthesis_rubric_fallbacks"] == 1 and metrics["synthesis_rubric_attempts"] == 2
    assert records[0]["rubric"] == rubrics.fallback_rubric("reference")
    assert metrics["verdict_unparsable"] == 2 and rewards.tolist() == [0.0, 0.0]
    assert judge.stats.unparsable == 2 and judge.stats.retries == 2 and judge.stats.calls == 4


@pytest.mark.parametrize("error,workdir", [
    (CheckpointError("gs://b/ckpt: save of step 2: GCS unreachable after 6 attempts: x"), "/tmp/unused"),
    (storage.StorageError("gs://b/run/metrics.jsonl: upload: GCS unreachable after 6 attempts: x"),
     "gs://b/run"),
], ids=["checkpoint", "storage"])
def test_cli_reports_a_storage_or_checkpoint_failure_in_one_line(monkeypatch, capsys, error, workdir):
    def fail(config, workdir):
        raise error

    monkeypatch.setattr(main, "run", fail)
    monkeypatch.setattr(sys, "argv", ["catjax", "--config=configs/cat_rl.py:model=tiny",
                                      f"--workdir={workdir}"])
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    with pytest.raises(SystemExit) as e:
        main.cli()
    assert e.value.code == 1
    assert capsys.readouterr().err == f"catjax: error: {error}\n"
