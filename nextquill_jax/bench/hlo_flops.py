"""Executed matmul FLOPs of a compiled XLA program, read from its HLO text, loops counted by trip count.

`jax.stages.Compiled.cost_analysis()["flops"]` counts the body of a while loop once, whatever its trip count,
so for a step whose layers are a `lax.scan` (and whose fused loss loops over tiles) it reports a fraction of
the work. Here every `dot` of the optimised module (`compiled.as_text()`) is counted as 2 × (output elements)
× (contracted elements) FLOPs, times the number of times it runs: the product of the known trip counts
(`backend_config` `known_trip_count`) of the while loops around it. Each dot also carries the source files of
its call stack (the module's StackFrames table), so the FLOPs can be attributed to the code that asked for
them.

Only dots are counted (the matrix-unit work that MFU is about); elementwise work is not. A program whose
work cannot be counted this way raises: a while loop of unknown trip count (e.g. a `fori_loop` with a traced
bound), a conditional (which branch runs is known only at run time), a convolution, or a matmul custom call
(as GPU modules have; compile on CPU).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(.*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$")
_OPCODE = re.compile(r"^ ([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"^[a-z]\w*\[([\d,]*)\]")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition)=%([\w.\-]+)")
_TABLE_ROW = re.compile(r"^(\d+) (.*)$")


@dataclass(frozen=True)
class DotCost:
    """One dot instruction: `flops` per execution, `runs` executions per program run, its `op_name` (the JAX
    name stack, e.g. "jit(step)/transpose(jvp())/.../btd,dhk->bthk/dot_general") and the source `files` of its
    call stack, innermost first."""

    name: str
    flops: float
    runs: int
    op_name: str
    files: tuple[str, ...]

    @property
    def executed(self) -> float:
        """FLOPs over all executions."""
        return self.flops * self.runs


def dot_costs(hlo_text: str) -> list[DotCost]:
    """Every dot reached from the entry computation of an optimised HLO module, with its execution count.

    Raises:
        ValueError: naming the instruction, for a while loop without a known trip count, a conditional, a
            convolution or a matmul custom call (see the module docstring), or text without an entry.
    """
    computations, entry = _computations(hlo_text)
    frames = _stack_frames(hlo_text)
    costs: list[DotCost] = []

    def visit(computation: str, runs: int) -> None:
        shapes = {name: shape for name, shape, _, _ in computations[computation]}
        for name, shape, opcode, rest in computations[computation]:
            if opcode in ("conditional", "convolution") or (
                opcode == "custom-call" and re.search(r"gemm|matmul", rest, re.IGNORECASE)
            ):
                raise ValueError(f"%{name} in %{computation} is a {opcode} whose matmul work is not counted")
            if opcode == "dot":
                costs.append(_dot(name, shape, rest, shapes, runs, frames))
            for kind, callee in _CALLEE.findall(rest):
                if kind == "body":
                    trip = _TRIP_COUNT.search(rest)
                    if trip is None:
                        raise ValueError(
                            f"while loop %{name} in %{computation} has no known trip count; its body's "
                            "FLOPs cannot be counted"
                        )
                    visit(callee, runs * int(trip.group(1)))
                elif kind != "condition":  # loop conditions hold no dots
                    visit(callee, runs)

    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    visit(entry, 1)
    return costs


def _computations(hlo_text: str) -> tuple[dict[str, list[tuple[str, str, str, str]]], str | None]:
    """{computation: [(instruction, shape, opcode, operands and attributes)]} and the entry's name."""
    computations: dict[str, list[tuple[str, str, str, str]]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif line == "}":
            current = None
        elif current is not None:
            instruction = _INSTRUCTION.match(line)
            if instruction:
                name, definition = instruction.groups()
                end = _shape_end(definition)
                opcode = _OPCODE.match(definition[end:])
                if opcode:
                    computations[current].append((name, definition[:end], *opcode.groups()))
    return computations, entry


def _shape_end(definition: str) -> int:
    """Where the shape that starts `definition` ends: an array `f32[2,3]{1,0}` or a (nested) tuple."""
    if not definition.startswith("("):
        return definition.find(" ")
    depth = 0
    for i, char in enumerate(definition):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return i + 1
    return len(definition)


def _dims(shape: str) -> list[int]:
    match = _ARRAY.match(shape)
    if match is None:
        raise ValueError(f"expected an array shape, got {shape!r}")
    return [int(d) for d in match.group(1).split(",") if d]


def _dot(name: str, shape: str, rest: str, shapes: dict[str, str], runs: int, frames) -> DotCost:
    """2 × output elements × contracted elements of the left operand."""
    lhs = re.match(r"%([\w.\-]+)", rest).group(1)
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1)
    lhs_dims = _dims(shapes[lhs])
    contracted = math.prod(lhs_dims[int(i)] for i in contracting.split(",") if i)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    frame = re.search(r"stack_frame_id=(\d+)", rest)
    return DotCost(
        name=name,
        flops=2.0 * math.prod(_dims(shape)) * contracted,
        runs=runs,
        op_name=op_name.group(1) if op_name else "",
        files=frames(int(frame.group(1))) if frame else (),
    )


def _table(hlo_text: str, title: str) -> dict[int, str]:
    """Rows `id value` of one of the module's debug tables (FileNames, FileLocations, StackFrames, ...)."""
    rows: dict[int, str] = {}
    inside = False
    for line in hlo_text.splitlines():
        if line == title:
            inside = True
        elif inside:
            row = _TABLE_ROW.match(line)
            if row is None:
                break
            rows[int(row.group(1))] = row.group(2)
    return rows


def _stack_frames(hlo_text: str):
    """A function: stack frame id -> source files of the call stack, innermost first (ids are 1-based)."""
    files = {k: v.strip('"') for k, v in _table(hlo_text, "FileNames").items()}
    location_file = {
        k: int(re.search(r"file_name_id=(\d+)", v).group(1))
        for k, v in _table(hlo_text, "FileLocations").items()
    }
    frames = {
        k: (
            int(re.search(r"file_location_id=(\d+)", v).group(1)),
            int(re.search(r"parent_frame_id=(\d+)", v).group(1)),
        )
        for k, v in _table(hlo_text, "StackFrames").items()
    }

    def stack(frame: int) -> tuple[str, ...]:
        out, seen = [], set()
        while frame in frames and frame not in seen:
            seen.add(frame)
            location, parent = frames[frame]
            out.append(files.get(location_file.get(location, 0), ""))
            frame = parent
        return tuple(out)

    return stack
