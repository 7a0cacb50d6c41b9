"""`distmerge slurm`: it checks the recipe as `distmerge plan` does before printing a script,
and the script it prints leaves progress and the run report in the job's log (issue 14)."""

from __future__ import annotations

import os
import random
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO_ROOT, run_cli, run_main

pytestmark = pytest.mark.slow  # each test runs distmerge slurm (and a fake srun) in subprocesses

SLURM_ARGS = ["--nodes", "1", "--gpus-per-node", "1"]


@pytest.fixture
def recipe(llama_family, tmp_path) -> Path:
    path = tmp_path / "linear.yml"
    f = llama_family
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [str(f["ft1"]), str(f["ft2"])], "parameters": {"weight": 1}}))
    return path


def test_a_missing_recipe_is_refused_before_any_script(tmp_path):
    r = run_cli("slurm", tmp_path / "nope.yml", tmp_path / "out", *SLURM_ARGS)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "nope.yml" in r.stderr


def test_an_unknown_method_is_refused_with_the_plans_error(llama_family, tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"merge_method": "frobnicate", "models": [str(llama_family["ft1"]), str(llama_family["ft2"])]}))
    r = run_cli("slurm", bad, tmp_path / "out", *SLURM_ARGS)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == run_main("plan", bad).stderr and "frobnicate" in r.stderr  # `distmerge plan`'s error, in this process


def test_run_options_after_dashdash_are_checked_and_passed_on(recipe, tmp_path):
    r = run_main("slurm", recipe, tmp_path / "out", *SLURM_ARGS, "--", "--io", "nfs")  # in this process; the next through the command
    assert r.returncode == 2 and r.stdout == "" and "'nfs'" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("slurm", recipe, tmp_path / "out", *SLURM_ARGS, "--", "--io", "pread", "--log-every", "60")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("#!/bin/bash\n") and '"$RECIPE" "$OUT" --io pread --log-every 60\n' in r.stdout
    assert r.stderr.startswith(f"checked {recipe}: linear, 39 tensors in 1 files;")


def _free_slurm_port() -> int:
    """A free port that the script's default, 20000 + job id % 20000, can name (below 40000)."""
    for port in random.Random().sample(range(20000, 40000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-39999")


def test_the_scripts_log_gets_progress_lines_and_the_report(recipe, tmp_path):
    """The printed script, run as sbatch would (srun and scontrol stood in for, the real
    torchrun), with its output in files as in a batch job: progress on stderr, report on stdout."""
    out = tmp_path / "merged"
    r = run_cli("slurm", recipe, out, *SLURM_ARGS, "--", "--log-every", "0.01")
    assert r.returncode == 0, r.stderr
    assert "--quiet" not in r.stdout
    script = tmp_path / "job.sbatch"
    script.write_text(r.stdout)

    fake = tmp_path / "fake-bin"
    fake.mkdir()
    (fake / "scontrol").write_text('#!/bin/bash\necho 127.0.0.1\n')
    (fake / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    for f in fake.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(
        PATH=os.pathsep.join([str(fake), str(Path(sys.executable).parent), env["PATH"]]),
        PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1",
        SLURM_JOB_ID=str(_free_slurm_port() - 20000), SLURM_JOB_NODELIST="127.0.0.1",
    )  # fmt: skip
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:  # files, as in a batch job
        done = subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, stdout=so, stderr=se, timeout=240)
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert done.returncode == 0, stderr
    assert re.search(rf"^wrote {re.escape(str(out))}: 1 files, 39 tensors, .* on 1 rank\(s\)", stdout, re.M), stdout
    assert re.search(r"^  \d+\.\d\d GB/s moved; rank 0 time in read", stdout, re.M), stdout
    assert "distmerge: merging 39 tensors, 0.00 GB to read and write, on 1 rank(s); progress every 0.01s\n" in stderr
    assert re.search(r"^distmerge: \d+/39 tensors, ", stderr, re.M), stderr
    assert "Traceback" not in stderr
