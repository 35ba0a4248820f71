"""Restatements of the public code that tests and benchmarks compare against (not part of the package)."""
