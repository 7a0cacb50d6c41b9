"""A chunked form hands each chunk back on one thread, as the rank merges (``threads.one``)."""

from __future__ import annotations

import pytest
import torch

from distmerge import tensor_merge, threads
from tests.test_merge_vs_mergekit import distmerge, models

TASK = {"weight": 0.6, "density": 0.5}
RECIPES = {  # method: (per-model parameters, recipe parameters)
    "ties": (TASK, {}),
    "breadcrumbs": (TASK, {"gamma": 0.02}),
    "dare_ties": (TASK, {}),
    "dare_linear": (TASK, {}),
    "della": (TASK, {"epsilon": 0.1}),
    "della_linear": (TASK, {"epsilon": 0.1}),
    "sce": ({}, {"select_topk": 0.5}),
    "model_stock": ({}, {}),
    "slerp": ({}, {"t": 0.3}),  # the base and one model
}


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_each_chunk_is_rounded_and_checked_on_one_thread(method, llama_family, tmp_path, monkeypatch):
    """The caller rounds each merged chunk into the output dtype and checks it for NaN and Inf
    with torch ops (``tensor_merge._merge``), on one thread, whatever threads the method's
    own passes take (``threads.every``). A generator that yields inside ``every`` leaves its
    caller on every thread: on the benchmark's second data set dare_ties then spent 12-16% of
    its wall time in OpenMP's waits for a core the writer's threads held (README, run 20)."""
    per_model, params = RECIPES[method]
    f = llama_family
    recipe = {
        "merge_method": method,
        "base_model": str(f["base"]),
        "models": models(f, *[(name, per_model) for name in (("base", "ft1") if method == "slerp" else ("ft1", "ft2"))]),
        "parameters": params,
        "dtype": "bfloat16",
    }
    seen = []
    check = tensor_merge.check_finite
    monkeypatch.setattr(tensor_merge, "check_finite", lambda t, value: seen.append(torch.get_num_threads()) or check(t, value))
    monkeypatch.setattr(tensor_merge, "CHUNK_ELEMENTS", 4099)
    with threads.using(2):  # a rank given two threads: every() uses both
        distmerge(recipe, tmp_path / "out")
    assert seen and set(seen) == {1}
