"""Tests of nextquill_jax.loss."""
