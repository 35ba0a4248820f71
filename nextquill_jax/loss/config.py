"""The loss settings: `LossConfig`, the table of variants, and which forward passes a variant needs.

Pure configuration (no JAX): the run config loads it, and the losses, the step and evaluation read it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import numpy as np

Variant = Literal["sft", "context_sft", "mce", "dce", "js", "nextquill"]
Normalize = Literal["token", "example"]

# α of the public code's trainers when they are built without one: `CustomTrainer2` (the MCE path,
# `causal=True`) defaults to 0.01, `CustomTrainer3` (NextQuill) to 0.1. Variants without L_p ignore α.
PUBLIC_ALPHA: dict[str, float] = {"mce": 0.01, "nextquill": 0.1}


class VariantSpec(NamedTuple):
    """How a variant is built from the two streams (the table in `nextquill_jax.loss.losses`)."""

    next_stream: str  # "with" or "without": the stream of L_n
    next_weights: str | None  # None (ω = 1), "target" or "js"
    alignment: bool  # whether the variant adds α L_p


VARIANTS: dict[str, VariantSpec] = {
    "sft": VariantSpec("without", None, False),
    "context_sft": VariantSpec("with", None, False),
    "mce": VariantSpec("with", None, True),
    "dce": VariantSpec("with", "target", False),
    "js": VariantSpec("with", "js", False),
    "nextquill": VariantSpec("with", "target", True),
}


@functools.cache
def weighting_function(name: str) -> Callable:
    """The function `name` ("package.module:function", or "module:Class.attr") names, imported: the
    `LossConfig.weighting` that `weighting.token_weights` calls (its contract: that module's docstring).
    Here rather than there, so that `LossConfig` checks the name without an import cycle or JAX.

    Raises:
        ValueError: `name` is not of that form, its module does not import (with the import error), the
            module has no such attribute, or it is not callable; each message gives the fix.
    """
    module_name, colon, attribute = name.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(
            f"{name!r} is not of the form 'module:function'. Fix: name a function as package.module:function"
        )
    try:
        found = importlib.import_module(module_name)
    except ImportError as e:
        # Also met by a saved run (evaluate, effects, export, a resume), whose name may not change: the fix
        # is where the command runs.
        raise ValueError(
            f"module {module_name!r} of {name!r} does not import ({e}). Fix: make it importable where this "
            "command runs (install its package, or put its directory on PYTHONPATH, e.g. "
            "`PYTHONPATH=DIR nextquill-jax ...`)"
        ) from None
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise ValueError(
                f"module {module_name!r} has no attribute {attribute!r} (from {name!r}). Fix: name a "
                "function the module defines"
            )
        found = getattr(found, part)
    if not callable(found):
        raise ValueError(f"{name!r} is a {type(found).__name__}, not a function. Fix: name a function")
    return found


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """NextQuill loss settings (defaults: the public code). The formulas: `nextquill_jax/loss/losses.py`.

    Fields:
        `variant`: the loss: `sft` (CE of the without-history stream), `context_sft` (CE of the with-history
            stream), `mce` (context_sft + α L_p), `dce` (CE weighted by the target weights), `js` (CE weighted
            by KL(p_h ‖ m) + KL(p_∅ ‖ m), m the mean of the two streams' distributions) or `nextquill`
            (dce + α L_p).
        `alpha`: weight α of the alignment loss L_p (>= 0), or `public`: the public code's α for the variant
            (`PUBLIC_ALPHA`: 0.01 for mce, 0.1 for nextquill; 0.1 for variants without L_p, which ignore
            it), resolved to a number on construction: `dataclasses.replace(cfg, variant=...)` keeps the
            number of the old variant, so pass `alpha="public"` again with a new variant.
        `threshold`: DCE threshold δ in [-1, 1): a target token whose data-side effect DCE (a probability
            difference, in [-1, 1]) exceeds it is preference-bearing.
        `high`: target weight λ of a preference-bearing token (> 0, >= `low`).
        `low`: target weight ε of every other target token (>= 0).
        `weight_alignment`: weight L_p by the target weights (the paper) instead of uniformly (the public
            code); only for variants with L_p (mce, nextquill).
        `js_detach`: stop the gradient through the js weights; false (the public code) is only for variant js.
        `dce`: where DCE comes from: `dynamic` (the model being trained, no gradient) or `fixed` (a frozen
            reference: the data's `reference_dce`, or `loss.reference_model`); `fixed` only for variants that
            weight tokens by DCE (dce, nextquill, and mce with `weight_alignment`).
        `counterfactual_grad`: let L_p's gradient flow through the without-history logits z_∅ (the public
            code); false treats z_∅ as a constant in L_p, so L_p cannot lower z_∅ on the label. Only for
            variants with L_p.
        `anchor`: β >= 0; adds β · CE(z_∅) (mean over target tokens), so the without-history stream stays a
            language model; 0: off. Not for sft (whose L_n is that CE already).
        `normalize`: `token` divides each term's Σ over all target tokens of the global batch by its global Σ
            of weights (long targets weigh more); `example` takes every term per example (its own weighted
            mean) and averages those over the examples, as the public code does (one example per
            micro-batch, a mean over accumulation steps).
        `weighting`: the target weights ω from a function of your own, named `package.module:function`
            (`nextquill_jax/loss/weighting.py` gives its contract: `(dce, mask, LossConfig) -> ω`, traced,
            no gradient, each token's ω from its own DCE alone), in place of λ where DCE > δ else ε; only
            for variants that weight tokens by DCE.
            δ still decides which tokens the metrics count as preference-bearing. null: the paper's
            weights.

    A frozen, hashable dataclass: under `jax.jit` pass it as a static argument (`static_argnames`; each
    distinct config compiles once). Its fields are Python numbers, not arrays (a NumPy scalar such as
    `np.float32(0.2)` is stored as the Python number of its value, `.item()`): they cannot be traced, so
    `vmap` or `grad` over `alpha`, `threshold` or the weights is not supported (build one config per value).

    Raises:
        ValueError: naming the field, for an unknown variant or dce mode, a negative or non-finite alpha,
            weights out of order, a switch set for a variant it does not apply to, or a `weighting` that does
            not name an importable function.
    """

    variant: Variant = "nextquill"
    alpha: float | Literal["public"] = 0.1
    threshold: float = 0.05
    high: float = 0.9
    low: float = 0.1
    weight_alignment: bool = False
    js_detach: bool = True
    dce: Literal["dynamic", "fixed"] = "dynamic"
    counterfactual_grad: bool = True
    anchor: float = 0.0
    normalize: Normalize = "token"
    weighting: str | None = None

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(
                f"LossConfig.variant: unknown variant {self.variant!r}; choose one of {list(VARIANTS)}"
            )
        if self.alpha == "public":
            object.__setattr__(self, "alpha", PUBLIC_ALPHA.get(self.variant, 0.1))
        if self.normalize not in ("token", "example"):
            raise ValueError(f"LossConfig.normalize must be 'token' or 'example', got {self.normalize!r}")
        if self.dce not in ("dynamic", "fixed"):
            raise ValueError(f"LossConfig.dce must be 'dynamic' or 'fixed', got {self.dce!r}")
        for name in ("alpha", "threshold", "high", "low", "anchor"):
            value = getattr(self, name)
            if isinstance(value, np.generic):
                # A NumPy scalar (np.float32(0.2), an element of an array) is kept as the Python number of the
                # same value: the config then prints, saves and hashes as one built from Python numbers.
                value = value.item()
                object.__setattr__(self, name, value)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(
                    f"LossConfig.{name} must be a finite number (a Python int or float, or a NumPy scalar), "
                    f"got {value!r}"
                )
        if not -1 <= self.threshold < 1:
            raise ValueError(
                f"LossConfig.threshold must be in [-1, 1), got {self.threshold}: DCE is a probability "
                "difference in [-1, 1], so no token's DCE exceeds a threshold >= 1 and every token's exceeds "
                "one below -1 (no token or every token preference-bearing: uniform weights). Fix: set a "
                "threshold in [-1, 1), such as the public code's 0.05"
            )
        for name in ("alpha", "anchor"):
            if getattr(self, name) < 0:
                raise ValueError(f"LossConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.low < 0 or self.high <= 0:
            raise ValueError(
                f"LossConfig weights must satisfy low >= 0 and high > 0, got high={self.high}, low={self.low}"
            )
        if self.high < self.low:
            raise ValueError(
                f"LossConfig.high ({self.high}) < LossConfig.low ({self.low}): preference-bearing "
                "tokens must not weigh less than the others; swap them"
            )
        for name in ("weight_alignment", "js_detach", "counterfactual_grad"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LossConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.weight_alignment and not self.spec.alignment:
            raise ValueError(
                f"LossConfig.weight_alignment: variant {self.variant!r} has no alignment term L_p "
                "(only mce and nextquill do); set weight_alignment=False"
            )
        if not self.js_detach and self.variant != "js":
            raise ValueError(f"LossConfig.js_detach=False only applies to variant 'js', not {self.variant!r}")
        if not self.counterfactual_grad and not self.spec.alignment:
            raise ValueError(
                f"LossConfig.counterfactual_grad=False: variant {self.variant!r} has no alignment term L_p "
                "(only mce and nextquill do); leave it true"
            )
        if self.dce == "fixed" and not self.uses_target_weights:
            # A fixed DCE costs a frozen reference model's forward passes (or precomputed data) and would feed
            # nothing but the logged DCE statistics.
            raise ValueError(
                f"LossConfig.dce='fixed': variant {self.variant!r} does not weight tokens by DCE (only dce "
                "and nextquill do, and mce with weight_alignment); set dce='dynamic'"
            )
        if self.weighting is not None:
            self._check_weighting()
        if self.anchor > 0 and self.spec.next_stream == "without":
            raise ValueError("LossConfig.anchor: sft already trains the without-history stream; set anchor=0")

    def _check_weighting(self) -> None:
        if not isinstance(self.weighting, str):
            raise ValueError(f"LossConfig.weighting must be a string or None, got {self.weighting!r}")
        if not self.uses_target_weights:
            raise ValueError(
                f"LossConfig.weighting: variant {self.variant!r} does not weight tokens by DCE (only dce and "
                "nextquill do, and mce with weight_alignment); set weighting=None"
            )
        try:
            weighting_function(self.weighting)
        except ValueError as e:
            raise ValueError(f"LossConfig.weighting: {e}") from None

    @property
    def spec(self) -> VariantSpec:
        """The variant's structure: L_n's stream ("with"/"without"), its weights (None/"target"/"js") and
        whether it adds the alignment term."""
        return VARIANTS[self.variant]

    @property
    def uses_target_weights(self) -> bool:
        """Whether the loss needs the λ/ε weights, and so a DCE."""
        return self.spec.next_weights == "target" or self.weight_alignment


def streams_needed(cfg: LossConfig) -> tuple[bool, bool]:
    """(with-history pass needed, without-history pass needed) for the loss `cfg`.

    The without-history pass serves L_n of `sft`, the alignment term, the js weights, a dynamic DCE and the
    anchor.
    """
    spec = cfg.spec
    need_with = spec.next_stream == "with" or spec.alignment or spec.next_weights == "js"
    need_without = (
        spec.next_stream == "without"
        or spec.alignment
        or spec.next_weights == "js"
        or (cfg.uses_target_weights and cfg.dce == "dynamic")
        or cfg.anchor > 0
    )
    return need_with, need_without
