"""Process-local batches become global jax.Arrays sharded over the mesh's batch axes (8 simulated devices)."""

from jax.sharding import PartitionSpec as P


def test_to_global_batch_places_rows_on_the_batch_axes(programs):
    result = programs.run("data_global_batch.py", devices=8).result
    assert set(result["fields"]) == {"with_ids", "labels", "reference_dce"}
    for key, r in result["fields"].items():
        assert r["global_shape"] == r["local_shape"] and r["global_dtype"] == r["local_dtype"], key
        assert r["values_equal"], key
        assert r["spec"] == str(P(("data", "fsdp"))), (key, r["spec"])
        assert r["shards"] == 8 and r["shard_rows"] == [2], key
        assert r["shards_hold_their_rows"], key  # each device: exactly its rows, replicated over tensor
    error = result["six_rows_error"]
    assert error is not None, "6 rows over 4 batch shards must fail"
    assert "rows_per_batch" in error, error
