"""Statistics shared by a unit's merges: a sweep's variants of one large tensor read the same
inputs, so the top-k statistics of each task vector are gathered once (``SharedTopK``)."""

from __future__ import annotations

import pytest
import torch

from distmerge.methods import get

SHAPE, CHUNK = (300, 1000), 1 << 14


def models(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=g).bfloat16()
    fine = [(base.float() + 0.01 * torch.randn(SHAPE, generator=g)).bfloat16() for _ in range(2)]
    return base, fine


def chunked(name: str, base, fine, params: dict, stats: dict | None) -> tuple[torch.Tensor, int]:
    """The method's chunked merge of the whole tensor, and how many passes it read."""
    starts = []

    def read(i, j, stored=False):
        starts.append(i)
        how = (lambda x: x) if stored else torch.Tensor.float
        return how(base.view(-1)[i:j]), [how(x.view(-1)[i:j]) for x in fine]

    extra = {} if stats is None else {"stats": stats}
    out = torch.empty(base.numel())
    for i, j, value in get(name).chunked(read, SHAPE, CHUNK, **params, **extra):
        out[i:j] = value
    return out, starts.count(0)


@pytest.mark.parametrize("name, extra", [("ties", {}), ("breadcrumbs", {"gamma": [0.01, 0.02]}), ("breadcrumbs_ties", {"gamma": [0.02, 0.01]})])
def test_variants_sharing_statistics_get_the_bits_of_separate_merges(name, extra):
    base, fine = models()
    stats: dict = {}
    for density in (0.3, 0.5, 0.3):
        for weight in (0.5, 0.7):
            params = {"weight": [weight, 1 - weight], "density": [density, density * 0.9], **extra}
            alone, _ = chunked(name, base, fine, params, None)
            shared, _ = chunked(name, base, fine, params, stats)
            assert torch.equal(alone.view(torch.int32), shared.view(torch.int32)), (density, weight)


def test_a_new_density_skips_the_first_statistics_pass_and_a_known_one_both():
    base, fine = models(1)
    stats: dict = {}
    passes = [chunked("ties", base, fine, {"weight": [0.5, 0.5], "density": [d, d]}, stats)[1] for d in (0.3, 0.5, 0.3, 0.5)]
    # alone: two statistics passes and the merge pass; a new density: the low-bits pass and the
    # merge pass (the high-bits histogram serves every density); a density seen before: the merge only
    assert passes == [3, 2, 1, 1]
    assert chunked("ties", base, fine, {"weight": [0.5, 0.5], "density": [0.3, 0.3]}, None)[1] == 3
