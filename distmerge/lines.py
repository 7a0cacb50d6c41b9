"""LiNeS: layer-increasing scaling of a merge's update.

Wang et al. 2025, "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model
Merging" (ICLR, https://arxiv.org/abs/2410.17146). For a model of L layers, the merged task
vector τ = θ − θ₀ of layer l (0-based) is scaled by

    λ(l) = α + β · l / (L − 1)

so that shallow layers, which hold general features, stay near the base, and deep layers
keep the task-specific update. Tensors outside the layer stack (embeddings, final norm, LM head)
get α, as in the paper's code (everything outside the residual blocks is scaled by α); a model
of one layer gets α. L is the output's layer count and l the output layer (a frankenmerge's
layers are numbered as they come out).

A recipe turns it on with the top-level ``lines: {alpha: A, beta: B}``, for any method that
has a base model; the plan carries (alpha, beta) and the run scales each tensor's merge,
θ₀ + λ(l) · (θ − θ₀), in float32 before rounding. Where distmerge differs from the paper: it
scales the one merged update of whatever method the recipe names, where the paper scales each
task vector before task arithmetic's sum (the same for linear methods, λ(l) applying to every
term) and tunes α and β per experiment; here both must be given (there is no default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from distmerge.errors import MergeError

KEYS = ("alpha", "beta")


@dataclass(frozen=True, slots=True)
class Lines:
    """A recipe's ``lines:`` block."""

    alpha: float
    """Scale of the first layer's update (and of every tensor outside the layers)."""
    beta: float
    """What the last layer's scale adds to alpha."""


def parse(value: Any, source: str, method) -> Lines | None:
    """A recipe's ``lines:`` value (None when absent); MergeError in one line when it is wrong
    or the method has no base model to scale an update from."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != set(KEYS):
        raise MergeError(f"{source}: lines: takes exactly alpha and beta, e.g. 'lines: {{alpha: 0.5, beta: 0.5}}', got {value!r}")
    numbers = {}
    for key in KEYS:
        v = value[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise MergeError(f"{source}: lines.{key}: expected a finite number, got {v!r}")
        numbers[key] = float(v)
    if method.base == "ignored":
        raise MergeError(
            f"{source}: lines: scales the update from the base model, but merge_method {method.name} takes no base; "
            "remove lines:, or use a method with a base model (task_arithmetic, ties, ...)"
        )
    return Lines(**numbers)


def layer_scale(lines: dict, layer: int | None, layers: int) -> float:
    """λ(l) = α + β · l / (L − 1) for layer ``layer`` of ``layers``; α outside the layers (None)
    and for a model of one layer. ``lines`` is the plan's {"alpha": α, "beta": β}."""
    if layer is None or layers < 2:
        return lines["alpha"]
    return lines["alpha"] + lines["beta"] * (layer / (layers - 1))


def scale_update(base: torch.Tensor, merged: torch.Tensor, scale: float) -> torch.Tensor:
    """θ₀ + s · (θ − θ₀) in float32; ``merged`` itself when s = 1 (no rounding through θ₀)."""
    if scale == 1.0:
        return merged
    base = base.to(torch.float32)
    return base + scale * (merged.to(torch.float32) - base)
