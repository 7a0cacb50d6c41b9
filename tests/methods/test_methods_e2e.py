"""Every merge method end to end through the CLI, against mergekit 0.1.5 on the same recipe.

Three kinds of comparison (facts about mergekit: ../shared/ORACLE.md):

- float32 recipes on the float32 checkpoints: distmerge and mergekit do the same float32
  operations in the same order, so the outputs must be **bit-identical** (tolerance 0) for
  every deterministic method, with filters, gradients, slices and 2-4 models.
- bfloat16 recipes: distmerge rounds the inputs to bf16, computes in float32 and rounds
  once. That is exactly mergekit's ``dtype: float32`` recipe on the same bf16 checkpoints,
  rounded to bf16 (bit-identical again); mergekit's own bf16 recipe computes many methods
  in bf16 and is compared within a stated number of bf16 ulps.
- randomized methods (DARE, DELLA): at density 1 nothing is drawn and they equal their
  deterministic counterparts, bit for bit; below 1 their masks come from a different
  generator than mergekit's global one, so the output is checked by statistics (kept
  fraction, magnitude dependence, L1 rescale) applied to both tools' outputs, and for
  reproducibility from ``--random-seed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from distmerge.cli import main
from distmerge.methods import METHODS
from tests.helpers import assert_same_tensors, load_state, run_mergekit, safetensors_files, ulp_bf16


def distmerge(recipe: dict, out: Path, *args: str) -> Path:
    """Run ``distmerge run`` in this process (the CLI's entry point) and return ``out``.

    On the CPU, like mergekit here: the bit-identity claims below are about the same float32
    operations on the same device (a GPU orders its reductions differently).
    """
    path = out.parent / (out.name + ".yml")
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    main(["run", str(path), str(out), "--quiet", "--device", "cpu", *args])
    return out


def models(fam, *specs):
    """[(name, parameters)] -> mergekit ``models`` entries pointing at fixture paths."""
    return [{"model": str(fam[name]), **({"parameters": p} if p else {})} for name, p in specs]


def sources(fam, layers, *specs):
    """[(name, parameters)] -> slice ``sources`` over ``layers`` = [start, end]."""
    return [{"model": str(fam[name]), "layer_range": list(layers), **({"parameters": p} if p else {})} for name, p in specs]


# ====================================================================== float32: bit-identical


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[dict], dict]
    """fixture family -> recipe (without dtype)."""

    @property
    def method(self) -> str:
        return self.build({k: Path(k) for k in ("base", "ft1", "ft2", "ft3")})["merge_method"]


def _with_base(method, *specs, parameters=None):
    def build(f):
        r = {"merge_method": method, "base_model": str(f["base"]), "models": models(f, *specs)}
        return r | ({"parameters": parameters} if parameters else {})

    return build


def _no_base(method, *specs, parameters=None):
    def build(f):
        r = {"merge_method": method, "models": models(f, *specs)}
        return r | ({"parameters": parameters} if parameters else {})

    return build


MLP_OR_ATTN = [{"filter": "mlp", "value": [0.2, 0.9]}, {"filter": "self_attn", "value": 0.6}, {"value": 0.4}]

FLOAT32_CASES = [
    # ------------------------------------------------------------ linear
    Case("linear-2-gradient-unnormalized", _no_base(
        "linear", ("ft1", {"weight": [0.3, 1.2, 0.5]}), ("ft2", {"weight": 0.7}), parameters={"normalize": False})),
    Case("linear-4-filters", _no_base(
        "linear", ("base", {"weight": MLP_OR_ATTN}), ("ft1", {"weight": 0.1}), ("ft2", {"weight": 0.3}), ("ft3", {"weight": [0.5, 0.1]}))),
    # ------------------------------------------------------------ slerp
    Case("slerp-filtered-gradient", _with_base(
        "slerp", ("base", None), ("ft3", None), parameters={"t": [{"filter": "mlp", "value": [0, 1]}, {"filter": "o_proj", "value": 0.9}, {"value": 0.4}]})),
    Case("slerp-slices-restart-gradient", lambda f: {
        "merge_method": "slerp", "base_model": str(f["base"]),
        "slices": [
            {"sources": sources(f, [0, 2], ("base", None), ("ft1", None)), "parameters": {"t": [0.1, 0.9]}},
            {"sources": sources(f, [2, 4], ("base", None), ("ft1", None)), "parameters": {"t": [0.8, 0.2]}},
        ]}),
    # ------------------------------------------------------------ nuslerp (exactly two models)
    Case("nuslerp-taskvectors-weight-gradient", _with_base(
        "nuslerp", ("ft1", {"weight": 1.0}), ("ft2", {"weight": [0.5, 2.0]}))),
    Case("nuslerp-rowwise-no-base", _no_base(
        "nuslerp", ("ft1", {"weight": 1.0}), ("ft3", {"weight": 3.0}), parameters={"nuslerp_flatten": False, "nuslerp_row_wise": True})),
    Case("nuslerp-rows-taskvectors", _with_base(
        "nuslerp", ("ft2", {"weight": [{"filter": "mlp", "value": 2.0}, {"value": 1.0}]}), ("ft3", {"weight": 1.0}), parameters={"nuslerp_flatten": False})),
    # ------------------------------------------------------------ multislerp
    Case("multislerp-2-no-base", _no_base("multislerp", ("ft1", {"weight": 0.3}), ("ft2", {"weight": 0.7}))),
    Case("multislerp-3-base-gradient", _with_base(
        "multislerp", ("ft1", {"weight": 1.0}), ("ft2", {"weight": 2.0}), ("ft3", {"weight": [0.5, 1.5]}))),
    Case("multislerp-4-unnormalized-filter", _no_base(
        "multislerp", ("base", {"weight": 0.4}), ("ft1", {"weight": MLP_OR_ATTN}), ("ft2", {"weight": 0.3}), ("ft3", {"weight": 0.2}),
        parameters={"normalize_weights": False})),
    # ------------------------------------------------------------ task arithmetic
    Case("task_arithmetic-3-negation-filter-lambda", _with_base(
        "task_arithmetic", ("ft1", {"weight": 1.0}), ("ft2", {"weight": -0.5}), ("ft3", {"weight": MLP_OR_ATTN}),
        parameters={"lambda": [{"filter": "mlp", "value": 1.3}, {"value": 0.8}]})),
    Case("task_arithmetic-2-normalized-gradient", _with_base(
        "task_arithmetic", ("ft1", {"weight": [0.2, 1.0]}), ("ft3", {"weight": 0.5}), parameters={"normalize": True})),
    # ------------------------------------------------------------ ties
    Case("ties-2-defaults", _with_base("ties", ("ft1", {"weight": 1.0, "density": 0.5}), ("ft2", {"weight": 0.5, "density": 0.3}))),
    Case("ties-3-gradients-filters-rescale-int8-lambda", _with_base(
        "ties",
        ("ft1", {"weight": [0.2, 1.0], "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.7}]}),
        ("ft2", {"weight": 0.5, "density": [0.2, 0.9]}),
        ("ft3", {"weight": -0.4, "density": 0.5}),
        parameters={"normalize": False, "rescale": True, "int8_mask": True, "lambda": 1.3})),
    Case("ties-slices-with-slice-parameters", lambda f: {
        "merge_method": "ties", "base_model": str(f["base"]),
        "slices": [
            {"sources": sources(f, [0, 2], ("base", None), ("ft1", {"weight": 1.0, "density": [0.3, 0.7]}), ("ft2", {"weight": 0.5})),
             "parameters": {"density": 0.5, "normalize": False}},
            {"sources": sources(f, [2, 4], ("base", None), ("ft1", {"weight": 0.4, "density": 0.9}),
                                ("ft2", {"weight": 1.0, "density": [{"filter": "mlp", "value": 0.2}, {"value": 0.6}]}))},
        ]}),
    # ------------------------------------------------------------ breadcrumbs
    Case("breadcrumbs-2-gamma", _with_base(
        "breadcrumbs", ("ft1", {"weight": 1.0, "density": 0.5, "gamma": 0.1}), ("ft2", {"weight": 0.5, "density": 0.7}))),
    Case("breadcrumbs-3-gradient-overfull-rescale", _with_base(
        "breadcrumbs",
        ("ft1", {"weight": 0.6, "density": 0.9, "gamma": 0.3}),  # density + gamma > 1: fewer outliers dropped
        ("ft2", {"weight": 0.5, "density": [0.2, 0.9], "gamma": [{"filter": "mlp", "value": 0.05}, {"value": 0.0}]}),
        ("ft3", {"weight": 0.7, "density": 0.4}),
        parameters={"rescale": True, "normalize": True})),
    # ------------------------------------------------------------ breadcrumbs_ties
    Case("breadcrumbs_ties-3", _with_base(
        "breadcrumbs_ties", ("ft1", {"weight": 1.0, "density": 0.5, "gamma": 0.1}), ("ft2", {"weight": 0.5, "density": 0.8, "gamma": 0.3}),
        ("ft3", {"weight": 0.7, "density": [0.2, 0.9]}))),
    Case("breadcrumbs_ties-2-normalize-rescale-lambda", _with_base(
        "breadcrumbs_ties", ("ft2", {"weight": [1.0, 0.2], "density": 0.6, "gamma": 0.02}), ("ft3", {"weight": -0.5, "density": 0.6}),
        parameters={"normalize": True, "rescale": True, "lambda": 0.9})),
    # ------------------------------------------------------------ model_stock (two or more fine-tunes)
    Case("model_stock-2", _with_base("model_stock", ("ft1", None), ("ft2", None))),
    Case("model_stock-3-filter_wise", _with_base("model_stock", ("ft1", None), ("ft2", None), ("ft3", None), parameters={"filter_wise": True})),
    # ------------------------------------------------------------ sce
    Case("sce-2", _with_base("sce", ("ft1", None), ("ft3", None))),
    Case("sce-3-select_topk-filter", _with_base(
        "sce", ("ft1", None), ("ft2", None), ("ft3", None), parameters={"select_topk": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}], "int8_mask": True})),
    # ------------------------------------------------------------ karcher (the base, if named, is one more input)
    Case("karcher-2", _no_base("karcher", ("ft1", None), ("ft2", None))),
    Case("karcher-3-max_iter-tol", _no_base("karcher", ("ft1", None), ("ft2", None), ("ft3", None), parameters={"max_iter": 3, "tol": 1e-6})),
    Case("karcher-4-base-as-input", _with_base("karcher", ("ft1", None), ("ft2", None), ("ft3", None))),
    # ------------------------------------------------------------ nearswap (exactly one other model)
    Case("nearswap-t", _with_base("nearswap", ("ft1", None), parameters={"t": 0.005})),
    Case("nearswap-filtered-gradient", _with_base(
        "nearswap", ("ft2", None), parameters={"t": [{"filter": "self_attn", "value": [0.001, 0.02]}, {"value": 0.01}]})),
    # ------------------------------------------------------------ arcee_fusion: < 1M elements per tensor, no sampling
    Case("arcee_fusion-ft1", _with_base("arcee_fusion", ("ft1", None))),
    Case("arcee_fusion-ft3", _with_base("arcee_fusion", ("ft3", None))),
    # ------------------------------------------------------------ ram / ramplus_tl
    # Fine-tunes differ from the base by 0.01·N(0, 1): the default epsilon 1e-5 marks every
    # entry as changed by every model (only overlaps); epsilon 0.01 gives a mix of entries
    # changed by 0, 1, 2 and 3 models.
    Case("ram-2-default-epsilon", _with_base("ram", ("ft1", None), ("ft2", None))),
    Case("ram-3-mixed-overlaps", _with_base("ram", ("ft1", None), ("ft2", None), ("ft3", None), parameters={"epsilon": [{"filter": "mlp", "value": 0.012}, {"value": 0.01}]})),
    Case("ramplus_tl-2-defaults", _with_base("ramplus_tl", ("ft1", None), ("ft3", None), parameters={"epsilon": 0.01})),
    Case("ramplus_tl-3-r-alpha", _with_base("ramplus_tl", ("ft1", None), ("ft2", None), ("ft3", None), parameters={"epsilon": 0.012, "r": 0.5, "alpha": 0.8})),
    # ------------------------------------------------------------ passthrough
    Case("passthrough-scale-filter-gradient", _no_base("passthrough", ("ft2", {"scale": [{"filter": "o_proj", "value": [1.0, 0.25]}, {"value": 1.0}]}))),
    Case("passthrough-slices-two-models", lambda f: {
        "merge_method": "passthrough",
        "slices": [{"sources": sources(f, [0, 3], ("ft1", None))}, {"sources": sources(f, [1, 4], ("ft3", {"scale": 0.5}))}]}),
]

DETERMINISTIC = {"linear", "slerp", "nuslerp", "multislerp", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties",
                 "model_stock", "sce", "karcher", "nearswap", "arcee_fusion", "ram", "ramplus_tl", "passthrough"}  # fmt: skip
RANDOMIZED = {"dare_ties", "dare_linear", "della", "della_linear"}


def test_every_method_is_covered():
    """Every method of mergekit's registry has cases here (distmerge may have more, tested elsewhere)."""
    registry = pytest.importorskip("mergekit.merge_methods.registry", reason="mergekit 0.1.5 is the reference")
    assert DETERMINISTIC | RANDOMIZED == {m.spec.name for m in registry.registered_methods()}
    assert DETERMINISTIC | RANDOMIZED <= set(METHODS)
    randomized = {m for m in DETERMINISTIC | RANDOMIZED if METHODS[m].randomized}
    assert randomized == RANDOMIZED | {"arcee_fusion"}  # sampling only above 1M elements
    covered = {}
    for case in FLOAT32_CASES:
        covered[case.method] = covered.get(case.method, 0) + 1
    assert {m: n for m, n in covered.items() if n < 2} == {}
    assert set(covered) == DETERMINISTIC


@pytest.mark.slow
@pytest.mark.parametrize("case", FLOAT32_CASES, ids=lambda c: c.id)
def test_float32_recipe_is_bit_identical_to_mergekit(case, llama_family_f32, tmp_path):
    recipe = case.build(llama_family_f32) | {"dtype": "float32"}
    ours = distmerge(recipe, tmp_path / "ours")
    theirs = run_mergekit(recipe, tmp_path / "mergekit")
    # Tolerance 0: same float32 operations in the same order (reductions over at most
    # 4 inputs are accumulated in list order in both, the same as a stacked sum).
    assert_same_tensors(ours, theirs)


def _case(case_id: str) -> Case:
    (case,) = [c for c in FLOAT32_CASES if c.id == case_id]
    return case


# ====================================================================== bfloat16


def _input_states(recipe: dict) -> list[dict[str, torch.Tensor]]:
    """Every checkpoint a (models-style) recipe reads."""
    paths = {m["model"] for m in recipe["models"]} | ({recipe["base_model"]} if "base_model" in recipe else set())
    return [load_state(p) for p in sorted(paths)]


def differences_in_input_ulps(ours: Path, theirs: Path, inputs: list[dict]) -> dict[str, torch.Tensor]:
    """Per tensor, |ours − theirs| in bf16 ulps of the largest |input| at each element.

    The scale is that of the inputs, not of the result: mergekit's bf16 roundings happen on
    deltas, products and partial sums of input-sized numbers, so where a merge cancels to
    near zero the error is still about an input ulp (a result-relative bound would blow up).
    """
    a, b = load_state(ours), load_state(theirs)
    assert set(a) == set(b)
    out = {}
    for name in a:
        scale = torch.stack([s[name].float().abs() for s in inputs]).amax(0)
        out[name] = (a[name].float() - b[name].float()).abs().double() / ulp_bf16(scale)
    return out


def assert_within_input_ulps(ours, theirs, inputs, ulps: float, *, max_fraction_beyond: float = 0.0) -> None:
    diffs = differences_in_input_ulps(ours, theirs, inputs)
    total = sum(d.numel() for d in diffs.values())
    beyond = {name: int((d > ulps).sum()) for name, d in diffs.items()}
    n_beyond = sum(beyond.values())
    worst = max(diffs, key=lambda n: float(diffs[n].max()))
    assert n_beyond <= max_fraction_beyond * total, (
        f"{n_beyond}/{total} elements differ by more than {ulps} input ulps "
        f"(allowed {max_fraction_beyond:.2%}); worst {float(diffs[worst].max()):.3g} ulps in {worst}; "
        f"per tensor: { {n: c for n, c in beyond.items() if c} }"
    )


# Exact, via mergekit's float32 path: a bf16 recipe in distmerge rounds the inputs to bf16,
# computes in float32 and rounds the result once. mergekit does exactly that computation
# for the same recipe with ``dtype: float32`` on the bf16 checkpoints (the bf16 -> float32
# cast is exact), so distmerge's bf16 output must be mergekit's float32 output rounded to
# bf16, bit for bit. Methods that pick entries by magnitude rank (ties and breadcrumbs
# below density 1, sce's select_topk) are left out here: bf16 inputs give many exactly
# equal |deltas|, and mergekit breaks those ties with an unstable sort (see
# test_ties_on_bf16_inputs_differs_only_in_the_choice_among_equal_magnitudes).
BF16_EXACT_VIA_FLOAT32 = [
    "linear-4-filters", "slerp-filtered-gradient", "nuslerp-rows-taskvectors", "multislerp-3-base-gradient",
    "task_arithmetic-3-negation-filter-lambda", "model_stock-3-filter_wise", "sce-2", "karcher-4-base-as-input",
    "nearswap-filtered-gradient", "arcee_fusion-ft1", "ram-3-mixed-overlaps", "ramplus_tl-3-r-alpha",
    "passthrough-scale-filter-gradient",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case_id", BF16_EXACT_VIA_FLOAT32)
def test_bf16_recipe_is_mergekits_float32_math_rounded_once(case_id, llama_family, tmp_path):
    recipe = _case(case_id).build(llama_family)
    ours = distmerge(recipe | {"dtype": "bfloat16"}, tmp_path / "ours")
    theirs = run_mergekit(recipe | {"dtype": "float32"}, tmp_path / "mergekit")
    rounded = {name: t.to(torch.bfloat16) for name, t in load_state(theirs).items()}
    assert_same_tensors(ours, rounded)  # tolerance 0, dtypes checked (all bf16)


@pytest.mark.slow
def test_ties_on_bf16_inputs_differs_only_in_the_choice_among_equal_magnitudes(llama_family, tmp_path):
    """TIES trim of one bf16 fine-tune, float32 math: the same number of entries is kept,
    and where the kept sets differ the |delta| equals the k-th largest one (a tie at the
    boundary): distmerge keeps the lowest flat indices, mergekit's unstable argsort others."""
    f = llama_family
    recipe = {"merge_method": "ties", "base_model": str(f["base"]), "models": models(f, ("ft1", {"weight": 1.0, "density": 0.3})), "dtype": "float32"}
    ours, theirs = load_state(distmerge(recipe, tmp_path / "ours")), load_state(run_mergekit(recipe, tmp_path / "mergekit"))
    base, ft = load_state(f["base"]), load_state(f["ft1"])
    n_differ = 0
    for name, out in ours.items():
        delta = ft[name].float() - base[name].float()
        k = max(1, int(0.3 * delta.numel()))
        kth = delta.abs().flatten().topk(k).values[-1]
        kept_ours, kept_theirs = out != base[name].float(), theirs[name] != base[name].float()
        assert int(kept_ours.sum()) == int(kept_theirs.sum()) == k, name
        differ = kept_ours != kept_theirs
        assert torch.equal(delta.abs()[differ], kth.expand(int(differ.sum()))), name
        same = ~differ
        assert torch.equal(out[same], theirs[name][same]), name
        n_differ += int(differ.sum())
    assert n_differ > 0  # bf16 inputs do produce such ties; the test would be vacuous otherwise


# mergekit's own bf16 recipes. Tolerances are in bf16 ulps of the largest |input| at the
# element (see differences_in_input_ulps); measured maxima (1 and 2 torch threads) in [].
# Not compared here, on purpose:
# - arcee_fusion: mergekit computes the softmaxes and the KL divergence of each row in bf16,
#   where the per-entry terms (~1e-6) are below bf16's resolution of the probabilities
#   (~1/64): its KL comes out negative for some rows and correlates ~0.05 with the float32
#   KL, so ~9% of the entries it takes differ from the float32 choice. distmerge follows the
#   definition (float32 KL, exactly mergekit's float32 recipe, tested above).
# - ram / ramplus_tl with epsilon near the deltas' size: mergekit tests |δ| > ε on
#   bf16-rounded deltas, so entries with |δ| within a rounding of ε change presence.
BF16_VS_MERGEKIT_BF16 = [
    # The task-arithmetic family computes in bf16 in mergekit (ORACLE.md): one rounding per
    # delta (n), per weight product (n), per partial sum (n − 1), then the division by the
    # weights, lambda and the final addition, each worth about one input ulp (the numbers
    # rounded are of the inputs' size): 3n + 2 = 11 for n = 3 models. [8]
    ("task_arithmetic-3-negation-filter-lambda", dict(normalize=True), 11, 0.0),
    # mergekit computes norms, cosines and the interpolation coefficients in bf16 (relative
    # error ~2^-8 each), which moves the result by a few input ulps. [8 / 8 / 3 / 4]
    ("nuslerp-taskvectors-weight-gradient", {}, 12, 0.0),
    ("multislerp-3-base-gradient", {}, 12, 0.0),
    ("karcher-4-base-as-input", {}, 6, 0.0),
    ("model_stock-3-filter_wise", {}, 6, 0.0),
    # weight = t / |a − b| and the interpolation in bf16. [3]
    ("nearswap-t", {}, 6, 0.0),
    # ram with the default epsilon (every entry changed by every model, no presence flips):
    # deltas, the count division and the sum in bf16. [2]
    ("ram-2-default-epsilon", {}, 4, 0.0),
    # Sign election and top-k trimming on bf16-rounded deltas in mergekit: where Σ wᵢτᵢ is
    # within a rounding of 0 the elected sign, and so the set of averaged models, can differ;
    # equal |deltas| at the top-k boundary are broken differently. Those elements move by up
    # to a whole delta; all others stay within the family's rounding bound (3n + 1 = 7 for
    # n = 2 and no lambda; sce: deltas, products, sums, division and addition alike).
    # [312 = 0.19% / 38 = 0.02% of the elements beyond 7 ulps]
    ("ties-2-defaults", {}, 7, 0.01),
    ("sce-2", {}, 7, 0.01),
]


@pytest.mark.slow
@pytest.mark.parametrize("case_id, extra, ulps, max_fraction", BF16_VS_MERGEKIT_BF16, ids=[c[0] for c in BF16_VS_MERGEKIT_BF16])
def test_bf16_recipe_close_to_mergekit_bf16(case_id, extra, ulps, max_fraction, llama_family, tmp_path):
    recipe = _case(case_id).build(llama_family) | {"dtype": "bfloat16"}
    if extra:
        recipe["parameters"] = recipe.get("parameters", {}) | extra
    ours = distmerge(recipe, tmp_path / "ours")
    theirs = run_mergekit(recipe, tmp_path / "mergekit")
    assert_within_input_ulps(ours, theirs, _input_states(recipe), ulps, max_fraction_beyond=max_fraction)


@pytest.mark.slow
def test_bf16_output_dtype_is_the_recipe_dtype_where_mergekit_promotes(llama_family, tmp_path):
    """mergekit 0.1.5 writes float32 tensors for a ``dtype: bfloat16`` arcee_fusion or
    ramplus_tl recipe (its float32 mask / boost factor promotes the bf16 result and nothing
    casts it back without ``out_dtype``). distmerge writes the recipe's dtype; the values are
    mergekit's float32 math rounded once (checked exactly above)."""
    f = llama_family
    for method, specs in (("arcee_fusion", [("ft1", None)]), ("ramplus_tl", [("ft1", None), ("ft2", None)])):
        recipe = {"merge_method": method, "base_model": str(f["base"]), "models": models(f, *specs), "dtype": "bfloat16"}
        ours = load_state(distmerge(recipe, tmp_path / method))
        assert {t.dtype for t in ours.values()} == {torch.bfloat16}, method
    # ramplus_tl's values against mergekit's own bf16 run: deltas and sums in bf16 there. [1.5]
    theirs = run_mergekit(recipe, tmp_path / "mergekit")
    assert_within_input_ulps(tmp_path / "ramplus_tl", theirs, _input_states(recipe), 4)


# ====================================================================== randomized methods

# At density 1 nothing is dropped and nothing is drawn (mergekit returns the delta before
# touching its generator), so each randomized method is its deterministic counterpart with
# the same normalize default: dare_ties = ties with normalize: false, dare_linear and
# della_linear = task_arithmetic, della = ties (both normalize by default). rescale has no
# effect at density 1 (it is only applied to a masked delta).
DENSITY_ONE_PAIRS = [
    ("dare_ties", "ties", {"normalize": False}),
    ("dare_linear", "task_arithmetic", {}),
    ("della", "ties", {}),
    ("della_linear", "task_arithmetic", {}),
]


@pytest.mark.slow
@pytest.mark.parametrize("method, counterpart, counterpart_params", DENSITY_ONE_PAIRS, ids=[p[0] for p in DENSITY_ONE_PAIRS])
def test_randomized_method_at_density_one_is_its_deterministic_counterpart(method, counterpart, counterpart_params, llama_family_f32, tmp_path):
    f = llama_family_f32
    specs = [("ft1", {"weight": [0.2, 1.0], "density": 1.0}), ("ft2", {"weight": -0.4}), ("ft3", {"weight": MLP_OR_ATTN})]
    recipe = {"merge_method": method, "base_model": str(f["base"]), "models": models(f, *specs),
              "parameters": {"lambda": 1.2}, "dtype": "float32"}  # fmt: skip
    ours = distmerge(recipe, tmp_path / "ours", "--random-seed", "1234")
    same_method = run_mergekit(recipe, tmp_path / "mergekit", seed=1234)
    counterpart_recipe = recipe | {"merge_method": counterpart, "parameters": recipe["parameters"] | counterpart_params}
    counterpart_out = run_mergekit(counterpart_recipe, tmp_path / "counterpart")
    assert_same_tensors(ours, same_method)  # float32: bit-identical
    assert_same_tensors(ours, counterpart_out)


# Below density 1 the masks come from distmerge's counter-based generator (reproducible on
# any number of ranks), mergekit's from torch's global one: the same statistics, not the
# same bits. Both outputs are checked against the same expectations.
DENSITY = [0.2, 0.8]
"""dare density gradient: layer i of 4 keeps with 0.2 + 0.2·i; embeddings, norm, lm_head 0.2."""
DELLA_DENSITY, DELLA_EPSILON = 0.5, 0.3
"""della keeps an entry with 0.2 (smallest |delta| of its row) ... 0.8 (largest)."""
SIGMAS = 5


def _keep_probabilities(method: str, name: str, delta: torch.Tensor, density, epsilon) -> torch.Tensor:
    """The probability that each entry of ``delta`` survives, per the papers / mergekit."""
    if method.startswith("dare"):
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        t = 0.0 if layer is None else int(layer) / 3  # 4 layers: t = i / (L − 1)
        d = density[0] + (density[1] - density[0]) * t if isinstance(density, list) else density
        return torch.full_like(delta, d, dtype=torch.float64)
    # DELLA MagPrune: rank of |delta| in its row (axis 1; a 1-D tensor is one row), scaled
    # to [0, 1], gives probability density − ε ... density + ε.
    rows = delta.reshape(1, -1) if delta.dim() == 1 else delta
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).double()
    p = (density - epsilon) + 2 * epsilon * ranks / (rows.shape[1] - 1)
    return p.reshape(delta.shape)


def _binomial_check(label: str, observed: int, p: torch.Tensor) -> None:
    """``observed`` successes of independent trials with probabilities ``p``: within SIGMAS σ."""
    mean, var = float(p.sum()), float((p * (1 - p)).sum())
    assert abs(observed - mean) <= SIGMAS * math.sqrt(var) + 1, (
        f"{label}: {observed} vs expected {mean:.1f} ± {math.sqrt(var):.1f}"
    )


def check_drop_statistics(method: str, out_dir: Path, fam: dict, names: list[str], densities: list, epsilon: float) -> None:
    """Statistics of a randomized merge of the fine-tunes ``names`` (weight 1 each).

    An entry of the output equals the base's exactly when every model's delta was dropped
    there (a kept delta is never 0 for these checkpoints and, TIES or not, at least one
    kept delta survives the sign election). So the unchanged entries count the joint
    drops: independent per model, P = Πᵢ (1 − pᵢ). With one model, the kept entries carry
    mergekit's "rescale": the L1 norm of each tensor's delta is preserved.
    """
    out, base = load_state(out_dir), load_state(fam["base"])
    fts = [load_state(fam[n]) for n in names]
    total_unchanged, total_p, top_half, top_p, bottom_half, bottom_p = 0, [], 0, [], 0, []
    for name, merged in out.items():
        deltas = [ft[name] - base[name] for ft in fts]
        ps = [_keep_probabilities(method, name, d, dens, epsilon) for d, dens in zip(deltas, densities)]
        p_unchanged = torch.ones_like(ps[0])
        for p in ps:
            p_unchanged = p_unchanged * (1 - p)
        unchanged = merged == base[name]
        _binomial_check(f"{name}: entries equal to the base", int(unchanged.sum()), p_unchanged)
        total_unchanged += int(unchanged.sum())
        total_p.append(p_unchanged.flatten())
        if len(names) == 1:
            (delta,) = deltas
            merged_delta = merged - base[name]
            l1, merged_l1 = float(delta.abs().double().sum()), float(merged_delta.abs().double().sum())
            assert merged_l1 == pytest.approx(l1, rel=1e-4), f"{name}: L1 of the delta not preserved"
            if method.startswith("della"):
                upper = ps[0] > DELLA_DENSITY  # the larger half of each row's |delta|
                top_half += int((~unchanged & upper).sum())
                top_p.append(ps[0][upper])
                bottom_half += int((~unchanged & ~upper).sum())
                bottom_p.append(ps[0][~upper])
    _binomial_check("all entries equal to the base", total_unchanged, torch.cat(total_p))
    if top_p:
        # Magnitude-dependent keeping: ~0.65 of the larger half, ~0.35 of the smaller.
        _binomial_check("kept among the larger |delta| of each row", top_half, torch.cat(top_p))
        _binomial_check("kept among the smaller |delta| of each row", bottom_half, torch.cat(bottom_p))


RANDOMIZED_METHODS = ["dare_ties", "dare_linear", "della", "della_linear"]


@pytest.mark.slow
@pytest.mark.parametrize("n_models", [1, 2])
@pytest.mark.parametrize("method", RANDOMIZED_METHODS)
def test_randomized_method_drop_statistics(method, n_models, llama_family_f32, tmp_path):
    f = llama_family_f32
    names = ["ft1", "ft2"][:n_models]
    if method.startswith("dare"):
        densities = [DENSITY, 0.6][:n_models]  # two models: 0.2..0.8 and 0.6, jointly dropped 0.32..0.08
        extra = {}
    else:
        densities = [DELLA_DENSITY, 0.4][:n_models]
        extra = {"epsilon": DELLA_EPSILON if n_models == 1 else 0.2}
    specs = [(n, {"weight": 1.0, "density": d} | extra) for n, d in zip(names, densities)]
    recipe = {"merge_method": method, "base_model": str(f["base"]), "models": models(f, *specs), "dtype": "float32"}
    epsilon = extra.get("epsilon", 0.0)
    check_drop_statistics(method, distmerge(recipe, tmp_path / "ours", "--random-seed", "7"), f, names, densities, epsilon)
    check_drop_statistics(method, run_mergekit(recipe, tmp_path / "mergekit", seed=7), f, names, densities, epsilon)


def _file_bytes(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in safetensors_files(out_dir)}


@pytest.mark.slow
def test_random_seed_reproducibility(llama_family_f32, tmp_path):
    f = llama_family_f32
    recipe = {"merge_method": "dare_ties", "base_model": str(f["base"]), "dtype": "float32",
              "models": models(f, ("ft1", {"weight": 0.6, "density": 0.5}), ("ft2", {"weight": 0.4, "density": 0.3}))}  # fmt: skip
    first = distmerge(recipe, tmp_path / "seed7", "--random-seed", "7")
    again = distmerge(recipe, tmp_path / "seed7-again", "--random-seed", "7")
    other = distmerge(recipe, tmp_path / "seed8", "--random-seed", "8")
    assert _file_bytes(first) == _file_bytes(again)  # same seed: the same bytes
    a, c = load_state(first), load_state(other)
    differing = [name for name in a if not torch.equal(a[name], c[name])]
    assert _file_bytes(first) != _file_bytes(other)
    assert len(differing) == len(a)  # a different seed redraws every tensor's masks
    # The masks depend on (seed, tensor, model) only, not on how the output is split into files.
    split = distmerge(recipe, tmp_path / "seed7-split", "--random-seed", "7", "--out-shard-size", "100KB")
    assert len(safetensors_files(split)) > 1
    assert_same_tensors(split, first)
