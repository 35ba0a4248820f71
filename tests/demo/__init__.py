"""Tests of nextquill_jax.demo."""
