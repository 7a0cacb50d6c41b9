"""Session fixtures of the skills harness (distmerge.skills): trained once per test session.

skill_models   dict name -> Path: "base" and one fine-tune per skill ("reverse", "lookup",
               "sort"), float32 Hugging Face Llama directories (about a minute of CPU).
skill_merge    a function (name, recipe dict, *cli args, cwd=None) -> Path that runs
               ``distmerge run`` (the CLI, in a subprocess, from ``cwd``) on the recipe,
               once per name per session.

soup_ingredients dict name -> Path: fine-tunes of "reverse" from skill_models' base, four
               good ones (different seeds and learning rates) and "bad_lr3e-2" (a learning
               rate 30x too high: it forgets the skill), for tests/test_soup.py.

Import them into a test module (``from tests.skills_fixtures import skill_models, skill_merge``).
The trained checkpoints are made once per test run, not once per pytest-xdist worker: they
are kept in a folder all workers share (the run's base temp folder), under a file lock, keyed
by the sources of distmerge/skills.py and distmerge/tinyllama.py and the training settings.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml

from distmerge import skills, tinyllama
from distmerge.skills import make_skill_models
from tests.helpers import run_cli

#: seconds the last skill_models training took (reported by tests/test_skills.py)
TRAIN_SECONDS: dict[str, float] = {}


#: the soup's ingredients: name -> distmerge.skills.finetune settings (skill "reverse")
SOUP_SKILL = "reverse"
SOUP_INGREDIENTS = {
    "seed11_lr1e-3": dict(seed=11, lr=1e-3),
    "seed12_lr2e-3": dict(seed=12, lr=2e-3),
    "seed13_lr5e-4": dict(seed=13, lr=5e-4),
    "seed14_lr1.5e-3": dict(seed=14, lr=1.5e-3),
    "bad_lr3e-2": dict(seed=15, lr=3e-2),
}


def trained_once(tmp_path_factory, name: str, settings: dict, make: Callable[[Path], None]) -> Path:
    """``make(folder)`` once per test run: the folder is shared by every xdist worker (the
    parent of a worker's base temp folder is the run's; without xdist, the base temp folder)
    and named by a hash of the training code and ``settings``. One worker trains under an
    fcntl lock while the others wait on it; a "done" file, written last, marks a whole result
    (a worker killed mid-training leaves none, and the next one starts again)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for module in (skills, tinyllama):
        h.update(Path(module.__file__).read_bytes())
    root = shared / f"{name}-{h.hexdigest()[:16]}"
    with open(shared / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done").is_file():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            t0 = time.perf_counter()
            make(root)
            TRAIN_SECONDS[name] = time.perf_counter() - t0
            (root / "done").write_text(f"{TRAIN_SECONDS[name]:.1f} s\n")
    return root


@pytest.fixture(scope="session")
def skill_models(tmp_path_factory) -> dict[str, Path]:
    root = trained_once(tmp_path_factory, "skill_models", {"seed": 0}, lambda root: make_skill_models(root, seed=0))
    return {name: root / name for name in ("base", *skills.SKILLS)}


@pytest.fixture(scope="session")
def soup_ingredients(tmp_path_factory, skill_models) -> dict[str, Path]:
    def make(root: Path) -> None:
        for name, settings in SOUP_INGREDIENTS.items():
            skills.finetune(skill_models["base"], SOUP_SKILL, root / name, **settings)

    settings = {"base_seed": 0, "skill": SOUP_SKILL, "ingredients": SOUP_INGREDIENTS}
    root = trained_once(tmp_path_factory, "soup_ingredients", settings, make)
    return {name: root / name for name in SOUP_INGREDIENTS}


@pytest.fixture(scope="session")
def skill_merge(tmp_path_factory):
    root = tmp_path_factory.mktemp("skill_merges")
    done: dict[str, Path] = {}
    lock = threading.Lock()  # merges may run from several threads (they are subprocesses)

    def merge(name: str, recipe: dict, *args: str, cwd: Path | None = None) -> Path:
        with lock:
            if name in done:
                return done[name]
        out = root / name
        path = root / f"{name}.yml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        proc = run_cli("run", path, out, "--quiet", "--device", "cpu", *args, cwd=cwd)
        assert proc.returncode == 0, f"distmerge run {name} failed (exit code {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        with lock:
            done[name] = out
        return out

    return merge
