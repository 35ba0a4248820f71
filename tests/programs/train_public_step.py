"""The JAX train step with `normalize: example` against the public step restated in PyTorch, on one tiny Qwen2
model (biases on q/k/v, tied embeddings) and one global batch of 8 examples of different lengths; prints one
line `RESULT {json}`.

    train_public_step.py        (run with 8 devices)

PyTorch (tests/reference/torch_public_step.py): every example its own micro-batch, left-padded, the loss
divided by the accumulation count. JAX, the same weights (saved by transformers, loaded here) under the public
settings (nextquill, α 0.1, δ 0.05, λ 0.9, ε 0.1, dynamic DCE) in two layouts: two examples packed per row,
4 rows in 4 micro-batches on one device; one example per row, 8 rows in one pass sharded over 8 devices.
Plain SGD with learning rate 1, so the gradient is the parameters minus the new ones; it is written out by
`save_pretrained` to get transformers' names and layouts. The result holds the
losses, the largest gradient difference to PyTorch and between the JAX layouts, and the largest gradient.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from nextquill_jax.data.assemble import RowShape, assemble_batch
from nextquill_jax.loss import LossConfig
from nextquill_jax.models import load_pretrained, save_pretrained
from nextquill_jax.parallel import batch_sharding, make_mesh
from nextquill_jax.train.state import TrainState
from nextquill_jax.train.step import StepSettings, make_train_step
from tests.reference.torch_public_step import accumulate_gradients, micro_batches_of
from tests.shared import TINY_HF

VOCAB = 48


def examples(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        {
            "prompt_with": rng.integers(1, VOCAB, rng.integers(10, 40)).astype(np.int32),
            "prompt_without": rng.integers(1, VOCAB, rng.integers(4, 12)).astype(np.int32),
            "target": rng.integers(1, VOCAB, rng.integers(2, 24)).astype(np.int32),
        }
        for _ in range(n)
    ]


def torch_gradients(model_dir: Path, exs: list[dict]) -> tuple[float, dict[str, np.ndarray]]:
    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.train()
    data = {
        k: np.array([e[k] for e in exs], dtype=object) for k in ("prompt_with", "prompt_without", "target")
    }
    pad = max(len(e["prompt_with"]) + len(e["target"]) for e in exs)
    loss = accumulate_gradients(model, micro_batches_of(data, pad, 1, pad_id=0))
    return loss, {n: p.grad.numpy() for n, p in model.named_parameters()}


def jax_gradients(model_dir: Path, batch: dict, micro_batches: int, devices: list) -> tuple[dict, dict]:
    """(metrics, gradients by transformers name) of one step on `batch` over `devices`."""
    model = load_pretrained(model_dir, dtype="float32")
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
    settings = StepSettings(
        loss=LossConfig(normalize="example"), micro_batches=micro_batches, token_chunk=32, vocab_chunk=32
    )
    sgd = optax.sgd(1.0)
    step = jax.jit(make_train_step(graphdef, sgd, lambda s: 1.0, settings, mesh))
    params = jax.device_put(params, NamedSharding(mesh, P()))
    train_state = TrainState(
        step=jnp.int32(0), params=params, opt_state=sgd.init(params), rng=jax.random.PRNGKey(0), skipped=0
    )
    new, metrics = step(train_state, jax.device_put(batch, batch_sharding(mesh)))
    grads = jax.tree.map(lambda old, upd: jnp.asarray(old - upd), params, new.params)
    nnx.replace_by_pure_dict(state, grads)
    with tempfile.TemporaryDirectory() as out:
        save_pretrained(nnx.merge(graphdef, state), out)
        return {k: float(v) for k, v in metrics.items()}, load_file(Path(out) / "model.safetensors")


def largest_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # no arguments; --help
    torch.manual_seed(0)
    torch.set_num_threads(2)
    hf = Qwen2Config(
        **{**TINY_HF, "vocab_size": VOCAB},
        tie_word_embeddings=True,
        initializer_range=0.3,  # peaked next-token distributions, so both DCE weights occur
    )
    exs = examples(8)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        Qwen2ForCausalLM(hf).save_pretrained(model_dir)
        torch_loss, torch_grads = torch_gradients(model_dir, exs)
        longest = max(len(e["prompt_with"]) + len(e["target"]) for e in exs)
        one_per_row = assemble_batch([[e] for e in exs], RowShape(longest, 40, 24), with_reference_dce=False)
        packed = assemble_batch(
            [exs[i : i + 2] for i in range(0, 8, 2)], RowShape(2 * longest, 80, 48), with_reference_dce=False
        )
        runs = {
            "packed_4_micro_batches": jax_gradients(model_dir, packed, 4, jax.devices()[:1]),
            "rows_8_devices": jax_gradients(model_dir, one_per_row, 1, jax.devices()),
        }
    first = runs["packed_4_micro_batches"][1]
    out = {
        "torch_loss": torch_loss,
        "grad_scale": max(float(np.abs(g).max()) for g in torch_grads.values()),
        "runs": {
            name: {
                "loss": metrics["loss"],
                "pref_fraction": metrics["pref_count"] / metrics["effect_count"],
                "examples": metrics["n_den"],
                "grad_diff_to_torch": largest_difference(grads, torch_grads),
                "grad_diff_to_packed": largest_difference(grads, first),
            }
            for name, (metrics, grads) in runs.items()
        },
    }
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
