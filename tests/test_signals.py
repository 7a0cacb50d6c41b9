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

from tests.helpers import REPO_ROOT, run_cli, run_main
from tests.test_faults import SHARDS, recipe  # noqa: F401 (recipe: the fixture, a two-model task_arithmetic)

pytestmark = pytest.mark.slow  # each test signals a CLI run in a subprocess


def start_slow_run(recipe, out):
    """A run that sleeps 0.3 s after every tensor from the third on (about 12 s in all)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "DISTMERGE_FAULT": "0:3:sleep:0.3"}
    # SIGINT back to its default in the child: a shell without job control starts background
    # jobs (a CI script run with `&`) with SIGINT ignored, and children inherit that, so the
    # run would never see the Ctrl-C this test sends.
    return subprocess.Popen(
        [sys.executable, "-m", "distmerge.cli", "run", str(recipe), str(out), *SHARDS], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


def journal_lines(out) -> int:
    folder = out / ".distmerge" / "journal"
    return sum(len(p.read_text().splitlines()) for p in folder.glob("*.jsonl")) if folder.is_dir() else 0


@pytest.mark.parametrize("sig, code, what", [(signal.SIGTERM, 143, "stopped by SIGTERM"), (signal.SIGINT, 130, "interrupted (Ctrl-C)")])
def test_a_stopped_run_says_what_it_kept_and_the_rerun_resumes(recipe, tmp_path, sig, code, what):
    clean = tmp_path / "clean"
    assert run_main("run", recipe, clean, "--quiet", *SHARDS).returncode == 0  # the reference, in this process
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


def test_the_rerun_says_how_many_tensors_it_kept_and_counts_them(recipe, tmp_path):
    out = tmp_path / "out"
    r = run_cli("run", recipe, out, "--quiet", *SHARDS, env={"DISTMERGE_FAULT": "0:20:kill"})
    assert r.returncode == -9
    journaled = journal_lines(out)
    r = run_cli("run", recipe, out, *SHARDS, "--log-every", "0.05", env={"DISTMERGE_FAULT": "0:1:sleep:0.1"})
    assert r.returncode == 0, r.stderr
    assert f"(resumed): kept {journaled} of 39 tensors from the earlier run, merged {39 - journaled} now;" in r.stdout
    assert f"merging 39 tensors ({journaled} kept from the earlier run: resuming)" in r.stderr
    counts = [int(m) for m in re.findall(r"distmerge: (\d+)/39 tensors", r.stderr)]
    assert counts and min(counts) >= journaled  # the progress lines count the kept tensors as done


def test_a_rerun_of_a_finished_job_says_it_is_already_complete(recipe, tmp_path):
    out = tmp_path / "out"
    assert run_main("run", recipe, out, "--quiet", *SHARDS).returncode == 0  # the finished job, made in this process
    r = run_cli("run", recipe, out, *SHARDS)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{out} is already complete: all 39 tensors were merged by an earlier run; nothing to merge, its files are finished and verified"
    assert "GB/s" not in r.stdout + r.stderr
    assert run_main("verify", out, "--full").returncode == 0
