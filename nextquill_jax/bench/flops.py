"""Useful FLOPs of one NextQuill training step, and the peak FLOP/s of the chips that run it (for MFU).

FLOPs: the useful work of one full fine-tuning step, both forward passes and the backward pass (backward =
2 × forward: the input and the weight gradients of every matmul; a LoRA run's frozen base has no weight
gradients, about 4 · P per token instead of 6 · P, which this count does not model):

    FLOPs = 6 · P · (N_w + N_o)                       decoder layers (dense matmuls)
          + 12 · L · H · Hd · (A_w + A_o)             attention scores and values, causal, per segment
          + 6 · D · V · 2 · N_y                       LM head at the target positions of both streams

P: parameters other than the embedding and the LM head; N_w, N_o: real (non-padding) tokens of the with- and
without-history streams; L layers, H query heads of size Hd; A = Σ over examples of n(n+1)/2 (the query-key
pairs a causal mask leaves inside one example of n tokens: padding and cross-example pairs are not useful);
D hidden size, V vocabulary, N_y target tokens. The difference logits z_h − z_∅ need no extra matmul in this
count (they are a subtraction of logits already counted). MFU = FLOPs / step time / peak FLOP/s of the chips.
That is the NextQuill loss's count; under another loss each stream counts the passes it takes
(`stream_passes`): 3 backpropagated, 1 under a stop-gradient (a dynamic DCE's stream), 0 not computed.

`executed_flops` splits the matmul FLOPs a compiled program executes (`hlo_flops`) into the same parts, so
each part's executed / useful ratio shows where work beyond the useful count goes (recomputation, padding,
masked attention pairs, the fused head's extra passes).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from nextquill_jax.bench.hlo_flops import DotCost
from nextquill_jax.loss.config import LossConfig, streams_needed
from nextquill_jax.models.config import ModelConfig

# Dense bf16 peak TFLOP/s per chip (half NVIDIA's with-sparsity figure), by a substring of the lower-case
# `jax.Device.device_kind`, first match: the PCIe and NVL cards before the SXM ones their names contain.
PEAK_TFLOPS_BF16: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756.5),
    ("h100 nvl", 835.5),
    ("h200 nvl", 835.5),
    ("h200", 989.4),
    ("h100", 989.4),
    ("a100", 312.0),
    ("tpu v6", 918.0),
    ("tpu v5p", 459.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
    ("tpu v5", 459.0),  # v5p as JAX names it on a TPU VM; after the v5e names, of which it is a prefix
    ("tpu v4", 275.0),
)


def peak_tflops(device_kind: str) -> float | None:
    """Dense bf16 peak TFLOP/s of one chip of this kind, or None when unknown (CPU, other chips)."""
    kind = device_kind.lower()
    return next((tf for key, tf in PEAK_TFLOPS_BF16 if key in kind), None)


def param_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(all parameters, parameters other than the embedding and the LM head) of a model; allocates nothing."""
    import jax
    from flax import nnx

    from nextquill_jax.models import CausalLM

    abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    head = math.prod(params["embed"].shape) + (
        math.prod(params["lm_head"].shape) if "lm_head" in params else 0
    )
    return total, total - head


@dataclass(frozen=True)
class FlopCount:
    """Useful FLOPs of one training step by part (see the module docstring for the formula)."""

    layers: float
    attention: float
    head: float

    @property
    def total(self) -> float:
        """FLOPs of the whole pass: layers, attention and head."""
        return self.layers + self.attention + self.head


def causal_pairs(segment_ids: np.ndarray) -> int:
    """Σ n(n+1)/2 over the segments (examples) of every row; segment_ids [B, T] int, 0 = padding."""
    total = 0
    for row in np.asarray(segment_ids):
        counts = np.bincount(row[row > 0])
        total += int((counts * (counts + 1) // 2).sum())
    return total


def stream_passes(loss: LossConfig) -> tuple[int, int]:
    """(with-history, without-history) stream's matmul passes per forward FLOP under the loss `loss`: 3
    where the stream is backpropagated (forward, input and weight gradients), 1 where it is computed under
    a stop-gradient only (a dynamic DCE's or the detached js weights' stream), 0 where it is not computed
    (`streams_needed`). NextQuill's default loss backpropagates both: (3, 3)."""
    spec = loss.spec
    need_with, need_without = streams_needed(loss)
    grad_with = spec.next_stream == "with" or spec.alignment
    grad_without = (
        spec.next_stream == "without"
        or (spec.alignment and loss.counterfactual_grad)
        or (spec.next_weights == "js" and not loss.js_detach)
        or loss.anchor > 0
    )
    return (3 if grad_with else int(need_with)), (3 if grad_without else int(need_without))


def step_flops(
    cfg: ModelConfig,
    batch: dict[str, np.ndarray],
    nonembed_params: int | None = None,
    loss: LossConfig | None = None,
) -> FlopCount:
    """Useful FLOPs of one full fine-tuning step on `batch` under the loss `loss` (default NextQuill's: both
    streams forward and backward, the module docstring's formula; another variant counts each stream's
    `stream_passes`). `batch` holds `with_segment_ids` and `without_segment_ids` [B, T] (0: padding) and
    `labels` [B, R] (-100: no target).

    `nonembed_params`: P of the formula (computed from `cfg` when None).
    """
    if nonembed_params is None:
        nonembed_params = param_counts(cfg)[1]
    passes = stream_passes(LossConfig() if loss is None else loss)
    streams = [np.asarray(batch[f"{name}_segment_ids"]) for name in ("with", "without")]
    tokens = sum(n * int((ids > 0).sum()) for n, ids in zip(passes, streams, strict=True))
    pairs = sum(n * causal_pairs(ids) for n, ids in zip(passes, streams, strict=True))
    targets = int((np.asarray(batch["labels"]) >= 0).sum())
    return FlopCount(
        layers=2.0 * nonembed_params * tokens,
        attention=4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * pairs,
        head=2.0 * cfg.hidden_size * cfg.vocab_size * sum(passes) * targets,
    )


def executed_flops(costs: Iterable[DotCost]) -> FlopCount:
    """Executed matmul FLOPs by part, from the dots of a compiled program (`hlo_flops.dot_costs`): `head` the
    fused LM head's (a frame in loss/fused_head.py), `attention` the score and value products (a frame in
    models/attention.py or models/blockwise_attention.py), `layers` every other dot (projections, MLP), and
    dots without a source location too (`unattributed_flops` counts those)."""
    parts = {"layers": 0.0, "attention": 0.0, "head": 0.0}
    for cost in costs:
        files = [f.replace("\\", "/") for f in cost.files]
        if any(f.endswith("loss/fused_head.py") for f in files):
            part = "head"
        elif any(f.endswith(("models/attention.py", "models/blockwise_attention.py")) for f in files):
            part = "attention"
        else:
            part = "layers"
        parts[part] += cost.executed
    return FlopCount(**parts)


def unattributed_flops(costs: Iterable[DotCost]) -> float:
    """Executed FLOPs of the dots that carry no source location, which `executed_flops` can only count in
    `layers`. XLA passes can drop a dot's metadata: its batch-dot simplification does when it removes a
    batch dimension of size 1 (one row per step), which leaves the attention products without a source."""
    return sum(cost.executed for cost in costs if not cost.files)
