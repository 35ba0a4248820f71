"""The train step's micro-batch split of a global batch of 8 rows on a (data=2, fsdp=2, tensor=1) mesh;
prints one line `RESULT {json}`.

    train_split_micro_batches.py        (run with 4 devices)

`split_micro_batches` into 2 micro-batches under `jax.jit`: "shape" of the split labels, "values_equal"
(micro-batch m holds rows m, m + 2, ...), and per device "moved": whether the rows of its shard of the split
differ from those of its shard of the batch (the docstring's claim: the reshape moves no data), and
"shard_shape" (every device holds a part of every micro-batch).
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from nextquill_jax.data.global_batch import to_global_batch
from nextquill_jax.parallel import make_mesh
from nextquill_jax.train.step import split_micro_batches


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # no arguments; --help
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 1})
    rows = np.arange(8, dtype=np.int32)
    local = {"labels": rows[:, None] * 10 + np.arange(3, dtype=np.int32)}  # row r holds 10 r, 10 r + 1, ...
    batch = to_global_batch(local, mesh)
    micro = jax.jit(lambda b: split_micro_batches(b, 2, mesh))(batch)["labels"]
    before = {
        s.device.id: sorted(set(np.asarray(s.data)[:, 0] // 10)) for s in batch["labels"].addressable_shards
    }
    after = {s.device.id: np.asarray(s.data) for s in micro.addressable_shards}
    print(
        "RESULT "
        + json.dumps(
            {
                "shape": list(micro.shape),
                "values_equal": bool(
                    np.array_equal(np.asarray(micro), local["labels"].reshape(4, 2, 3).swapaxes(0, 1))
                ),
                "devices": {
                    str(d): {
                        "moved": sorted(set(after[d][..., 0].ravel() // 10)) != before[d],
                        "shard_shape": list(after[d].shape),
                    }
                    for d in before
                },
            }
        )
    )


if __name__ == "__main__":
    main()
