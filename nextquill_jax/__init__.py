"""NextQuill causal preference fine-tuning in JAX / Flax NNX."""

__version__ = "0.1.0"
