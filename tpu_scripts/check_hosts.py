"""Multi-host start-up check: run it on every host of a TPU slice (setup.sh does) or in each SLURM task.

    python check_hosts.py

It starts JAX's multi-process runtime with the code `nextquill-jax train` runs (`build_mesh` of
`nextquill_jax.train.workdir`, with the default `mesh:` section: NEXTQUILL_* variables when set, else the
Cloud TPU pod's own discovery), builds the training mesh over every device of every process, and sums a
one-per-device array across the whole mesh. Each process prints one line, e.g.

    process 0/2: 4 local devices (cpu), 8 global, mesh data=1 fsdp=8 tensor=1, all-reduce 8 of 8,
    GPUs visible: all

"GPUs visible" is what JAX restricted this process's GPUs to (`all`, or ids such as `0,1,2,3`): a single id on
a node with more GPUs means the other GPUs sit idle. Exit status 0 when the counts agree (global devices =
processes x local devices on every host, and the all-reduce reaches every device), 1 otherwise.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nextquill_jax.config import MeshConfig
from nextquill_jax.parallel import MESH_AXES
from nextquill_jax.train.workdir import build_mesh


def main() -> int:
    # build_mesh reads only the `mesh` section of a run's config: this is train's own start-up, not a copy.
    mesh = build_mesh(SimpleNamespace(mesh=MeshConfig()))
    devices = mesh.devices.size
    # [devices] ones, one element on each device of every process; their sum is computed across all of them.
    sharding = NamedSharding(mesh, P(MESH_AXES))
    ones = jax.make_array_from_callback(
        (devices,), sharding, lambda index: np.ones((devices,), np.float32)[index]
    )
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(ones)
    reached = int(np.asarray(total.addressable_data(0)))

    local = jax.local_device_count()
    shape = " ".join(f"{axis}={size}" for axis, size in mesh.shape.items())
    print(
        f"process {jax.process_index()}/{jax.process_count()}: {local} local devices "
        f"({jax.default_backend()}), {jax.device_count()} global, mesh {shape}, all-reduce {reached} of "
        f"{devices}, GPUs visible: {jax.config.read('jax_cuda_visible_devices')}",
        flush=True,
    )
    if reached != devices or devices != jax.device_count() or local * jax.process_count() != devices:
        print("error: the hosts do not add up (see the line above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
