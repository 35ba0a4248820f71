"""Tests of nextquill_jax.data."""
