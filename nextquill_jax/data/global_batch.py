"""Process-local batches to global `jax.Array`s on a mesh (what the sharded train step consumes)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nextquill_jax.parallel import check_divisible

BATCH_SPEC = PartitionSpec(("data", "fsdp"))


def to_global_batch(
    local_batch: Mapping[str, np.ndarray], mesh: Mesh, spec: PartitionSpec = BATCH_SPEC
) -> dict[str, jax.Array]:
    """Assemble every process's local rows into global arrays sharded by `spec` over `mesh`.

    Each process passes its own `[rows_per_batch, ...]` arrays (from `BatchPipeline`); the result has
    `rows_per_batch * jax.process_count()` rows, this process's rows placed on its own devices, in process
    order (the order `BatchPipeline` deals rows in). Dimensions after the first stay unsharded unless `spec`
    names them.

    Raises:
        ValueError: if the global row count cannot be split over the mesh axes of `spec[0]`, naming the fix.
    """
    sharding = NamedSharding(mesh, spec)
    out = {}
    for key, value in local_batch.items():
        array = np.asarray(value)
        global_shape = (array.shape[0] * jax.process_count(), *array.shape[1:])
        check_divisible(
            global_shape,
            spec,
            mesh,
            f"batch[{key!r}] (fix: make data.batching.rows_per_batch "
            f"times the process count a multiple of the mesh's batch axes)",
        )
        out[key] = jax.make_array_from_process_local_data(sharding, array, global_shape)
    return out
