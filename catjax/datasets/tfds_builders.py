"""TFDS builders over the same JSONL the readers take, read back without TensorFlow.

They are written in the array_record file format and read through `builder.as_data_source()`, a random
access source (len, [i]) that grain or plain Python can index; `tfds.load`, `as_dataset` and the
tfrecord format would need TensorFlow. Rows go through the catjax readers, so a TFDS build validates
exactly like `load`, and every builder shares one schema: id, question and answer as Text, and messages,
rubrics and meta as JSON strings (a variable-length list of chat turns or rubric dicts has no natural
fixed TFDS feature). Record i of a split is line i of its file (`disable_shuffling`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from catjax.datasets import records
from catjax.datasets.records import Example

_TEXT = ("id", "question", "answer")
_JSON = ("messages", "rubrics", "meta")


def to_features(ex: Example) -> dict[str, str]:
    return {
        "id": ex.id,
        "question": ex.question,
        "answer": "" if ex.answer is None else ex.answer,  # readers never give "", so "" means None
        "messages": json.dumps(list(ex.messages), ensure_ascii=False),
        "rubrics": json.dumps(list(ex.rubrics), ensure_ascii=False),
        "meta": json.dumps(ex.meta, ensure_ascii=False),
    }


def from_features(record: Mapping[str, Any]) -> Example:
    """The Example behind one record of a data source (Text features come back as bytes)."""
    text = {k: v.decode("utf-8") if isinstance(v, bytes) else str(v) for k, v in record.items()}
    return Example(
        id=text["id"],
        question=text["question"],
        messages=tuple(json.loads(text["messages"])),
        answer=text["answer"] or None,
        rubrics=tuple(json.loads(text["rubrics"])),
        meta=json.loads(text["meta"]),
    )


@dataclasses.dataclass(eq=False)
class SourceConfig(tfds.core.BuilderConfig):
    """A HealthBench source file. Its name carries a hash of the file's content, so a different or
    edited file builds into a new directory instead of being shadowed by an old build."""

    path: str = ""


def source_config(path: str | os.PathLike[str]) -> SourceConfig:
    with open(records.local_path(path), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    stem = re.sub(r"[^a-z0-9]+", "_", os.path.basename(str(path)).lower().removesuffix(".jsonl")).strip("_")
    return SourceConfig(name=f"{stem or 'data'}_{digest}", path=str(path), description=str(path))


class _JsonlBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    FORMAT = ""  # key of records.READERS
    DESCRIPTION = ""
    HOMEPAGE = ""
    LICENSE = ""
    # TFDS finds this through importlib_resources (a backport it imports lazily and does not install)
    # for any builder inside a package; the answer is simply this file.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: dataset_info_from_configs() wants a TFDS-style metadata folder.
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {k: tfds.features.Text() for k in _TEXT}
                | {k: tfds.features.Text(doc=f"{k} as JSON") for k in _JSON}
            ),
            homepage=self.HOMEPAGE,
            license=self.LICENSE,
            disable_shuffling=True,
        )

    def _split_files(self) -> dict[str, str]:
        raise NotImplementedError

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # local files only
        return {split: self._generate_examples(path) for split, path in self._split_files().items()}

    def _generate_examples(self, path: str):
        for i, ex in enumerate(records.READERS[self.FORMAT](path)):
            yield i, to_features(ex)


class CatjaxMath500(_JsonlBuilder):
    """MATH-500 (shipped)."""

    name = "catjax_math500"
    FORMAT = "math"
    DESCRIPTION = "MATH-500: 500 MATH test problems (PRM800K split) with gold answers."
    HOMEPAGE = "https://github.com/openai/prm800k"
    LICENSE = "MIT"

    def _split_files(self) -> dict[str, str]:
        return {"test": records.resolve("math500", "test")[1]}


class CatjaxGsm8k(_JsonlBuilder):
    """GSM8K train and test (shipped)."""

    name = "catjax_gsm8k"
    FORMAT = "gsm8k"
    DESCRIPTION = "GSM8K grade-school math word problems; answer is the number after '####'."
    HOMEPAGE = "https://github.com/openai/grade-school-math"
    LICENSE = "MIT"

    def _split_files(self) -> dict[str, str]:
        return {split: records.resolve("gsm8k", split)[1] for split in ("train", "test")}


class CatjaxHealthbench(_JsonlBuilder):
    """One HealthBench JSONL file as split "test"; pick it with `config=source_config(path)`."""

    name = "catjax_healthbench"
    FORMAT = "healthbench"
    DESCRIPTION = "HealthBench conversations with physician rubrics."
    HOMEPAGE = "https://github.com/openai/simple-evals"

    def _split_files(self) -> dict[str, str]:
        if not isinstance(self.builder_config, SourceConfig):
            raise ValueError("catjax_healthbench needs config=source_config(path)")
        return {"test": self.builder_config.path}


BUILDERS: dict[str, type[_JsonlBuilder]] = {
    "math500": CatjaxMath500,
    "gsm8k": CatjaxGsm8k,
    "healthbench": CatjaxHealthbench,
}


def builder(
    name: str, data_dir: str | os.PathLike[str], *, path: str | os.PathLike[str] | None = None
) -> tfds.core.DatasetBuilder:
    """The built builder for `name` under `data_dir`, building it first if needed (seconds).

    Multi-host: build into a host-local data_dir on every host, or on process 0 then barrier before the
    others read a shared one; two hosts building the same directory at once may collide.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown TFDS set {name!r}; known: {', '.join(BUILDERS)}")
    config = None
    if name == "healthbench":
        config = source_config(records.resolve("healthbench", path=path)[1])
    elif path:
        raise ValueError(f"{name} is built from the shipped files; path= is for healthbench")
    b = BUILDERS[name](data_dir=os.fspath(data_dir), config=config, file_format="array_record")
    b.download_and_prepare()  # no-op once built
    return b


def tfds_source(
    name: str,
    data_dir: str | os.PathLike[str],
    *,
    split: str | None = None,
    path: str | os.PathLike[str] | None = None,
) -> Any:
    """`builder(name, data_dir, path=path).as_data_source(split)`: one split's source, or a dict of all
    splits when split is None. Turn a record into an Example with `from_features`."""
    return builder(name, data_dir, path=path).as_data_source(split=split)
