"""Evaluation of trained models: generation with text metrics, and per-token causal effect reports."""
