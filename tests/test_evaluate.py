"""End to end on real weights: the evaluation job over GSM8K with SmolLM2-135M-Instruct, G=4."""

import json
import os
import textwrap

import pytest

from catjax import main
from configs import eval_gsm8k
from tests.devices import run_on_devices


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("eval"))


def _config(n: int):
    config = eval_gsm8k.get_config(f"model=smollm2,n={n},g=4")
    # Short budgets: this checks the job's outputs and resume on real weights, not accuracy.
    config.round.max_new_tokens = 24
    config.round.synthesis_max_new_tokens = 24
    # G itself only: a sub-G synthesis is one more sampler compile of the 30-layer model (~15 s);
    # sub-G widths are covered on the tiny model (tests/test_storage.py).
    config.eval.g_values = (4,)
    return config


def test_evaluation_job_writes_every_output_and_resumes(workdir, capsys):
    summary = main.run(_config(2), workdir)
    table = capsys.readouterr().out
    print(table)
    for name in ("records.jsonl", "summary.json", "scores.jsonl", "accuracy_vs_g.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    assert set(summary["accuracy"]) == {"single", "majority", "min_ppl", "self_select", "mutual",
                                        "synthesis"}
    assert set(summary["accuracy_vs_g"]) == {"4"}
    with open(os.path.join(workdir, "records.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 2
    for rec in records:
        assert len(rec["rollouts"]) == 4 and len(rec["rewards"]) == 4
        assert set(rec["picks"]) == {"single", "min_ppl", "self_select", "mutual"}
        assert rec["gold"] is not None and "synthesis" in rec
        assert all(r in (0.0, 1.0) for r in rec["rewards"])
    assert "synthesis" in table and "majority" in table

    # A rerun finds every record done: nothing is sampled again, the summary is identical.
    again = main.run(_config(2), workdir)
    with open(os.path.join(workdir, "records.jsonl")) as f:
        assert len(f.readlines()) == 2
    assert again["accuracy"] == summary["accuracy"]


def test_config_errors_are_one_line(workdir):
    config = _config(1)
    with pytest.raises(ValueError, match="round.reward_mode='fuzzy'"):
        config.unlock()
        config.round.reward_mode = "fuzzy"
        main.run(config, workdir)
    with pytest.raises(ValueError, match="config arg 'model_name' is unknown"):
        eval_gsm8k.get_config("model_name=x")


def test_a_torn_last_record_is_dropped_and_redone(tmp_path):
    from catjax import evaluate

    path = tmp_path / "records.jsonl"
    path.write_text('{"id": "a", "x": 1}\n{"id": "b", "x": 2}\n{"id": "c", "x"')
    assert set(evaluate._read_done(str(path))) == {"a", "b"}
    assert path.read_text() == '{"id": "a", "x": 1}\n{"id": "b", "x": 2}\n'  # appends stay whole


@pytest.mark.parametrize("bad,why", [('{"id": "b", "x"}', "records.jsonl:2: not a JSON record"),
                                     ('{"x": 2}', "records.jsonl:2: missing field 'id'")])
def test_a_bad_record_line_is_a_one_line_error_naming_it(tmp_path, bad, why):
    from catjax import evaluate

    path = tmp_path / "records.jsonl"
    path.write_text('{"id": "a"}\n' + bad + '\n{"id": "c"}\n')
    with pytest.raises(ValueError, match=why):
        evaluate._read_done(str(path))


def test_records_of_another_config_are_refused_before_any_weights_load(tmp_path, monkeypatch):
    from catjax import evaluate, loading, storage

    wd = tmp_path / "eval"
    wd.mkdir()
    (wd / "records.jsonl").write_text('{"id": "a"}\n')
    config = _config(2)
    evaluate._check_same_inputs(storage.Workdir(str(wd)), config, True)  # kept beside them
    assert (wd / "record_inputs.json").exists()
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    config.round.num_rollouts = 8
    with pytest.raises(ValueError, match=r"written with another config \(round differ\)"):
        main.run(config, str(wd))
    config.round.num_rollouts = 4
    config.eval.batch_size = 7  # grouping only: still the same records
    evaluate._check_same_inputs(storage.Workdir(str(wd)), config, True)


MESH = textwrap.dedent("""
    import json, os, sys, tempfile
    import jax, numpy as np
    from catjax import evaluate, hlo, loading, parallel, scoring
    from configs import eval_math500
    config = eval_math500.get_config("model=tiny,n=2,g=2")
    config.model.init, config.model.tokenizer = "random:tiny_qwen3", "smollm2"
    config.model.vocab_size = 49152
    config.round.max_new_tokens = config.round.synthesis_max_new_tokens = 12
    config.eval.update(g_values=(2,), batch_size=2,
                       baselines=("majority", "min_ppl", "self_select", "mutual"))
    assert len(jax.local_devices()) == 4 and config.mesh.data == -1
    calls = []
    program = scoring._gathered_logprobs
    scoring._gathered_logprobs = lambda *a, **k: calls.append((a, k)) or program(*a, **k)
    one_device = loading.load_model(config.model, seed=config.seed)  # passed in: left as is
    runs = {}
    for name, policy in (("four chips", None), ("one device", one_device)):
        wd = tempfile.mkdtemp()
        evaluate.run(config, wd, policy=policy)
        with open(os.path.join(wd, "records.jsonl")) as f:
            runs[name] = [json.loads(line) for line in f]
    # The same samples, picks and syntheses whichever way the rows were split.
    assert runs["four chips"] == runs["one device"]
    # The mutual-predictability scorer's rows stayed on their chips too.
    text = program.lower(*calls[0][0], **calls[0][1]).compile().as_text()
    assert not hlo.collectives(text), sorted(set(hlo.collectives(text)))
    assert calls[0][0][1]["embed"].sharding.mesh.devices.size == 4
    print("OK")
""")


def test_evaluation_splits_rows_over_the_hosts_chips_with_the_same_records():
    run_on_devices(MESH, 4, timeout=400)
