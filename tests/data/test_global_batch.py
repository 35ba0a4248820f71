"""Process-local batches become global jax.Arrays sharded over the mesh's batch axes (8 simulated devices)."""

from tests.multidevice import run_with_devices


def test_to_global_batch_places_rows_on_the_batch_axes():
    out = run_with_devices(
        """
        import jax, numpy as np
        from jax.sharding import AxisType, PartitionSpec as P
        from nextquill_jax.data.global_batch import to_global_batch
        from nextquill_jax.parallel import MESH_AXES

        mesh = jax.make_mesh((2, 2, 2), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
        rng = np.random.default_rng(0)
        local = {"with_ids": rng.integers(0, 100, (8, 16)).astype(np.int32),
                 "labels": rng.integers(0, 100, (8, 5)).astype(np.int32),
                 "reference_dce": rng.random((8, 5)).astype(np.float32)}
        g = to_global_batch(local, mesh)
        for key, value in local.items():
            assert g[key].shape == value.shape and g[key].dtype == value.dtype, key
            np.testing.assert_array_equal(np.asarray(g[key]), value)
            assert g[key].sharding.spec == P(("data", "fsdp")), g[key].sharding
            shards = g[key].addressable_shards
            assert len(shards) == 8 and {s.data.shape[0] for s in shards} == {2}, key
            for s in shards:  # every device holds exactly its slice of rows, replicated over `tensor`
                np.testing.assert_array_equal(np.asarray(s.data), value[s.index])
        try:
            to_global_batch({"labels": local["labels"][:6]}, mesh)
        except ValueError as e:
            assert "rows_per_batch" in str(e), e
        else:
            raise AssertionError("6 rows over 4 batch shards must fail")
        print("OK")
        """
    )
    assert "OK" in out
