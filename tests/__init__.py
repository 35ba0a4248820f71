"""The test suite; its folders mirror the package's subpackages (tests/models tests nextquill_jax.models)."""
