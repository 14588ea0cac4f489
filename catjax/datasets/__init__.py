"""Dataset readers, batching and TFDS builders behind `catjax.data` (import from there)."""
