"""Linear merging: the weighted average of "model soups"."""

from __future__ import annotations

import torch

from distmerge.methods import Method, Param


def linear(base: None, tensors: list[torch.Tensor], *, weight: list[float], normalize: bool = True) -> torch.Tensor:
    """θ = Σᵢ wᵢ θᵢ, divided by Σᵢ wᵢ when ``normalize``.

    Wortsman et al. 2022, "Model soups" (https://arxiv.org/abs/2203.05482).
    Accumulates in input order, as mergekit does.
    """
    w = torch.tensor(weight, dtype=tensors[0].dtype)
    out = torch.zeros_like(tensors[0])
    for wi, x in zip(w, tensors):
        out.addcmul_(x, wi)  # out += wᵢ·θᵢ, fused as in mergekit so float32 results agree bitwise
    return out / w.sum() if normalize else out


METHODS = (
    Method(
        name="linear",
        merge=linear,
        params=(
            Param("weight", float, scope="input", doc="weight of each model"),
            Param("normalize", bool, True, doc="divide by the sum of the weights"),
        ),
        base="ignored",
        summary="Weighted average of the models (model soups).",
        paper="https://arxiv.org/abs/2203.05482",
    ),
)
