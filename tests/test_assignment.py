"""Spreading tensors over ranks by estimated time (``plan.tensor_cost``): bytes at
``IO_BYTES_PER_S`` plus each method's operations (``Method.work_flops``) at ``CPU_FLOPS_PER_S``,
so that an SVD method's large matrices are not all given to one rank."""

from __future__ import annotations

import filecmp
import json

import pytest
import yaml
from click.testing import CliRunner

from distmerge import methods, output, state
from distmerge.cli import cli, main
from distmerge.graph import assign_units, work_units
from distmerge.methods.tsv import svd_flops
from distmerge.plan import (
    CPU_FLOPS_PER_S, IO_BYTES_PER_S, InputRef, ModelInfo, OutputTensor, Plan, assign, assign_tensors, imbalance, rank_work,
    tensor_bytes, tensor_costs,
)  # fmt: skip
from distmerge.run import run_rank


def _tensor(name: str, shape: list[int], n_inputs: int = 3) -> OutputTensor:
    nbytes = 2 * (shape[0] * (shape[1] if len(shape) > 1 else 1))  # bfloat16
    refs = [InputRef(model=m, name=name, file="model.safetensors", dtype="BF16", begin=0, end=nbytes) for m in range(n_inputs)]
    return OutputTensor(name=name, shape=shape, dtype="BF16", inputs=refs[1:], base=refs[0], params={}, input_params={})


def _plan(method: str, tensors: list[OutputTensor]) -> Plan:
    return Plan(
        method=method, dtype=None, models=[ModelInfo(f"m{i}", f"/m{i}", None) for i in range(3)], tensors=tensors, files=[], layer_map=[], config={}, donor=0,
        tokenizer_source=None, seed=0, recipe_text="", chat_template=None, peak_memory=0,
    )  # fmt: skip


# Two 1024×1024 matrices first, then 1-D tensors holding as many bytes as both: by bytes, the
# even split is both matrices on rank 0 and every vector on rank 1.
TENSORS = [_tensor("a.weight", [1024, 1024]), _tensor("b.weight", [1024, 1024])] + [
    _tensor(f"v{i}.weight", [32768]) for i in range(64)
]


def test_svd_matrices_are_spread_by_estimated_time_not_bytes():
    p = _plan("tsv", TENSORS)
    by_bytes = assign([tensor_bytes(t) for t in p.tensors], 2)
    assert by_bytes == [[0, 1], list(range(2, 66))]  # what byte balancing did: both SVDs on rank 0
    shares = assign_tensors(p, 2)
    assert shares == [[0], list(range(1, 66))]  # one matrix each, still contiguous runs
    work = rank_work(p, shares)
    # Each matrix: two task SVDs and the orthogonal factors of the joined U and Vᵀ: ~2.2 s.
    assert work[0].flops == methods.get("tsv").work_flops(3, [1024, 1024], {}) > 4 * svd_flops(1024, 1024)
    assert 2.0 < work[0].seconds < 3.0
    assert work[0].seconds == pytest.approx(work[0].bytes / IO_BYTES_PER_S + work[0].flops / CPU_FLOPS_PER_S)
    assert work[1].bytes == 3 * work[0].bytes  # rank 1 moves three times the bytes ...
    assert abs(work[1].seconds / work[0].seconds - 1) < 0.05  # ... in about the same time (2.23 s, 2.28 s)
    assert imbalance(p, shares) < 0.05 and imbalance(p, by_bytes) > 0.9  # by bytes, rank 0 had ~all the time
    # Each rank's peak memory is its largest merge: a matrix's SVD scratch on both.
    assert work[0].peak_memory == work[1].peak_memory == methods.get("tsv").work_bytes(3, 1024 * 1024) + 2 * 1024 * 1024


def test_byte_only_methods_still_split_by_bytes():
    p = _plan("linear", TENSORS)  # element-wise: 2 operations per input element, ~1% of the time
    assert assign_tensors(p, 2) == assign([tensor_bytes(t) for t in p.tensors], 2) == [[0, 1], list(range(2, 66))]


def test_assignment_of_many_svd_matrices_uses_longest_first_and_is_deterministic():
    # Matrices of very different sizes in an order no contiguous split balances.
    tensors = [_tensor(f"m{i}", [s, s]) for i, s in enumerate([2048, 256, 256, 2048, 512, 256, 1024, 256, 2048, 512])]
    p = _plan("iso_c", tensors)
    shares = assign_tensors(p, 3)
    assert sorted(i for s in shares for i in s) == list(range(10)) and shares == assign_tensors(p, 3)
    assert [sorted(i for i in s if tensors[i].shape[0] == 2048) for s in shares] == [[0], [3], [8]]  # one big one each
    assert imbalance(p, shares) < 0.1


def test_units_of_one_plan_cost_what_its_tensors_cost():
    p = _plan("wudi", TENSORS)
    units = work_units([p])
    assert [u.cost for u in units] == tensor_costs(p)
    assert assign_units(units, 2) == assign_tensors(p, 2)


# ---------------------------------------------------------------- distmerge plan, and the bytes


def _recipe(fam, tmp_path, method="tsv"):
    recipe = {
        "merge_method": method,
        "base_model": str(fam["base"]),
        "dtype": "float32",
        "models": [{"model": str(fam[name])} for name in ("ft1", "ft2")],
    }
    path = tmp_path / f"{method}.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_plan_shows_each_ranks_compute_and_memory(llama_family_f32, tmp_path):
    recipe = _recipe(llama_family_f32, tmp_path)
    r = CliRunner().invoke(cli, ["plan", str(recipe), "--world-size", "2"])
    assert r.exit_code == 0, r.output
    assert "balanced by estimated time" in r.output
    ranks = [line for line in r.output.splitlines() if line.startswith("  rank ")]
    assert len(ranks) == 2 and all("computes" in line and "FLOP" in line and "peak working memory" in line for line in ranks)
    assert next(line for line in r.output.splitlines() if line.startswith("imbalance:")).endswith("more than the mean")
    r = CliRunner().invoke(cli, ["plan", str(recipe), "--world-size", "2", "--json"])
    d = json.loads(r.output)
    p = Plan.from_dict({k: v for k, v in d.items() if k not in ("assignment", "balanced_by", "imbalance")})
    work = rank_work(p, assign_tensors(p, 2))
    assert [(a["bytes"], a["flops"], a["seconds"], a["peak_memory"]) for a in d["assignment"]] == [
        (w.bytes, w.flops, w.seconds, w.peak_memory) for w in work
    ]
    assert all(a["flops"] > 0 and a["peak_memory"] > 0 for a in d["assignment"])
    assert d["balanced_by"] == {"estimated": "seconds", "io_bytes_per_s": IO_BYTES_PER_S, "cpu_flops_per_s": CPU_FLOPS_PER_S}


def test_tsv_on_two_ranks_writes_the_bytes_of_one(llama_family_f32, tmp_path):
    """Both ranks' shares run one after the other in this process (the launcher's runs are
    test_distributed's): the files do not depend on which rank merged which matrix."""
    recipe = _recipe(llama_family_f32, tmp_path)
    one = tmp_path / "one"
    main(["run", str(recipe), str(one), "--quiet", "--device", "cpu"])
    from distmerge.job import JobOptions, make_plan

    p = make_plan(str(recipe), JobOptions())
    shares = assign_tensors(p, 2)
    assert all(shares) and max(len(s) for s in shares) < len(p.tensors)
    two = tmp_path / "two"
    output.prepare(str(two), p, False, False)
    for rank in (0, 1):
        run_rank([(p, str(two))], rank, 2)
    output.finish(p, str(two))
    state.release_lock(str(two))
    files = sorted(f.name for f in one.iterdir() if f.is_file())
    assert files == sorted(f.name for f in two.iterdir() if f.is_file())
    match, mismatch, errors = filecmp.cmpfiles(one, two, files, shallow=False)
    assert not mismatch and not errors and any(f.endswith(".safetensors") for f in match)
