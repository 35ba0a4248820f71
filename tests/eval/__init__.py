"""Tests of nextquill_jax.eval."""
