"""The method registry: a new method is one new module, and the plan asks it for its memory."""

from __future__ import annotations

import dataclasses
import importlib
import sys
import types

import distmerge.methods as methods_package
from distmerge import plan as plan_module
from distmerge.methods import METHODS, Method, float32_copies

EXTRA = '''
from distmerge.methods import Method


def merge(base, tensors):
    """θ = θ₁ (a test method)."""
    return tensors[0]


METHODS = (Method(name="first_one", merge=merge, summary="The first model.", work_bytes=lambda n, numel: 99 * numel),)
'''


def test_a_new_module_registers_itself(tmp_path, monkeypatch):
    (tmp_path / "first_one.py").write_text(EXTRA)
    monkeypatch.setattr(methods_package, "__path__", [*methods_package.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "distmerge.methods.first_one", raising=False)
    try:
        registry = methods_package._registry()
        assert set(METHODS) < set(registry) and registry["first_one"].summary == "The first model."
    finally:
        sys.modules.pop("distmerge.methods.first_one", None)
        importlib.invalidate_caches()


def test_the_memory_estimate_asks_the_method():
    plain = types.SimpleNamespace(quant=None)
    t = types.SimpleNamespace(shape=(1000, 10), all_inputs=[plain] * 3, nbytes=20000, quant=None)
    ties = METHODS["ties"]
    assert ties.work_bytes is float32_copies
    assert plan_module._working_bytes(ties, t) == 10000 * 4 * (3 + 2) + 20000
    svd = dataclasses.replace(ties, work_bytes=lambda n, numel: 12 * n * numel)
    assert plan_module._working_bytes(svd, t) == 12 * 3 * 10000 + 20000
    # a quantized input is dequantized whole: its float32 values on top
    t.all_inputs = [plain, types.SimpleNamespace(quant={"format": "fp8"}), plain]
    assert plan_module._working_bytes(ties, t) == 10000 * 4 * (3 + 2) + 20000 + 4 * 10000


def test_the_task_arithmetic_family_is_one_table():
    """Eight registered methods, one merge function: each row a (sparsifier, consensus) pair."""
    from distmerge.methods import task_arithmetic

    family = {m.name: m for m in task_arithmetic.FAMILY}
    assert set(family) == {"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}
    for name, member in family.items():
        method: Method = METHODS[name]
        assert method.merge.func is task_arithmetic.merge and method.merge.keywords["consensus"] == member.consensus
        assert method.kernel_options
