"""catjax.data: shipped sets, strict JSONL readers, host shards, resumable batches, TFDS round trip."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from catjax import data
from catjax.datasets import records

HEALTHBENCH = data.healthbench_default_path()
# The shared HealthBench sample sits beside the checkout (as in CI): missing, the test fails.
needs_healthbench = pytest.mark.usefixtures("healthbench_present")


@pytest.fixture
def healthbench_present():
    if HEALTHBENCH is None:
        pytest.fail("HealthBench sample missing: set CATJAX_HEALTHBENCH or place shared/ beside the repo")


def _write(tmp_path: Path, rows: list, name: str = "x.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --- shipped data ---------------------------------------------------------------------------------


def test_shipped_counts_and_fields():
    math500 = data.load("math500")
    assert len(math500) == 500
    assert len({ex.id for ex in math500}) == 500
    assert all(ex.answer and ex.question and not ex.messages and not ex.rubrics for ex in math500)
    assert math500[0].id == "test/precalculus/807.json"
    assert math500[0].meta == {"subject": "Precalculus", "level": 2}
    assert {ex.meta["level"] for ex in math500} == {1, 2, 3, 4, 5}

    test, train = data.load("gsm8k"), data.load("gsm8k", split="train")
    assert (len(test), len(train)) == (1319, 7473)
    assert test[0].id == "gsm8k/test/0" and test[0].answer == "18"
    assert len(data.load("gsm8k", limit=7)) == 7
    assert data.load("math500", path="", limit=3) == math500[:3]  # configs spell "no path" as ""


def test_shipped_licences_are_mit():
    for licence in ("math500/LICENSE.prm800k", "gsm8k/LICENSE"):
        assert (data.DATA_FILES / licence).read_text().startswith("MIT License")


def test_gsm8k_gold_extraction(tmp_path):
    assert data.gsm8k_gold("5 * 200 = <<5*200=1000>>1,000 ducks.\n#### 1,000") == "1000"
    assert data.gsm8k_gold("#### 1,234,567") == "1234567"
    assert data.gsm8k_gold("It falls #### 3 then\n#### -2.5 ") == "-2.5"  # the last marker counts
    for bad in ("no marker 18", "#### ", "#### eighteen"):
        with pytest.raises(ValueError):
            data.gsm8k_gold(bad)
    path = _write(tmp_path, [{"question": "How many?", "answer": "So 1,000.\n#### 1,000"}])
    assert data.read_gsm8k(path)[0].answer == "1000"
    # The shipped test split has 14 golds with thousands commas; all come out as plain digits.
    raw = [json.loads(line)["answer"] for line in (data.DATA_FILES / "gsm8k/test.jsonl").open()]
    comma = [i for i, a in enumerate(raw) if "," in a.rpartition("####")[2]]
    assert len(comma) == 14
    test = data.load("gsm8k")
    assert all(test[i].answer.lstrip("-").replace(".", "").isdigit() for i in comma)
    assert test[comma[0]].answer == raw[comma[0]].rpartition("####")[2].strip().replace(",", "")


# --- HealthBench ----------------------------------------------------------------------------------


@needs_healthbench
def test_healthbench_sample():
    hb = data.load("healthbench")
    assert len(hb) == 30
    assert hb[0].id == "1f548d5b-cd00-49a0-b327-283a2e00debd"
    points = [r["points"] for ex in hb for r in ex.rubrics]
    assert len(points) == 352 and sum(p < 0 for p in points) == 102
    assert sum("level:cluster" in r["tags"] for ex in hb for r in ex.rubrics) == 43
    assert [r["points"] for r in hb[0].rubrics][:4] == [10, 9, 7, -10]
    assert set(hb[0].rubrics[0]) == {"criterion", "points", "tags"}
    for ex in hb:
        assert ex.messages[-1]["role"] == "user" and ex.question == ex.messages[-1]["content"]
        assert ex.meta["canary"].startswith("healthbench:")
    assert sum(ex.answer is not None for ex in hb) == 24
    assert len({t.split(":")[1] for ex in hb for t in ex.meta["example_tags"] if t.startswith("theme:")}) == 7


def test_healthbench_default_is_configurable(tmp_path, monkeypatch):
    row = {
        "prompt_id": "p1",
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
        "rubrics": [{"criterion": "Says hello", "points": 3, "tags": ["axis:accuracy"]}],
        "ideal_completions_data": None,
    }
    path = _write(tmp_path, [row])
    monkeypatch.setenv(data.HEALTHBENCH_ENV, str(path))
    (ex,) = data.load("healthbench")
    assert (ex.id, ex.question, ex.answer, len(ex.messages)) == ("p1", "Hi?", None, 2)
    assert ex.rubrics == ({"criterion": "Says hello", "points": 3, "tags": ["axis:accuracy"]},)

    monkeypatch.delenv(data.HEALTHBENCH_ENV)
    monkeypatch.setattr(records, "SHARED_HEALTHBENCH", tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="path="):
        data.load("healthbench")
    assert data.load("healthbench", path=path)[0].id == "p1"


# --- malformed input ------------------------------------------------------------------------------

_GOOD = {
    "math": {"problem": "1+1?", "answer": "2", "level": 1},
    "gsm8k": {"question": "1+1?", "answer": "One and one.\n#### 2"},
    "healthbench": {
        "prompt_id": "p",
        "prompt": [{"role": "user", "content": "Hi?"}],
        "rubrics": [{"criterion": "c", "points": 5, "tags": []}],
    },
}


def _hb(**change) -> dict:
    return {**_GOOD["healthbench"], **change}


@pytest.mark.parametrize(
    "fmt, bad, message",
    [
        ("math", '{"problem": "x", "answer": ', "invalid JSON"),
        ("math", '["problem", "answer"]', "expected a JSON object"),
        ("math", {"problem": "x"}, "missing field 'answer'"),
        ("math", {"problem": 5, "answer": "2"}, "field 'problem' must be str, got int"),
        ("math", {"problem": "  ", "answer": "2"}, "field 'problem' is empty"),
        ("math", {"problem": "x", "answer": "2", "level": 2.5}, "field 'level' must be int or str"),
        ("math", {"problem": "x", "answer": True}, "field 'answer' must be str, got bool"),
        ("math", {"problem": "x", "answer": ["2"]}, "field 'answer' must be str, got list"),
        ("math", '{"problem": "x", "answer": NaN}', "field 'answer' is nan, not a finite number"),
        ("math", {"problem": "x", "answer": " "}, "field 'answer' is empty"),
        ("gsm8k", {"question": "x", "answer": "no gold here"}, "field 'answer': no '####'"),
        ("gsm8k", {"answer": "#### 2"}, "missing field 'question'"),
        ("healthbench", _hb(prompt="Hi?"), "field 'prompt' must be list, got str"),
        ("healthbench", _hb(prompt=[]), "field 'prompt' is empty"),
        ("healthbench", _hb(prompt=[{"role": "assistant", "content": "x"}]), "end with a non-empty user"),
        ("healthbench", _hb(prompt=[{"role": "bot", "content": "x"}]), "'prompt[0].role' is 'bot'"),
        ("healthbench", _hb(rubrics=[{"criterion": "c", "points": "5", "tags": []}]), "'rubrics[0].points'"),
        ("healthbench", _hb(rubrics=[{"criterion": "c", "points": True, "tags": []}]), "be int, got bool"),
        ("healthbench", _hb(rubrics=[{"points": 5, "tags": []}]), "missing field 'rubrics[0].criterion'"),
        ("healthbench", _hb(rubrics=[{"criterion": "c", "points": 1, "tags": [3]}]), "'rubrics[0].tags[0]'"),
        ("healthbench", {k: v for k, v in _hb().items() if k != "rubrics"}, "missing field 'rubrics'"),
    ],
)
def test_malformed_row_names_file_line_and_field(tmp_path, fmt, bad, message):
    path = _write(tmp_path, [_GOOD[fmt], bad, _GOOD[fmt]])
    with pytest.raises(ValueError) as err:
        data.load(path, format=fmt)
    assert str(err.value).startswith(f"{path}:2: ")
    assert message in str(err.value)


def test_blank_lines_and_empty_files(tmp_path):
    good = json.dumps(_GOOD["math"])
    assert len(data.read_math(_write(tmp_path, [good, good, "", ""]))) == 2  # trailing blanks are fine
    with pytest.raises(ValueError, match=r"x\.jsonl:2: blank line"):
        data.read_math(_write(tmp_path, [good, "", good]))
    for text in ("", "\n\n  \n"):
        (tmp_path / "empty.jsonl").write_text(text)
        with pytest.raises(ValueError, match=r"empty\.jsonl: empty file"):
            data.read_gsm8k(tmp_path / "empty.jsonl")


def test_gcs_path_goes_through_storage(tmp_path, monkeypatch):
    local = _write(tmp_path, [_GOOD["math"], {"problem": "x"}])
    fetched = []
    monkeypatch.setattr(records.storage, "download", lambda url: fetched.append(url) or str(local))
    with pytest.raises(ValueError, match=r"^gs://bucket/m\.jsonl:2: missing field 'answer'"):
        data.load("gs://bucket/m.jsonl", format="math")
    assert fetched == ["gs://bucket/m.jsonl"]


def test_duplicate_ids_are_one_line_errors(tmp_path):
    row = {"problem": "1+1?", "answer": "2", "unique_id": "u"}
    path = _write(tmp_path, [row, {**row, "unique_id": "v"}, row])
    with pytest.raises(ValueError, match=r"x\.jsonl: records 1 and 3 share the id 'u'"):
        data.load(path, format="math")


def test_numeric_gold_answers_are_read_as_text(tmp_path):
    """AMC 23 stores its answers as JSON numbers (27.0)."""
    answers = [27.0, 3159, -4, 0.5, 1e-5, 10**30, 2.5e20]
    rows = [{"problem": f"q{i}", "answer": a} for i, a in enumerate(answers)]
    assert [ex.answer for ex in data.load(_write(tmp_path, rows), format="math")] == \
        ["27", "3159", "-4", "0.5", "0.00001", str(10**30), "250000000000000000000"]


@pytest.mark.parametrize("fmt, row", [
    ("math", {"problem": "x", "answer": ""}),
    ("math", {"problem": "x", "answer": None}),
    ("math", {"problem": "x"}),
    ("gsm8k", {"question": "x", "answer": "no gold here"}),
    ("gsm8k", {"question": "x"}),
])
def test_training_reads_questions_without_gold(tmp_path, fmt, row):
    """CaT-RL never reads gold (MATH's train split has a row whose answer is empty): with
    require_answers=False such a row is a question with answer None; by default, an error."""
    path = _write(tmp_path, [_GOOD[fmt], row])
    with pytest.raises(ValueError, match=r"x\.jsonl:2: (missing )?field 'answer'"):
        data.load(path, format=fmt)
    got = data.load(path, format=fmt, require_answers=False)
    assert got[0].answer is not None and got[1].answer is None and got[1].question == "x"
    with pytest.raises(ValueError, match="field 'problem' is empty"):  # other fields stay strict
        data.load(_write(tmp_path, [{"problem": "", "answer": ""}]), format="math",
                  require_answers=False)


def test_load_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="format="):
        data.load(tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="no split 'dev'"):
        data.load("gsm8k", split="dev")
    with pytest.raises(ValueError, match="limit"):
        data.load("math500", limit=-1)


# --- sharding and batches -------------------------------------------------------------------------


def test_shard_is_strided_disjoint_and_equal():
    items = list(range(103))
    shards = [data.shard(items, i, 4) for i in range(4)]
    assert shards[1][:3] == [1, 5, 9]
    assert {len(s) for s in shards} == {25}  # 103 % 4 = 3 items dropped so every host has as many steps
    assert sorted(itertools.chain(*shards)) == items[:100]
    assert data.shard(items, 1, 4) == shards[1]
    assert len(data.shard(items, 0, 4, drop_remainder=False)) == 26
    with pytest.raises(ValueError):
        data.shard(items, 4, 4)


def test_batches_follow_seeded_epoch_permutations():
    items = list(range(10))
    it = data.batches(items, 3, seed=7)
    steps = list(itertools.islice(it, 9))  # 3 steps per epoch: 3 epochs
    for epoch in range(3):
        order = np.random.default_rng([7, epoch]).permutation(10)
        assert steps[3 * epoch : 3 * epoch + 3] == [order[i : i + 3].tolist() for i in (0, 3, 6)]
    assert all(len(b) == 3 for b in steps)
    assert steps[:3] != steps[3:6]  # reshuffled each epoch
    assert steps == list(itertools.islice(data.batches(items, 3, seed=7), 9))
    assert steps != list(itertools.islice(data.batches(items, 3, seed=8), 9))
    assert data.step_position(7, 10, 3) == (2, 3)


@pytest.mark.parametrize("start", [0, 1, 4, 5, 11, 23])
def test_batches_resume_exactly(start):
    items = [f"q{i}" for i in range(23)]
    fresh = list(itertools.islice(data.batches(items, 5, seed=3), 30))
    resumed = list(itertools.islice(data.batches(items, 5, seed=3, start_step=start), 30 - start))
    assert resumed == fresh[start:]


def test_batches_argument_errors():
    with pytest.raises(ValueError):
        data.batches([1, 2], 3, seed=0)
    with pytest.raises(ValueError):
        data.batches([1, 2, 3], 1, seed=-1)
    with pytest.raises(ValueError):
        data.batches([1, 2, 3], 1, seed=0, start_step=-1)


# --- TFDS -----------------------------------------------------------------------------------------


def test_tfds_round_trip(tmp_path):
    source = data.tfds_source("math500", tmp_path, split="test")
    assert len(source) == 500
    assert [data.example_from_tfds(source[i]) for i in range(len(source))] == data.load("math500")
    assert (tmp_path / "catjax_math500/1.0.0/catjax_math500-test.array_record-00000-of-00001").exists()
    assert len(data.tfds_source("math500", tmp_path)["test"]) == 500  # reopens the built copy
    if HEALTHBENCH is not None:
        hb = data.tfds_source("healthbench", tmp_path, split="test")
        assert [data.example_from_tfds(r) for r in hb] == data.load("healthbench")
