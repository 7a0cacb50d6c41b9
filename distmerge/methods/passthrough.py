"""Passthrough: copy one input tensor, optionally scaled (frankenmerges, depth up-scaling)."""

from __future__ import annotations

import torch

from distmerge import kernels
from distmerge.methods import Method, Param


def passthrough(base: None, tensors: list[torch.Tensor], *, scale: list[float | None], options=None) -> torch.Tensor:
    """θ = s · θ₁ (θ₁ itself when no scale is set)."""
    (x,), (s,) = tensors, scale
    return x if s is None else kernels.scale(x, s, options=options)


METHODS = (
    Method(
        name="passthrough",
        merge=passthrough,
        params=(Param("scale", float, None, scope="input", doc="multiply the tensor by this"),),
        base="ignored",
        elementwise=True,
        kernel_options=True,
        max_inputs=1,
        summary="Copy layers from one model per slice; stack slices into a deeper model.",
        paper="https://arxiv.org/abs/2312.15166",
    ),
)
