"""Session fixtures of the skills harness (distmerge.skills): trained once per test session.

skill_models   dict name -> Path: "base" and one fine-tune per skill ("reverse", "lookup",
               "sort"), float32 Hugging Face Llama directories (about a minute of CPU).
skill_merge    a function (name, recipe dict, *cli args, cwd=None) -> Path that runs
               ``distmerge run`` (the CLI, in a subprocess, from ``cwd``) on the recipe,
               once per name per session.

Import both into a test module (``from tests.skills_fixtures import skill_models, skill_merge``).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import yaml

from distmerge.skills import make_skill_models
from tests.helpers import run_cli

#: seconds the last skill_models training took (reported by tests/test_skills.py)
TRAIN_SECONDS: dict[str, float] = {}


@pytest.fixture(scope="session")
def skill_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("skill_models")
    t0 = time.perf_counter()
    models = make_skill_models(root, seed=0)
    TRAIN_SECONDS["skill_models"] = time.perf_counter() - t0
    return models


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
        assert proc.returncode == 0, f"distmerge run {name} failed:\n{proc.stdout}\n{proc.stderr}"
        with lock:
            done[name] = out
        return out

    return merge
