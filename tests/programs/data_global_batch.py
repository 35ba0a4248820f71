"""A process-local batch of 8 rows made a global jax.Array on a (data=2, fsdp=2, tensor=2) mesh; prints one
line `RESULT {json}`.

    data_global_batch.py        (run with 8 devices)

Per field ("with_ids", "labels", "reference_dce"): the local and global shape and dtype, whether the global
array holds the local values, its sharding spec, its number of shards, the set of row counts of its shards and
whether every shard holds exactly the rows its index names. "six_rows_error": the ValueError's message for a
batch of 6 rows (not divisible over the 4 batch shards), null if none was raised.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
from jax.sharding import AxisType

from nextquill_jax.data.global_batch import to_global_batch
from nextquill_jax.parallel import MESH_AXES


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # no arguments; --help
    mesh = jax.make_mesh((2, 2, 2), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    rng = np.random.default_rng(0)
    local = {
        "with_ids": rng.integers(0, 100, (8, 16)).astype(np.int32),
        "labels": rng.integers(0, 100, (8, 5)).astype(np.int32),
        "reference_dce": rng.random((8, 5)).astype(np.float32),
    }
    g = to_global_batch(local, mesh)
    fields = {}
    for key, value in local.items():
        shards = g[key].addressable_shards
        fields[key] = {
            "local_shape": list(value.shape),
            "local_dtype": str(value.dtype),
            "global_shape": list(g[key].shape),
            "global_dtype": str(g[key].dtype),
            "values_equal": bool(np.array_equal(np.asarray(g[key]), value)),
            "spec": str(g[key].sharding.spec),
            "shards": len(shards),
            "shard_rows": sorted({s.data.shape[0] for s in shards}),
            # every device holds exactly its slice of rows, replicated over `tensor`
            "shards_hold_their_rows": all(np.array_equal(np.asarray(s.data), value[s.index]) for s in shards),
        }
    try:
        to_global_batch({"labels": local["labels"][:6]}, mesh)
    except ValueError as e:
        six_rows_error = str(e)
    else:
        six_rows_error = None
    print("RESULT " + json.dumps({"fields": fields, "six_rows_error": six_rows_error}))


if __name__ == "__main__":
    main()
