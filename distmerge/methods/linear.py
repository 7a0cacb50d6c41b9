"""Linear merging: the weighted average of "model soups"."""

from __future__ import annotations

import torch

from distmerge import kernels
from distmerge.methods import Method, Param


def linear(
    base: None, tensors: list[torch.Tensor], *, weight: list[float], normalize: bool = True, options=None
) -> torch.Tensor:
    """θ = Σᵢ wᵢ θᵢ, divided by Σᵢ wᵢ when ``normalize``.

    Wortsman et al. 2022, "Model soups" (https://arxiv.org/abs/2203.05482).
    Accumulates in input order with one fused multiply-add per model (``addcmul_``), as
    mergekit does, so float32 results agree bitwise (``distmerge.kernels.linear_sum``).
    """
    return kernels.linear_sum(tensors, weight, normalize=normalize, options=options)


def linear_into(base: None, tensors: list[torch.Tensor], *, out: torch.Tensor, weight: list[float], normalize: bool = True, options=None) -> bool:
    """``linear`` rounded straight into ``out`` where one loop can (``kernels.linear_sum_into``)."""
    return kernels.linear_sum_into(tensors, weight, normalize=normalize, out=out, options=options)


METHODS = (
    Method(
        name="linear",
        merge=linear,
        params=(
            Param("weight", float, scope="input", doc="weight of each model"),
            Param("normalize", bool, True, doc="divide by the sum of the weights"),
        ),
        base="ignored",
        elementwise=True,
        into=linear_into,
        kernel_options=True,
        divides_by_weight_sum="normalize",
        summary="Weighted average of the models (model soups).",
        paper="https://arxiv.org/abs/2203.05482",
    ),
)
