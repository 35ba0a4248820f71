"""Tests of nextquill_jax.bench."""
