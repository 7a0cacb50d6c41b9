"""What the task-arithmetic kernels keep of each task vector: a decision the methods hand over as data.

The merge methods decide which entries of each task vector τᵢ survive (their ``sparsify``);
the kernels only apply the decision. It is one rule per input:

- None: keep everything (τᵢ as it is, never rescaled);
- ``Band``: the entries whose magnitude rank lies in a band (rank 0 the largest |τ|, equal
  magnitudes ranked lower flat index first), given by two ``Top`` cuts: TIES's top-k is a
  band that skips nothing, Model Breadcrumbs' drops the largest too;
- ``Draw``: keep entry j where ``distmerge.rng.uniform(seed)[j] < p`` (DARE);
- a bool tensor of τᵢ's shape: keep where True (DELLA's MagPrune draws, or any other rule).

``Keep.rescale`` scales every τᵢ with a rule to its own L1 norm (``reference.masked``). On
CUDA the bands and draws are evaluated inside the fused kernel: neither the masks nor the
sparsified task vectors are written to memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CUT_ALL, CUT_NONE = -2, -1
"""``Top.cut`` values meaning "every entry is in the top k" (k ≥ n) and "none is" (k ≤ 0)."""


@dataclass(frozen=True, slots=True)
class Top:
    """The k largest |τ|, as a threshold and a tie cut: the entries with |τ| > ``threshold``,
    and those with |τ| = ``threshold`` at a flat (row-major) index ≤ ``cut``. ``cut`` is
    CUT_ALL for every entry and CUT_NONE for none."""

    threshold: float
    cut: int


ALL = Top(-math.inf, CUT_ALL)
NONE = Top(math.inf, CUT_NONE)

SELECT_ALL, SELECT_NONE = (-1, -1, 0), ((1 << 31) - 1, -1, 0)
"""Selections of a chunk's entries by the bits of their |τ| as (c, t, n): the entries whose
bits exceed c, and the first n in flat order whose bits equal t (``sparsify.ChunkedTopK.rule``,
``loops.trim_combine``). These take every entry, and none (no bit pattern exceeds 2³¹ − 1)."""


@dataclass(frozen=True, slots=True)
class Band:
    """The entries in ``top`` and not in ``skip``: magnitude ranks skip .. skip + k − 1."""

    top: Top
    skip: Top = NONE


@dataclass(frozen=True, slots=True)
class Draw:
    """Keep entry j (the flat index) where ``rng.uniform(seed)[j] < p``: a Bernoulli(p) draw."""

    seed: int
    p: float


Rule = Band | Draw | torch.Tensor | None
"""What survives of one task vector (see the module docstring)."""


@dataclass(frozen=True, slots=True)
class Keep:
    """One ``Rule`` per input, all of one kind (bands, draws or masks) besides None, and
    whether the kept task vectors are L1-rescaled."""

    rules: tuple[Rule, ...]
    rescale: bool = False

    def kind(self) -> type | None:
        """Band, Draw or torch.Tensor: the kind of the rules that are not None (None if all are)."""
        kinds = {torch.Tensor if isinstance(r, torch.Tensor) else type(r) for r in self.rules if r is not None}
        if len(kinds) > 1:
            raise TypeError(f"one kind of keep rule per merge, got {sorted(k.__name__ for k in kinds)}")
        return kinds.pop() if kinds else None
