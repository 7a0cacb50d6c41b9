"""What a plain `pip install .` (no extras) needs, and what distmerge does without the optional
packages. The install itself, with a 2-rank torchrun merge and the demo, is checked by CI in a
venv of its own (.ci/clean_install.sh); these tests keep the declarations honest on every run."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

IMPORT_NAMES = {"pyyaml": "yaml"}
"""Distributions whose import name is not their name."""

GUARDED = {
    "triton": "imported only when distmerge.kernels.triton_available() says it imports",
    "deepspeed": "the extra distmerge[deepspeed]; without it, reading a ZeRO checkpoint is a MergeError naming it",
    "lm_eval": "the extra distmerge[eval]; imported only in distmerge eval's child process; without it, --tasks is a MergeError naming it",
    "cma": "the extra distmerge[evolve]; imported only by distmerge evolve's parameter search; without it, that search is a MergeError naming it",
    "scipy": "imported only by distmerge align's weight matching; without it, align is a MergeError saying: distmerge align needs scipy: pip install scipy",
    "tokenizers": "the extra distmerge[align]; imported only by align --data to tokenize its text; without it, that is a MergeError saying: pip install tokenizers",
    "matplotlib": "the extras distmerge[plot] and [eval]; imported only in distmerge.plots, when a plot is drawn; without it, soup and skills --plot say what to install and write no PNG",
}
"""Imported by distmerge but not required by a plain install, and why that is fine."""

NEEDED_BY_TORCH = {"numpy": "torch's object collectives (all_gather_object) call tensor.numpy(); torch does not declare it"}
"""Never imported by distmerge, needed all the same."""


def declared() -> set[str]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    names = {re.match(r"[A-Za-z0-9_.-]+", d)[0].lower() for d in project["dependencies"]}
    return {IMPORT_NAMES.get(n, n.replace("-", "_")) for n in names}


def third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> the distmerge files that import it (anywhere, lazily too)."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO_ROOT / "distmerge").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"distmerge"}:
                found.setdefault(top, set()).add(str(path.relative_to(REPO_ROOT)))
    return found


def test_every_package_distmerge_imports_is_declared_or_guarded():
    have = declared()
    missing = {m: sorted(files) for m, files in third_party_imports().items() if m not in have and m not in GUARDED}
    assert missing == {}, f"imported by distmerge, not in pyproject's dependencies, not guarded: {missing}"
    assert set(NEEDED_BY_TORCH) <= have


@pytest.mark.slow
def test_without_the_optional_packages_distmerge_imports_and_says_what_to_install():
    """A fresh interpreter in which the optional packages cannot be imported, as in a plain install."""
    script = """
import importlib, pkgutil, sys
for name in ("triton", "deepspeed", "transformers", "tokenizers", "lm_eval", "matplotlib"):
    sys.modules[name] = None  # `import name` now raises ImportError
import distmerge
from distmerge.errors import MergeError
for m in pkgutil.walk_packages(distmerge.__path__, "distmerge."):
    if m.name != "distmerge.kernels.triton_kernels":  # needs triton; imported only when it is there
        importlib.import_module(m.name)
from distmerge import kernels
print("triton:", kernels.triton_available())
from distmerge.io import zero
try:
    zero._safe_globals()
except MergeError as e:
    print("deepspeed:", e)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "triton: False",
        "deepspeed: reading DeepSpeed ZeRO checkpoints needs the deepspeed package: pip install 'distmerge[deepspeed]'",
    ]
