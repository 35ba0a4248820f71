"""Executed matmul FLOPs from compiled HLO: loops counted by trip count, against XLA's own count of the
unrolled program, and the fused loss's passes attributed to the LM head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from nextquill_jax.bench.flops import executed_flops
from nextquill_jax.bench.hlo_flops import dot_costs
from nextquill_jax.loss import LossConfig, loss_from_hidden

FAST_COMPILE = {"xla_backend_optimization_level": 0}
B, M, K = 2, 8, 16  # the chain's carry [B, M, K]; each weight [B, K, K]


def chain(x, w, unroll):
    """x [B, M, K] through w [3, 4, B, K, K]: an outer scan of 3 over an inner scan of 4 batched products."""

    def inner(c, wi):
        return jnp.einsum("bmk,bkn->bmn", c, wi), None

    def outer(c, wo):
        return jax.lax.scan(inner, c, wo, unroll=unroll)[0], None

    return jax.lax.scan(outer, x, w, unroll=unroll)[0]


def compiled(f, *args):
    return jax.jit(f, compiler_options=FAST_COMPILE).lower(*args).compile()


def test_loops_count_their_trip_counts_as_xla_counts_the_unrolled_program():
    x = jax.ShapeDtypeStruct((B, M, K), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 4, B, K, K), jnp.float32)
    looped = compiled(lambda a, b: chain(a, b, unroll=1), x, w)
    unrolled = compiled(lambda a, b: chain(a, b, unroll=True), x, w)
    costs = dot_costs(looped.as_text())
    assert sum(c.runs for c in costs) == 12
    executed = sum(c.executed for c in costs)
    assert executed == 12 * 2 * B * M * K * K
    assert unrolled.cost_analysis()["flops"] == executed  # XLA's count, once no loop hides the work
    # ...which counts a loop body once (plus the loop counters' adds)
    assert looped.cost_analysis()["flops"] == pytest.approx(executed / 12, rel=1e-3)
    assert all(c.files and c.files[0] == __file__ for c in costs)  # the einsum in `chain`, this file


def test_uncountable_programs_raise():
    x = jnp.ones((M, K))

    def traced_bound(a, n):
        return jax.lax.fori_loop(0, n, lambda i, c: c @ jnp.ones((K, K)), a)

    with pytest.raises(ValueError, match="no known trip count"):
        dot_costs(compiled(traced_bound, x, 3).as_text())

    def branch(a, p):
        return jax.lax.cond(p, lambda c: c @ jnp.ones((K, K)), lambda c: c, a)

    with pytest.raises(ValueError, match="is a conditional"):
        dot_costs(compiled(branch, x, True).as_text())

    # A GPU program's matmuls are cuBLAS custom calls, not dots (the form XLA's GPU compiler emits: the
    # product and a workspace as a tuple); uncounted, they would leave out most of the step's work silently.
    gemm = (
        "HloModule m, entry_computation_layout={(f32[8,16]{1,0}, f32[16,16]{1,0})->f32[8,16]{1,0}}\n\n"
        "ENTRY %main.1 (p0: f32[8,16], p1: f32[16,16]) -> f32[8,16] {\n"
        "  %p0 = f32[8,16]{1,0} parameter(0)\n"
        "  %p1 = f32[16,16]{1,0} parameter(1)\n"
        "  %custom-call.1 = (f32[8,16]{1,0}, s8[4194304]{0}) custom-call(f32[8,16]{1,0} %p0, "
        'f32[16,16]{1,0} %p1), custom_call_target="__cublas$gemm", backend_config={"alpha_real":1}\n'
        "  ROOT %get-tuple-element.1 = f32[8,16]{1,0} get-tuple-element(%custom-call.1), index=0\n"
        "}\n"
    )
    with pytest.raises(ValueError, match=r"%custom-call\.1 in %main\.1 is a custom-call whose matmul work"):
        dot_costs(gemm)


def test_the_fused_loss_executes_eight_head_passes_over_balanced_tiles():
    """value+grad of nextquill's fused loss: forward, recompute, dh and dW, each over both streams, on
    balanced tiles: 12 slots per row in 3 chunks of 4 (chunks of ⌈10 / 2⌉ = 5 would pad to 15) and
    V = 1,000 in 2 blocks of 512 (blocks of 900 would compute 1,800 columns)."""
    rows, slots, d, vocab = 2, 12, 16, 1000
    hidden = jax.ShapeDtypeStruct((rows, slots, d), jnp.float32)
    args = (hidden, hidden, jax.ShapeDtypeStruct((vocab, d), jnp.float32))
    labels = jax.ShapeDtypeStruct((rows, slots), jnp.int32)

    def loss(h_w, h_o, w, y):
        return loss_from_hidden(h_w, h_o, w, y, LossConfig(), token_chunk=10, vocab_chunk=900)[0]

    f = jax.value_and_grad(loss, argnums=(0, 1, 2))
    parts = executed_flops(dot_costs(compiled(f, *args, labels).as_text()))
    assert parts.layers == parts.attention == 0
    assert parts.head == 4 * 2 * (2 * rows * slots) * d * (2 * 512)
