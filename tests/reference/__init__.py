"""Restatements that tests and benchmarks compare against (not part of the package): of the public code, and
of what the package takes from a library."""
