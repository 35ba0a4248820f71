"""NextQuill's pure loss side: settings and variants (`config`), causal effects (`effects`), the losses
(`losses`) and the tiled LM head they run on (`fused_head`). The names below are the public API."""

from nextquill_jax.data.batch import IGNORE_INDEX  # the label of slots outside the loss, -100
from nextquill_jax.loss.config import LossConfig, Variant, streams_needed
from nextquill_jax.loss.losses import (
    DENOMINATOR_KEYS,
    combine_aux,
    example_count,
    loss_from_aux,
    loss_from_hidden,
    loss_from_logits,
    metric_names,
    metrics_from_aux,
    variant_losses,
)

__all__ = [
    "DENOMINATOR_KEYS",
    "IGNORE_INDEX",
    "LossConfig",
    "Variant",
    "combine_aux",
    "example_count",
    "loss_from_aux",
    "loss_from_hidden",
    "loss_from_logits",
    "metric_names",
    "metrics_from_aux",
    "streams_needed",
    "variant_losses",
]
