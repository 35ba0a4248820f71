"""Mesh axes and the logical-axis rules that map model annotations onto them.

Models annotate every parameter with logical axis names (`embed`, `vocab`, `heads`, `kv_heads`,
`head_dim`, `mlp`, `layers`, `norm`) and know nothing of meshes. The rules below say which mesh axis, if
any, shards each logical axis: FSDP shards parameters (and so the optimizer state) over `fsdp`, tensor
parallelism splits heads, MLP and vocabulary over `tensor`, and batches are split over `data` and `fsdp`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)


def logical_to_mesh_spec(logical: Sequence[str | None] | PartitionSpec, rules: LogicalRules = DEFAULT_RULES
                         ) -> PartitionSpec:
    """Translate a logical spec such as ("embed", "mlp") into a mesh PartitionSpec such as P("fsdp", "tensor").

    A mesh axis already used by an earlier dimension is not reused (a dimension then stays replicated).

    Raises:
        KeyError: for a logical axis that no rule names.
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in logical:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        target = table[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def check_divisible(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh, what: str) -> None:
    """Raise ValueError naming `what` if a mesh axis in `spec` does not divide its dimension of `shape`."""
    for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False)):
        if axes is None:
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        parts = 1
        for a in names:
            parts *= mesh.shape[a]
        if size % parts:
            raise ValueError(
                f"{what}: dimension {dim} of size {size} cannot be split {parts} ways over mesh axes {names}. "
                f"Fix: choose mesh sizes that divide it, or map its logical axis to None in the rules."
            )


def logical_to_sharding(logical_tree, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES, shapes=None):
    """Map a pytree of logical PartitionSpecs to NamedShardings on `mesh`.

    `shapes`, a matching pytree of arrays or ShapeDtypeStructs, enables the divisibility check.

    Raises:
        KeyError: unknown logical axis. ValueError: a mesh axis does not divide a dimension.
    """
    is_spec = lambda x: isinstance(x, PartitionSpec)
    specs = jax.tree.map(lambda s: logical_to_mesh_spec(s, rules), logical_tree, is_leaf=is_spec)
    if shapes is not None:
        flat_specs, _ = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)
        flat_shapes = jax.tree.leaves(shapes)
        for (path, spec), leaf in zip(flat_specs, flat_shapes, strict=True):
            check_divisible(leaf.shape, spec, mesh, jax.tree_util.keystr(path))
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec)
