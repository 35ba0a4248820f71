"""Tests of nextquill_jax.models."""
