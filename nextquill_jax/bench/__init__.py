"""Benchmarks of the training step: the FLOP model, the timing harness, scaling sweeps and their plots."""
