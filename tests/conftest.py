"""Session fixtures: tiny Llama checkpoints (built once per session) and an offline hub cache.

Fixtures
--------
llama_family      dict name -> Path for "base", "ft1", "ft2", "ft3": bf16, 4 layers,
                  hidden 64, vocab 128; base in 2 shards + index, ft1 and ft3 single
                  model.safetensors, ft2 in 3 shards. Fine-tunes = base + 0.01 * N(0, 1).
llama_family_f32  the same models (same seeds) in float32, for sharp comparisons.
llama_deep        dict name -> Path for "base", "ft1", "ft2": bf16, 8 layers, single files
                  (passthrough / layer-stacking recipes).
hf_hub_cache      (cache_dir, repo_id): a huggingface_hub cache with repo_id
                  "distmerge-test/tiny-llama" (a copy of llama_family["base"]) and
                  "distmerge-test/tiny-llama-ft1" (a copy of llama_family["ft1"]).
"""

from __future__ import annotations

import getpass
import hashlib
import importlib.util
import os
import platform
import shutil
import tempfile
from pathlib import Path

# The same CPU kernels on every x86-64 host, set before torch runs its first op (it reads these
# once): the tiny models the suite trains (skills, soups, evolve, Re-Basin) differ in their last
# bits between torch's AVX2 and AVX-512 kernels and MKL's code paths, and the results asserted
# on them were measured with AVX2. Without it, on an AVX-512 host the greedy soup's ingredients
# scored 64-70 instead of 73-77 and the soup kept one of them, not three. Subprocesses inherit it.
# Inductor compiles for the same ISA, but its disk cache does not key on it: code compiled for
# AVX-512 by an earlier run was loaded and no longer matched the eager kernels bit for bit, so
# the pinned runs get a cache of their own.
if platform.machine() in ("x86_64", "AMD64"):
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
    os.environ.setdefault("MKL_CBWR", "AVX2")
    cache = f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), cache))

import pytest  # noqa: E402
import torch  # noqa: E402

# No test may reach the hub: resolve model ids from local caches only. Set before
# huggingface_hub / transformers are imported (they read it at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from distmerge.demo import make_family  # noqa: E402

try:  # the test extra; without it the property-based test files skip (each says so)
    from hypothesis import settings
except ImportError:
    settings = None

# CI explores the same examples every run (a green run stays green); a developer's runs draw
# new ones each time, which is how the fuzz tests find new problems.
if settings is not None:
    settings.register_profile("ci", derandomize=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")

HUB_REPO_ID = "distmerge-test/tiny-llama"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.needs("mergekit", ...)``: the test is skipped, saying which, where an
    optional package of the test extra is not installed (looked up without importing it);
    ``@pytest.mark.cuda``: skipped where torch sees no CUDA GPU."""
    no_gpu = not torch.cuda.is_available()
    for item in items:
        if no_gpu and item.get_closest_marker("cuda"):
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        for mark in item.iter_markers("needs"):
            missing = [m for m in mark.args if importlib.util.find_spec(m) is None]
            if missing:
                item.add_marker(pytest.mark.skip(reason=f"needs {', '.join(missing)}, not installed (pip install -e '.[test]')"))


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama_family")
    return make_family(
        root, n_finetunes=3, seed=0, dtype=torch.bfloat16, num_layers=4,
        shards={"base": 2, "ft1": 1, "ft2": 3, "ft3": 1},
    )


@pytest.fixture(scope="session")
def llama_family_f32(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama_family_f32")
    return make_family(
        root, n_finetunes=3, seed=0, dtype=torch.float32, num_layers=4,
        shards={"base": 2, "ft1": 1, "ft2": 3, "ft3": 1},
    )


@pytest.fixture(scope="session")
def llama_deep(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama_deep")
    return make_family(root, n_finetunes=2, seed=100, dtype=torch.bfloat16, num_layers=8)


def fill_hub_cache(cache_dir: Path, repo_id: str, src: Path) -> Path:
    """Put the files of ``src`` into ``cache_dir`` as huggingface_hub's cache holds a download.

    models--ORG--NAME/blobs/<hash>                  file contents (sha256 for safetensors,
                                                    git blob sha1 for the rest, as the hub)
    models--ORG--NAME/refs/main                     the commit hash (40 hex, no newline)
    models--ORG--NAME/snapshots/<commit>/<file>     relative symlink ../../blobs/<hash>
    Returns the snapshot directory.
    """
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"distmerge-test:{repo_id}".encode()).hexdigest()
    blobs, snap = repo_dir / "blobs", repo_dir / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    for f in sorted(src.iterdir()):
        if not f.is_file():
            continue
        data = f.read_bytes()
        if f.suffix == ".safetensors":  # LFS files: blob named by sha256
            blob = hashlib.sha256(data).hexdigest()
        else:  # regular git files: blob named by the git blob sha1
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        shutil.copyfile(f, blobs / blob)
        link = snap / f.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path("..") / ".." / "blobs" / blob)
    return snap


@pytest.fixture(scope="session")
def hf_hub_cache(tmp_path_factory, llama_family) -> tuple[Path, str]:
    """(cache_dir, repo_id) of a pre-filled huggingface_hub cache (see fill_hub_cache).

    Resolve offline with ``huggingface_hub.snapshot_download(repo_id, cache_dir=cache_dir,
    local_files_only=True)``, or in a subprocess with HF_HUB_CACHE=cache_dir and
    HF_HUB_OFFLINE=1. ``repo_id + "-ft1"`` is a second repo holding llama_family["ft1"].
    """
    cache_dir = tmp_path_factory.mktemp("hf_hub_cache")
    fill_hub_cache(cache_dir, HUB_REPO_ID, llama_family["base"])
    fill_hub_cache(cache_dir, HUB_REPO_ID + "-ft1", llama_family["ft1"])
    return cache_dir, HUB_REPO_ID
