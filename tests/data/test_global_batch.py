"""Process-local batches become global jax.Arrays sharded over the mesh's batch axes (8 simulated devices)."""

import jax
import numpy as np
from jax.sharding import AxisType
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


def test_the_global_batch_holds_every_process_s_rows(monkeypatch):
    """With several processes the global array has `rows_per_batch * process_count` rows, each process's
    rows on its own devices: the programs above run one process, where that product is the local row count,
    so a global shape that forgot the other processes' rows would pass them. Two processes are simulated by
    `jax.process_count`, and the shape handed to JAX is recorded instead of assembled (one process cannot
    assemble rows it does not hold)."""
    from nextquill_jax.data.global_batch import to_global_batch
    from nextquill_jax.parallel import MESH_AXES

    mesh = jax.make_mesh((1, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    handed: dict[str, tuple[int, ...]] = {}

    def record(sharding: jax.sharding.Sharding, local: np.ndarray, global_shape: tuple[int, ...]) -> str:
        handed[str(local.dtype)] = global_shape
        return "assembled"

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "make_array_from_process_local_data", record)
    local = {"labels": np.zeros((3, 5), np.int32), "reference_dce": np.zeros((3, 5), np.float32)}
    assert to_global_batch(local, mesh) == {"labels": "assembled", "reference_dce": "assembled"}
    assert handed == {"int32": (6, 5), "float32": (6, 5)}
