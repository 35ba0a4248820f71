"""Mesh axes and the logical-axis rules that map model annotations onto them.

Models annotate every parameter with logical axis names (`embed`, `vocab`, `heads`, `kv_heads`,
`head_dim`, `mlp`, `layers`, `norm`) and know nothing of meshes. The rules below say which mesh axis, if
any, shards each logical axis: FSDP shards parameters (and so the optimizer state) over `fsdp`, tensor
parallelism splits heads, MLP and vocabulary over `tensor`, and batches are split over `data` and `fsdp`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from nextquill_jax.mesh_sizes import MESH_AXES, checked_shape, spelt
from nextquill_jax.plural import counted

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


def logical_to_mesh_spec(
    logical: Sequence[str | None] | PartitionSpec, rules: LogicalRules = DEFAULT_RULES
) -> PartitionSpec:
    """Translate a logical spec such as ("embed", "mlp") into a mesh spec such as P("fsdp", "tensor").

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


def check_divisible(
    shape: Sequence[int], spec: PartitionSpec, mesh: Mesh, what: str, logical: PartitionSpec | None = None
) -> None:
    """Raise ValueError naming `what` (and the dimension's logical axis, from `logical`, such as `kv_heads`)
    if a mesh axis in `spec` does not divide its dimension of `shape`."""
    logical_axes = tuple(logical or ()) + (None,) * len(shape)
    for dim, (size, axes) in enumerate(
        zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False)
    ):
        if axes is None:
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        parts = 1
        for a in names:
            parts *= mesh.shape[a]
        if size % parts:
            axis = f" (`{logical_axes[dim]}`)" if isinstance(logical_axes[dim], str) else ""
            keys = " x ".join(f"mesh.{a}" for a in names)
            raise ValueError(
                f"{what}: dimension {dim}{axis} of size {size} cannot be split {parts} ways over mesh axes "
                f"{names}. Fix: make {keys} a divisor of {size}; or, calling the library from Python, map "
                "that logical axis to None in the `rules` (parallel.LogicalRules) you pass."
            )


def logical_to_sharding(
    logical_tree: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES, shapes: Any = None
) -> Any:
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
        flat_logical = jax.tree.leaves(logical_tree, is_leaf=is_spec)
        for (path, spec), leaf, logical in zip(flat_specs, flat_shapes, flat_logical, strict=True):
            check_divisible(leaf.shape, spec, mesh, jax.tree_util.keystr(path), logical)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec)


def resolve_mesh_shape(
    sizes: Mapping[str, int], num_devices: int, *, spelling: Literal["overrides", "entry"] = "overrides"
) -> tuple[int, ...]:
    """Sizes of (`data`, `fsdp`, `tensor`) from `sizes`, where one axis may be -1 (fills the rest).

    `spelling`: how the messages write mesh sizes: `overrides` as a training config's command-line overrides
    (`mesh.data=2 mesh.fsdp=-1`); `entry` as an entry of a sweep file's `mesh:` list
    (`{data: 2, fsdp: -1, tensor: 1}`), which takes no overrides.

    Raises:
        ValueError: an unknown axis, more than one -1, a size below 1, or a product that does not equal
            `num_devices`; the message names the sizes, in `spelling`, and sizes that would fit.
    """
    entry = spelling == "entry"
    shape = checked_shape(sizes, entry=entry)
    fill = [axis for axis, size in zip(MESH_AXES, shape, strict=True) if size == -1]
    fixed = math.prod(s for s in shape if s != -1)
    name = f"mesh entry {spelt(sizes, entry)}" if entry else f"mesh {_describe(shape)}"
    if fill:
        if num_devices % fixed:
            raise ValueError(
                f"{name} cannot fill {counted(num_devices, 'device')}: the fixed axes "
                f"multiply to {fixed}, which does not divide {num_devices}. Fix: choose sizes whose product "
                f"divides {num_devices}, e.g. {_fitting(shape, num_devices, entry)}."
            )
        shape[MESH_AXES.index(fill[0])] = num_devices // fixed
    elif fixed != num_devices:
        available = f"{num_devices} {'is' if num_devices == 1 else 'are'} available"
        if entry:
            fsdp_fills = [-1 if axis == "fsdp" else size for axis, size in zip(MESH_AXES, shape, strict=True)]
            fix = (
                f"an entry whose sizes multiply to {num_devices}, or with one axis -1 to take the devices "
                f"left over, e.g. {_fitting(fsdp_fills, num_devices, entry)}"
            )
        else:
            fsdp_fills = [-1 if axis == "fsdp" else size for axis, size in zip(MESH_AXES, shape, strict=True)]
            fix = (
                f"make mesh.data * mesh.fsdp * mesh.tensor = {num_devices}, or set one axis to -1 to fill "
                f"the rest (e.g. {_fitting(fsdp_fills, num_devices, against=shape)})"
            )
        raise ValueError(f"{name} has {counted(fixed, 'device')} but {available}. Fix: {fix}.")
    return tuple(shape)


def _describe(shape: Sequence[int]) -> str:
    return "(" + ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, shape, strict=True)) + ")"


def _fitting(
    shape: Sequence[int], num_devices: int, entry: bool = False, against: Sequence[int] | None = None
) -> str:
    """Sizes that make the fixed sizes of `shape` (one axis -1) divide `num_devices`: each fixed axis shrunk,
    in order, to its greatest common divisor with the devices that the axes before it leave. As overrides
    (`mesh.data=1 mesh.tensor=2`) only the axes that differ from `against` (default: `shape`) are named; as a
    mesh entry (`entry`) all are."""
    left, fitted = num_devices, {}
    for axis, size in zip(MESH_AXES, shape, strict=True):
        fitted[axis] = size
        if size != -1:
            fitted[axis] = math.gcd(size, left)
            left //= fitted[axis]
    if entry:
        return spelt(fitted, entry)
    against = shape if against is None else against
    return spelt({a: s for a, s in fitted.items() if s != against[MESH_AXES.index(a)]}, entry)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all devices of all processes) with axes `data`, `fsdp`, `tensor`.

    Axis types are Auto: the compiler propagates shardings from the explicit in/out shardings of the step.

    Raises:
        ValueError: from `resolve_mesh_shape` when the sizes do not fit the devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(sizes, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def batch_sharding(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a batch array: rows (dimension 0) split by the `batch` rule, the rest replicated."""
    return NamedSharding(mesh, logical_to_mesh_spec(("batch",), rules))


def batch_shard_count(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> int:
    """How many ways the `batch` rule splits the rows of a batch on `mesh`."""
    axes = dict(rules)["batch"]
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in names)


ENV_COORDINATOR = "NEXTQUILL_COORDINATOR"
ENV_NUM_PROCESSES = "NEXTQUILL_NUM_PROCESSES"
ENV_PROCESS_ID = "NEXTQUILL_PROCESS_ID"


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    mode: str = "auto",
    peer_timeout_s: float = 180.0,
) -> bool:
    """Start JAX's multi-process runtime when the run spans several hosts; returns whether it was started.

    Call before anything touches a device. Settings come from the arguments, else from the environment
    variables NEXTQUILL_COORDINATOR ("host:port"), NEXTQUILL_NUM_PROCESSES and NEXTQUILL_PROCESS_ID. With no
    explicit settings, `mode="auto"` starts it on Cloud TPU VMs (libtpu installed), where
    `jax.distributed.initialize()` discovers the pod itself; `mode="off"` never starts it. Once started, a
    `PeerWatchdog` ends this process when another one stops answering for `peer_timeout_s` seconds.

    Raises:
        ValueError: a partial explicit setting (a coordinator without the process count and id, or the
            reverse), a non-integer count/id in the environment, or libtpu installed where JAX finds no TPU
            pod.
    """
    if mode not in ("auto", "off"):
        raise ValueError(f"mesh.distributed must be 'auto' or 'off', got {mode!r}")
    if mode == "off":
        return False
    if jax.distributed.is_initialized():
        return True
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    explicit = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    given = [k for k, v in explicit.items() if v is not None]
    if given and len(given) < 3:
        missing = [k for k in explicit if k not in given]
        raise ValueError(
            f"multi-host settings incomplete: {given} given but {missing} missing. Fix: set all three as "
            f"mesh.coordinator / mesh.num_processes / mesh.process_id, or as {ENV_COORDINATOR} / "
            f"{ENV_NUM_PROCESSES} / {ENV_PROCESS_ID}, or none of them."
        )
    # JAX's own heartbeat check would abort this process with a runtime error after its timeout; it is set
    # well beyond ours, so that the watchdog's message (naming the lost process) comes first.
    heartbeat = {"heartbeat_timeout_seconds": int(2 * peer_timeout_s) + 10}
    if given:
        jax.distributed.initialize(
            coordinator, num_processes=num_processes, process_id=process_id, **heartbeat
        )
    elif importlib.util.find_spec("libtpu") is not None:
        try:
            jax.distributed.initialize(**heartbeat)
        except ValueError as e:  # libtpu installed (the `tpu` extra) on a machine that is no TPU VM
            raise ValueError(
                f"mesh.distributed is auto and libtpu is installed, so this was taken for a Cloud TPU VM, "
                f"but JAX found no TPU pod to join ({e}). Fix: set mesh.distributed=off to run one process "
                f"here, or set mesh.coordinator / num_processes / process_id for a multi-process run."
            ) from None
    else:
        return False
    from jax._src import distributed  # the runtime's key-value client (no public handle in jax 0.10)

    PeerWatchdog(
        distributed.global_state.client, jax.process_index(), jax.process_count(), peer_timeout_s
    ).start()
    return True


def refuse_several_processes(command: str) -> None:
    """Refuse to run `command`, which reads a model on one device of one process (`export`, `effects`), as
    one of several processes that the environment (`NEXTQUILL_NUM_PROCESSES` > 1) starts: each would do all
    the work and write the same files at once.

    Raises:
        ValueError: naming the variables to unset; also for a non-integer `NEXTQUILL_NUM_PROCESSES`.
    """
    count = _env_int(ENV_NUM_PROCESSES)
    if count is not None and count > 1:
        raise ValueError(
            f"`{command}` runs as one process (it reads the model on one device), but {ENV_NUM_PROCESSES}="
            f"{count} starts this one as one of {count}, each of which would do all the work and write the "
            f"same files. Fix: run it once, on one host, without {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and "
            f"{ENV_PROCESS_ID} set."
        )


EXIT_PEER_LOST = 4  # the exit status of a process whose peer was lost


class Process0FailedError(RuntimeError):
    """Process 0 failed at work it does alone for the whole run (`process_0_result`); this process stops too.
    Process 0's own error names the problem and the fix."""


_FAILED = -(2**31)  # the int32 `process_0_result` broadcasts when process 0's work raised


def process_0_result(work: Callable[[], int], what: str) -> int:
    """`work()`, run on process 0 alone, and its result in every process of the run.

    A collective: every process must call it. Process 0 answers whether `work` returns or raises, so that a
    failure there does not leave the others waiting in a collective until gloo or the peer timeout gives up.
    `work` returns an int32 other than -2**31; `what` completes "process 0 failed ..." (e.g. "to prepare the
    data in DIR").

    Raises:
        Whatever `work` raises, on process 0. Process0FailedError, on the other processes, when it raised.
    """
    if jax.process_count() == 1:
        return work()
    import numpy as np
    from jax.experimental import multihost_utils

    result = _FAILED
    try:
        if jax.process_index() == 0:
            result = work()
    finally:  # raising or not, the others wait for this answer
        shared = int(multihost_utils.broadcast_one_to_all(np.int32(result)))
    if shared == _FAILED:
        raise Process0FailedError(
            f"process 0 failed {what}, so process {jax.process_index()} stops too: process 0's error (above, "
            f"or in its log) names the problem and the fix."
        )
    return shared


class PeerWatchdog(threading.Thread):
    """A daemon thread that ends this process when another process of the run stops answering.

    Every process writes a counter to the runtime's key-value store every `timeout_s / 6` seconds and reads
    the others'; a counter that has not moved for `timeout_s` seconds (or a store that has not answered for
    that long: process 0, which holds it, is gone) means that process is lost. The main thread may then be
    blocked in a collective that will never complete, so the watchdog writes one line naming the lost process
    to stderr and ends the process at once with `exit(EXIT_PEER_LOST)` (default `os._exit`): a scheduler then
    restarts the job, which resumes from its last complete checkpoint.
    """

    def __init__(
        self,
        client,
        process_id: int,
        num_processes: int,
        timeout_s: float,
        *,
        exit: Callable[[int], None] = os._exit,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__(name="nextquill-peer-watchdog", daemon=True)
        self.client, self.me, self.n, self.timeout_s = client, process_id, num_processes, timeout_s
        self.exit, self.clock = exit, clock

    def run(self) -> None:
        """Beat (this process's counter in the coordination store) and watch the others' until one, or the
        store, is silent for over `timeout_s`; then say which and exit (`self.exit`)."""
        start = self.clock()
        # process -> (its last counter, when that counter last moved)
        seen = {p: (None, start) for p in range(self.n) if p != self.me}
        store_ok, beat = start, 0
        while True:
            beat += 1
            now = self.clock()
            try:
                self.client.key_value_set(f"nextquill/alive/{self.me}", str(beat), allow_overwrite=True)
                store_ok = now
            except Exception:  # the store (on process 0) does not answer; judged below by how long
                pass
            for p, (last, _) in seen.items():
                value = self._read(p)
                if value is not None and value != last:
                    seen[p] = (value, now)
            silent = {p: now - since for p, (_, since) in seen.items()}
            if self.me != 0:
                silent[0] = max(silent[0], now - store_ok)
            lost = {p: s for p, s in silent.items() if s > self.timeout_s}
            if lost:
                self._end(lost)
                return
            time.sleep(self.timeout_s / 6)

    def _read(self, process: int) -> str | None:
        try:
            return self.client.key_value_try_get(f"nextquill/alive/{process}")
        except Exception:  # not written yet, or the store does not answer
            return None

    def _end(self, lost: dict[int, float]) -> None:
        names = ", ".join(str(p) for p in sorted(lost))
        message = (
            f"error: process {names} of this {self.n}-process run has not answered for "
            f"{max(lost.values()):.0f} s "
            f"(mesh.peer_timeout_s={self.timeout_s:g}): its host died or it was killed. Process {self.me} "
            f"exits with status {EXIT_PEER_LOST} instead of waiting for it in a collective; restart the job "
            f"and it resumes from its last complete checkpoint.\n"
        )
        os.write(2, message.encode())
        self.exit(EXIT_PEER_LOST)


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None
