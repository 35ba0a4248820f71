"""The train step on one batch in one pass and in 4 accumulated micro-batches, for several loss variants, and
the step on a batch whose loss is NaN; prints one line `RESULT {json}`.

    train_step_accumulation.py

A tiny random qwen2-family model (vocab 128, hidden 32, 2 layers), one batch of 8 rows of random packed
examples, plain SGD with learning rate 1 (so an update is minus the gradient and updates compare directly).
For each variant (nextquill, context_sft, js with gradient through its weights, and nextquill with fixed DCE
from a frozen reference model) the result holds the largest difference between the two updates, the largest
update, both losses and the token count; under "nan", what the step did with a NaN parameter.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nextquill_jax.data.assemble import RowShape, assemble_batch
from nextquill_jax.loss import LossConfig
from nextquill_jax.models import CausalLM, model_preset
from nextquill_jax.parallel import make_mesh
from nextquill_jax.train.state import TrainState
from nextquill_jax.train.step import StepSettings, make_train_step, reference_dce
from tests.shared import TINY_EOS_ID


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # no arguments; --help
    cfg = model_preset(
        "qwen2.5-0.5b",
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        bos_token_id=TINY_EOS_ID,
        eos_token_ids=(TINY_EOS_ID,),
    )
    graphdef, params = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    params = nnx.to_pure_dict(params)
    rng = np.random.default_rng(0)
    rows = [
        [
            {
                "prompt_with": rng.integers(1, 128, rng.integers(8, 30)).astype(np.int32),
                "prompt_without": rng.integers(1, 128, rng.integers(2, 10)).astype(np.int32),
                "target": rng.integers(1, 128, rng.integers(3, 16)).astype(np.int32),
            }
            for _ in range(rng.integers(1, 3))
        ]
        for _ in range(8)
    ]
    batch = assemble_batch(rows, RowShape(96, 48, 40), with_reference_dce=False)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    sgd = optax.sgd(1.0)  # the update is minus the gradient: compare updates directly
    # A frozen reference model for fixed DCE: the one-pass step reads its DCE from the batch (precomputed
    # here), the accumulated step runs the reference model itself.
    ref_params = nnx.to_pure_dict(nnx.state(CausalLM(cfg, rngs=nnx.Rngs(1)), nnx.Param))
    ref_settings = StepSettings(
        loss=LossConfig(variant="nextquill", dce="fixed"), token_chunk=48, vocab_chunk=48
    )
    ref_batch = dict(batch, reference_dce=reference_dce(graphdef, ref_params, batch, ref_settings))
    out = {}
    for name, loss in [
        ("nextquill", LossConfig()),
        ("context_sft", LossConfig(variant="context_sft")),
        ("js_grad_through_weights", LossConfig(variant="js", js_detach=False)),
        ("reference_model", LossConfig(variant="nextquill", dce="fixed")),
    ]:
        results = []
        for m in (1, 4):
            settings = StepSettings(
                loss=loss,
                micro_batches=m,
                skip_nonfinite=True,
                token_chunk=48,
                vocab_chunk=48,
                reference_graphdef=graphdef,
            )
            step = jax.jit(make_train_step(graphdef, sgd, lambda s: 1.0, settings, mesh))
            state = TrainState(
                step=jnp.int32(0),
                params=params,
                opt_state=sgd.init(params),
                rng=jax.random.PRNGKey(0),
                skipped=jnp.int32(0),
            )
            if name != "reference_model":
                new, metrics = step(state, batch)
            elif m == 1:
                new, metrics = step(state, ref_batch)
            else:
                new, metrics = step(state, batch, ref_params)
            results.append((new, metrics))
            if name == "nextquill" and m == 1:  # a NaN loss: the update is skipped and counted
                poisoned = dict(
                    params, final_norm={"scale": params["final_norm"]["scale"].at[0].set(jnp.nan)}
                )
                bad = TrainState(
                    step=jnp.int32(0),
                    params=poisoned,
                    opt_state=sgd.init(params),
                    rng=jax.random.PRNGKey(0),
                    skipped=jnp.int32(0),
                )
                kept, bad_metrics = step(bad, batch)
                out["nan"] = {
                    "skipped": int(kept.skipped),
                    "nonfinite": float(bad_metrics["nonfinite"]),
                    "unchanged": bool(
                        all(
                            np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
                            for a, b in zip(
                                jax.tree.leaves(kept.params), jax.tree.leaves(poisoned), strict=True
                            )
                        )
                    ),
                }
        (one, m1), (four, m4) = results
        leaves = jax.tree.leaves
        diff = max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(leaves(one.params), leaves(four.params), strict=True)
        )
        scale = max(
            float(jnp.max(jnp.abs(a - p))) for a, p in zip(leaves(one.params), leaves(params), strict=True)
        )
        out[name] = {
            "max_update_diff": diff,
            "max_update": scale,
            "loss1": float(m1["loss"]),
            "loss4": float(m4["loss"]),
            "tokens": float(m1["tokens"]),
        }
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
