"""Sparsifiers the fused task-arithmetic kernel understands.

Each is a callable ``(i, τᵢ) -> τ̂ᵢ`` that runs ``distmerge.methods.sparsify`` (so on CPU a
method behaves exactly as with a lambda), and also a description of itself that the Triton
path turns into a per-input keep rule evaluated inside the kernel, so that the sparsified
task vectors are never written to memory:

- ``TopK``      TIES trim: the k = max(1, ⌊density·n⌋) largest |τ| (``sparsify.magnitude``).
- ``Outliers``  Breadcrumbs: drop the ⌊γ·n⌋ largest, keep the next ⌊density·n⌋
                (``sparsify.magnitude_outliers``).
- ``RandomDrop`` DARE: keep where uniform(seedᵢ)[j] < densityᵢ (``sparsify.random``).
- ``Masked``    given boolean masks (``sparsify.masked``).

Any other callable still works: the Triton path then materializes its τ̂ᵢ with torch and
fuses only the combination.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class TopK:
    density: Sequence[float]
    rescale: bool = False

    def __call__(self, i: int, delta: torch.Tensor) -> torch.Tensor:
        from distmerge.methods import sparsify

        return sparsify.magnitude(delta, self.density[i], self.rescale)


@dataclass(frozen=True)
class Outliers:
    density: Sequence[float]
    gamma: Sequence[float]
    rescale: bool = False

    def __call__(self, i: int, delta: torch.Tensor) -> torch.Tensor:
        from distmerge.methods import sparsify

        return sparsify.magnitude_outliers(delta, self.density[i], self.gamma[i], self.rescale)


@dataclass(frozen=True)
class RandomDrop:
    density: Sequence[float]
    seeds: Sequence[int]
    rescale: bool = True

    def __call__(self, i: int, delta: torch.Tensor) -> torch.Tensor:
        from distmerge.methods import sparsify

        return sparsify.random(delta, self.density[i], self.seeds[i], self.rescale)


@dataclass(frozen=True)
class Masked:
    masks: Sequence[torch.Tensor]
    rescale: bool = False

    def __call__(self, i: int, delta: torch.Tensor) -> torch.Tensor:
        from distmerge.methods import sparsify

        return sparsify.masked(delta, self.masks[i], self.rescale)
