"""NearSwap: take the other model's value where it is close to the base's."""

from __future__ import annotations

import torch

from distmerge.methods import Method, Param


def nearswap(base: torch.Tensor, tensors: list[torch.Tensor], *, t: float) -> torch.Tensor:
    """θ = w θ₁ + (1 − w) θ₀ with w = clamp(t / max(|θ₀ − θ₁|, 1e-6), 0, 1), elementwise.

    Entries that differ by at most t are swapped for the other model's; larger
    differences are interpolated by t/|Δ|, so far-apart entries stay near the base.
    (alchemonaut, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001)
    """
    (other,) = tensors
    weight = (t / (base - other).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


METHODS = (
    Method(
        name="nearswap",
        merge=nearswap,
        params=(Param("t", float, doc="distance below which the other model's value is taken"),),
        base="required",
        min_inputs=1,
        max_inputs=1,
        summary="Take the other model's entries where they are within t of the base's.",
        paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    ),
)
