"""Ctrl-C and SIGTERM (Slurm's time limit) stop a run cleanly: what is on disk is journaled,
the message says so and how to resume, and the rerun produces the clean run's bytes."""

import filecmp
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.helpers import REPO_ROOT, run_cli

SHARDS = ("--out-shard-size", "60KB")


@pytest.fixture
def recipe(llama_family, tmp_path):
    f = llama_family
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(f["base"]), "dtype": "float32",
        "models": [{"model": str(f["ft1"]), "parameters": {"weight": 0.6}}, {"model": str(f["ft2"]), "parameters": {"weight": 0.4}}],
    }))  # fmt: skip
    return path


def start_slow_run(recipe, out):
    """A run that sleeps 0.3 s after every tensor from the third on (about 12 s in all)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "DISTMERGE_FAULT": "0:3:sleep:0.3"}
    return subprocess.Popen([sys.executable, "-m", "distmerge.cli", "run", str(recipe), str(out), *SHARDS], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def journal_lines(out) -> int:
    folder = out / ".distmerge" / "journal"
    return sum(len(p.read_text().splitlines()) for p in folder.glob("*.jsonl")) if folder.is_dir() else 0


@pytest.mark.parametrize("sig, code, what", [(signal.SIGTERM, 143, "stopped by SIGTERM"), (signal.SIGINT, 130, "interrupted (Ctrl-C)")])
def test_a_stopped_run_says_what_it_kept_and_the_rerun_resumes(recipe, tmp_path, sig, code, what):
    clean = tmp_path / "clean"
    assert run_cli("run", recipe, clean, "--quiet", *SHARDS).returncode == 0
    out = tmp_path / "out"
    proc = start_slow_run(recipe, out)
    deadline = time.monotonic() + 60
    while not (out / ".distmerge" / "plan.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2.0)  # a few tensors in: the journal commits every 10 s, so nothing is journaled yet
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"stopped: {what}") and "rerun the same command to resume" in last, stderr
    kept = int(re.search(r"(\d+) merged tensors are journaled", last)[1])
    assert kept == journal_lines(out) > 0  # what was on disk was journaled at the stop
    assert not (out / ".distmerge.lock").exists() and not (out / "model.safetensors.index.json").exists()
    r = run_cli("run", recipe, out, *SHARDS)
    assert r.returncode == 0, r.stderr
    for p in clean.glob("model-*.safetensors"):
        assert filecmp.cmp(p, out / p.name, shallow=False), p.name
