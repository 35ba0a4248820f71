"""Tests of nextquill_jax.train."""
