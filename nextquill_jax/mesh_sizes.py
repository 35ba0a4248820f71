"""Mesh sizes as a config writes them, before any device is known: the axis names, how messages spell a set
of sizes, and the checks that need no device count (`parallel.resolve_mesh_shape` fits them to devices).

Free of JAX, so that config files are checked when they are read, without importing it.
"""

from __future__ import annotations

from collections.abc import Mapping

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_entry(sizes: Mapping[str, int]) -> str:
    """`sizes` as an entry of a sweep file's `mesh:` list writes them: "{data: 1, fsdp: -1, tensor: 1}"."""
    return "{" + ", ".join(f"{a}: {s}" for a, s in sizes.items()) + "}"


def spelt(sizes: Mapping[str, int], entry: bool) -> str:
    """`sizes` as a mesh entry (`mesh_entry`), or as overrides (`mesh.data=1 mesh.fsdp=-1`)."""
    return mesh_entry(sizes) if entry else " ".join(f"mesh.{a}={s}" for a, s in sizes.items())


def checked_shape(sizes: Mapping[str, int], *, entry: bool = False) -> list[int]:
    """Sizes of (`data`, `fsdp`, `tensor`) from `sizes` (an axis not named is 1), -1 left unresolved.

    `entry`: the messages write `sizes` as a sweep file's mesh entry, else as a training config's overrides.

    Raises:
        ValueError: an unknown axis, a size of 0 or below -1, or more than one -1; the message names the
            sizes and the rule.
    """
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(
            f"mesh axes {unknown} are unknown; the mesh axes are {list(MESH_AXES)}. Fix: name only those axes"
        )
    shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
    fill = [axis for axis, size in zip(MESH_AXES, shape, strict=True) if size == -1]
    bad = {axis: size for axis, size in zip(MESH_AXES, shape, strict=True) if size == 0 or size < -1}
    if bad or len(fill) > 1:
        named = spelt(bad or dict.fromkeys(fill, -1), entry).strip("{}")
        raise ValueError(
            f"invalid mesh sizes {named}{f' in mesh entry {spelt(sizes, entry)}' if entry else ''}: each "
            "axis size must be a positive integer, and at most one axis may be -1 (it takes the devices left "
            "over)."
        )
    return shape
