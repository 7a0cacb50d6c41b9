"""The start-up self-check of the kernels on CUDA (``distmerge.kernels.selfcheck``), without a GPU:
which kernels a recipe's methods select, what the report says, and that a CPU run never checks.

The check itself (correct kernels pass, a broken one is switched to its reference with one
warning) runs the interpreted kernels, so those tests are in tests/kernels/test_kernels.py's
child process (``test_selfcheck_*``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from distmerge import kernels, run
from distmerge.job import kernel_report
from distmerge.kernels import reference, selfcheck
from distmerge.methods import METHODS
from distmerge.methods.task_arithmetic import FAMILY
from distmerge.tensor_merge import method_kernels, plan_methods
from tests.helpers import benchmark_script


def test_methods_select_their_kernels():
    expected = {
        "linear": ("linear_sum",),
        "slerp": ("slerp_combine",),
        "passthrough": ("scale",),
        "model_stock": ("stock_interpolate",),
        "task_arithmetic": ("task_merge",),
        "ties": ("task_merge/band",),
        "breadcrumbs": ("task_merge/band",),
        "breadcrumbs_ties": ("task_merge/band",),
        "dare_ties": ("task_merge/draw",),
        "dare_linear": ("task_merge/draw",),
        "della": ("task_merge/mask",),
        "della_linear": ("task_merge/mask",),
    }
    assert {m.name for m in FAMILY} <= set(expected)
    for name in METHODS:
        assert method_kernels(name, "cuda:0") == expected.get(name, ()), name
        assert set(method_kernels(name, "cuda")) <= set(selfcheck.KERNELS)
    # on CPU the family's two-pass chunked forms (never on CUDA) also combine with task_combine
    assert method_kernels("ties", "cpu") == ("task_merge/band", "task_combine")
    assert method_kernels("task_arithmetic", "cpu") == ("task_merge",)
    assert method_kernels("sce", "cpu") == ()


def test_the_dispatch_names_match_the_checked_kernels():
    """``kernels.kernel_name`` (what the dispatch looks up in ``disabled``) gives the check's names."""
    band, draw, mask = kernels.Band(kernels.ALL), kernels.Draw(1, 0.5), torch.ones(3, dtype=torch.bool)
    assert kernels.kernel_name(None) == "task_merge"
    assert kernels.kernel_name(kernels.Keep((None, None))) == "task_merge"
    assert kernels.kernel_name(kernels.Keep((band, None))) == "task_merge/band"
    assert kernels.kernel_name(kernels.Keep((draw, draw))) == "task_merge/draw"
    assert kernels.kernel_name(kernels.Keep((mask, None))) == "task_merge/mask"
    assert {kernels.kernel_name(kernels.Keep((r,))) for r in (band, draw, mask)} | {"task_merge"} <= set(selfcheck.KERNELS)


def test_a_disabled_kernel_runs_the_reference_on_cuda(monkeypatch):
    import types

    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    cuda_like = types.SimpleNamespace(is_cuda=True)
    off = kernels.KernelOptions(disabled=frozenset({"scale"}))
    assert kernels._impl(cuda_like, off, kernel="scale") is kernels.reference
    assert kernels.path("scale", "cuda:0", off) == "torch"
    assert kernels.path("slerp_combine", "cuda:0", off) == "triton"
    assert kernels.path("slerp_combine", "cuda", kernels.KernelOptions(triton=False)) == "torch"


def test_cpu_paths_follow_the_compile_option():
    always, never = kernels.KernelOptions(compile="always"), kernels.KernelOptions(compile="never")
    assert kernels.path("scale", "cpu", always) == "compiled"
    assert kernels.path("scale", "cpu", never) == "torch"
    assert kernels.path("linear_sum", "cpu", always) == "loops for bf16 inputs, else torch"  # addcmul_ is never compiled
    assert kernels.path("linear_sum", "cpu", never) == "torch"
    auto = kernels.KernelOptions()
    assert kernels.path("task_combine", "cpu", auto.for_work(1 << 29), consensus=True) == "compiled"
    assert kernels.path("task_combine", "cpu", auto.for_work(1 << 29), consensus=False) == "torch"
    assert kernels.path("task_merge/band", "cpu", auto, consensus=True) == "loops for bf16 inputs, else torch"
    assert kernels.path("task_merge/band", "cpu", never, consensus=True) == "torch"
    assert kernels.path("task_merge/draw", "cpu", auto) == kernels.path("task_merge/mask", "cpu", auto) == "loops for bf16 inputs, else torch"


class _Plan:
    def __init__(self, method, stages=()):
        self.method, self.stages = method, {f"s{i}": s for i, s in enumerate(stages)}


def test_check_kernels_on_cuda_checks_each_selected_kernel_once(monkeypatch):
    """Stages' methods included, each kernel once; a failure becomes the method's path."""
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    asked = []

    def fake_check(names, device, options):
        names = list(names)
        asked.append((sorted(set(names)), len(names), device))
        findings = [selfcheck.Finding(k, k != "task_merge/band", "1 of 9 entries differ") for k in dict.fromkeys(names)]
        return dataclasses.replace(options, disabled=frozenset({"task_merge/band"})), findings

    monkeypatch.setattr(selfcheck, "check", fake_check)
    plans = [_Plan("slerp", [_Plan("ties"), _Plan("breadcrumbs"), _Plan("sce")]), _Plan("linear")]
    assert plan_methods(plans) == ["ties", "breadcrumbs", "sce", "slerp", "linear"]
    options, paths = run.check_kernels(plans, "cuda:1", kernels.KernelOptions())
    assert asked == [(["linear_sum", "slerp_combine", "task_merge/band"], 4, "cuda:1")]
    assert options.disabled == {"task_merge/band"}
    failed = "torch (self-check failed: task_merge/band: 1 of 9 entries differ)"
    assert paths == {"ties": failed, "breadcrumbs": failed, "sce": "torch", "slerp": "triton", "linear": "triton"}
    # DISTMERGE_NO_TRITON=1: nothing to check, every method on the torch path
    asked.clear()
    options, paths = run.check_kernels(plans, "cuda", kernels.KernelOptions(triton=False))
    assert asked == [] and set(paths.values()) == {"torch"}


def test_check_kernels_never_checks_on_cpu(monkeypatch):
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    monkeypatch.setattr(selfcheck, "check", lambda *a: pytest.fail("self-check on CPU"))
    options, paths = run.check_kernels([_Plan("ties")], "cpu", kernels.KernelOptions(compile="never"))
    assert options == kernels.KernelOptions(compile="never") and paths == {"ties": "torch"}


def test_report_merges_the_ranks_paths():
    assert kernel_report([{"ties": "triton"}, {"ties": "triton"}, {}]) == {"ties": "triton"}
    assert kernel_report([{"ties": "triton"}, {"ties": "torch (self-check failed: x)"}]) == {
        "ties": "rank 0: triton; rank 1: torch (self-check failed: x)"
    }


def test_a_cpu_run_never_runs_the_self_check_and_reports_its_paths(llama_family, tmp_path, monkeypatch):
    from distmerge.job import JobOptions, run_job

    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    monkeypatch.setattr(selfcheck, "check", lambda *a, **k: pytest.fail("self-check on CPU"))
    f = llama_family
    recipe = tmp_path / "r.yml"
    models = [{"model": str(f[m]), "parameters": {"weight": 0.5}} for m in ("ft1", "ft2")]
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": models, "dtype": "float32"}))
    report = tmp_path / "report.json"
    result = run_job(str(recipe), str(tmp_path / "out"), JobOptions(device="cpu", quiet=True, report_json=str(report)))
    assert result.report["kernels"] == {"linear": "loops for bf16 inputs, else torch"}
    assert json.loads(report.read_text())["kernels"] == {"linear": "loops for bf16 inputs, else torch"}


# ---------------------------------------------------------------- benchmarks/gpu_kernels.py, without a GPU


def test_gpu_kernels_says_at_once_that_it_needs_a_gpu():
    from tests.helpers import REPO_ROOT

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_kernels.py"), "--shape", "64x64"],
        capture_output=True, text=True, timeout=60, env=env, cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no CUDA device: run this on a GPU machine" in result.stderr and result.stdout == ""


def test_gpu_kernels_arithmetic():
    gk = benchmark_script("gpu_kernels")
    assert gk.parse_shape("8192x28672") == (8192, 28672) and gk.parse_shape("4099") == (4099,)
    for bad in ("8192x", "0x4", "ax3"):
        with pytest.raises(Exception, match="shape"):
            gk.parse_shape(bad)
    base, x = torch.zeros(10, 3, dtype=torch.bfloat16), torch.zeros(10, 3)
    out = torch.zeros(10, 3)
    assert gk.moved_bytes([base, x], out) == 60 + 120 + 120
    assert gk.moved_bytes([base, x], out, passes=2) == 2 * 180 + 120
    assert gk.gb_per_s(3_000_000_000, 1.5) == pytest.approx(2.0)
    # H100 SXM: HBM3 at 2619 MHz on a 5120-bit bus = 3.35 TB/s
    peak, source = gk.peak_bandwidth("NVIDIA H100 80GB HBM3", 2_619_000, 5120)
    assert peak == pytest.approx(3.352e12, rel=1e-3) and "clock" in source
    assert gk.peak_bandwidth("NVIDIA H200", None, None) == (4.8e12, "data sheet (H200)")
    assert gk.peak_bandwidth("NVIDIA A100-SXM4-80GB", None, None)[0] == 2.039e12
    assert gk.peak_bandwidth("NVIDIA H100 PCIe", 0, 0)[0] == 2.0e12  # longest name that matches
    assert gk.peak_bandwidth("Some GPU", None, None) == (None, "unknown")


def test_the_benchmark_cases_are_the_self_checks_and_count_their_bytes():
    """The cases the benchmark times, on CPU through the references: every kernel has one, and
    a rescale reads its inputs twice."""
    data = selfcheck.inputs((4, 33), "cpu")
    found = {}
    for kernel in selfcheck.KERNELS:
        for case in selfcheck.cases(kernel, selfcheck.reference, data):
            assert selfcheck.compare(case.run(), case.reference(), case.exact) is None, case.label
            found[case.label] = case
    assert {c.label.split()[0] for c in found.values()} == set(selfcheck.KERNELS)
    rescaled = found["task_merge/draw linear rescale"]
    assert rescaled.passes == 2 and not rescaled.exact and len(rescaled.reads) == 4
    assert len(found["task_merge/mask consensus"].reads) == 6


def test_a_kernel_whose_reference_raises_stays_on_unchecked(monkeypatch):
    """(With the references standing in for the Triton launchers.) The run would fail on the
    reference path anyway: the kernel is kept, and the finding and a warning say it was not checked."""

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available\nsecond line")

    data = selfcheck.inputs((4, 33), "cpu")
    monkeypatch.setattr(selfcheck.reference, "scale", broken)
    with pytest.warns(UserWarning, match="scale Triton kernel was not checked"):
        finding = selfcheck._check_one("scale", types.SimpleNamespace(scale=lambda x, s: x.float() * s), data, data)
    assert finding == selfcheck.Finding("scale", True, "not checked: the torch reference raised RuntimeError: no kernel image is available")


def test_the_kernel_on_the_device_is_compared_with_the_reference_on_the_cpu(monkeypatch):
    """torch's CUDA ops are not the CPU's bit for bit (a division by a number is a product with
    its reciprocal there): the truth is the reference on the CPU. Here the "device" is meta
    (tensors without values): the check passes only if the reference ran on CPU copies."""
    from distmerge.kernels import triton_kernels

    want = reference.scale(selfcheck.inputs(selfcheck.SHAPE, "cpu")["models"][2], 0.37)
    ran_on = []

    def kernel(x, s):
        ran_on.append(x.device.type)
        return want.clone()

    monkeypatch.setattr(triton_kernels, "scale", kernel)
    options, findings = selfcheck.check(["scale"], "meta", kernels.KernelOptions())
    assert ran_on == ["meta"] and findings == [selfcheck.Finding("scale", True, "bitwise equal")]
    assert options.disabled == frozenset()

    monkeypatch.setattr(triton_kernels, "scale", lambda x, s: torch.nextafter(want, torch.full_like(want, 9.0)))
    with pytest.warns(UserWarning, match="scale Triton kernel on meta does not match its torch reference on the CPU"):
        options, findings = selfcheck.check(["scale"], "meta", kernels.KernelOptions())
    assert options.disabled == {"scale"} and findings[0].detail.startswith("4097 of 4097 entries differ (bitwise)")


# ---------------------------------------------------------------- benchmarks/gpu_e2e.py, without a GPU


def test_gpu_e2e_says_it_needs_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert benchmark_script("gpu_e2e").main([str(tmp_path / "w"), str(tmp_path / "r")]) == 2
    assert not (tmp_path / "w").exists()


def test_gpu_e2e_compares_bytes_then_closeness(tmp_path):
    """Byte-identical; an ulp off (close); a few entries far off (a flipped selection, within
    FLIPS); many far off (not close); a different dtype (not close)."""
    from safetensors.torch import save_file

    e2e = benchmark_script("gpu_e2e")
    x = torch.linspace(-1, 1, 10_000).reshape(100, 100)

    def out(name: str, y: torch.Tensor) -> Path:
        d = tmp_path / name
        d.mkdir()
        save_file({"w": y, "n": torch.ones(3)}, str(d / "model.safetensors"))
        return d

    cpu = out("cpu", x)
    assert e2e.compare(cpu, out("same", x.clone())) == (True, "byte-identical to CPU", True)
    same, what, close = e2e.compare(cpu, out("ulp", torch.nextafter(x, torch.full_like(x, 2.0))))
    assert (same, close) == (False, True) and what.startswith("1 tensors differ, max |diff| 1.2e-07")
    few = x.clone()
    few.view(-1)[:5] += 0.5
    assert e2e.compare(cpu, out("few", few))[1:] == ("1 tensors differ, max |diff| 0.5 of the tensor's largest entry, 0.05% of a tensor's entries beyond 0.0001", True)
    many = x.clone()
    many.view(-1)[:100] += 0.5
    assert e2e.compare(cpu, out("many", many))[2] is False
    assert e2e.compare(cpu, out("half", x.half()))[2] is False


def test_gpu_e2e_has_a_case_for_every_float32_case_and_randomized_method():
    from tests.methods.test_methods_e2e import FLOAT32_CASES, RANDOMIZED

    fams = {dt: {m: Path("/m") / dt / m for m in ("base", "ft1", "ft2", "ft3")} for dt in ("bfloat16", "float32")}
    cases = dict(benchmark_script("gpu_e2e").cases(fams))
    assert {c.id for c in FLOAT32_CASES} <= set(cases) and RANDOMIZED <= {r["merge_method"] for r in cases.values()}
    assert all(label in cases for label in benchmark_script("gpu_e2e").EXACT)
