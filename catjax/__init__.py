"""catjax: Compute as Teacher (CaT) in JAX."""

__version__ = "0.1.0"
