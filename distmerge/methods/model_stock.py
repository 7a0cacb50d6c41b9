"""Model Stock: move the average of the fine-tuned models back toward the base by an
amount set by the angle between their task vectors."""

from __future__ import annotations

import torch

from distmerge import kernels
from distmerge.methods import Method, Param


def _mean_pairwise_cosine(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Mean over pairs i < j of cos(τᵢ, τⱼ) = τᵢ·τⱼ / max(‖τᵢ‖‖τⱼ‖, 1e-6), clamped to [−1, 1],
    along the last axis."""
    cosines = []
    for i, a in enumerate(deltas):
        for b in deltas[i + 1 :]:
            norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0)


def model_stock(base: torch.Tensor, tensors: list[torch.Tensor], *, filter_wise: bool = False) -> torch.Tensor:
    """θ = t θ̄ + (1 − t) θ₀ with θ̄ = Σ θᵢ / N and t = N cos θ / (1 + (N − 1) cos θ).

    Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models"
    (https://arxiv.org/abs/2403.19522), cos θ the mean pairwise cosine between the task
    vectors θᵢ − θ₀ of the whole tensor, or of each row with ``filter_wise``. Where the
    denominator is below 1e-6 in magnitude t = 0 (the base), as mergekit does.
    """
    n = len(tensors)
    w0 = _vectors(base, filter_wise)
    models = [_vectors(x, filter_wise) for x in tensors]
    cos = _mean_pairwise_cosine([x - w0 for x in models]).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))
    return kernels.stock_interpolate(w0, models, t).reshape(base.shape)  # t θ̄ + (1 − t) θ₀


def _vectors(x: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """The vectors whose angles are measured, along the last axis: the whole tensor, or
    its rows (a 1-D tensor is one row)."""
    if not filter_wise:
        return x.reshape(-1)
    return x.unsqueeze(0) if x.dim() == 1 else x


METHODS = (
    Method(
        name="model_stock",
        merge=model_stock,
        params=(Param("filter_wise", bool, False, doc="one interpolation ratio per row instead of per tensor"),),
        base="required",
        min_inputs=2,
        summary="Average of the models, pulled toward the base by the angle between their task vectors.",
        paper="https://arxiv.org/abs/2403.19522",
    ),
)
