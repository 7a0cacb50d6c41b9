"""Many ranks through the real launchers: torchrun (gloo on CPU) and srun's environment.

* The output bytes do not depend on the number of ranks (K = 1, 2, 3, five methods).
* A rank killed or failing stops the whole job quickly; a rerun, with any number of
  ranks, resumes to the bytes of a clean run.
* The srun code path (ranks from SLURM_* variables, no torchrun) merges, and notices a
  rank that died without a word.
* Launcher detection, Slurm node lists, `distmerge slurm` and the shipped launch scripts.

Every subprocess runs in its own session with a timeout and is killed (with its children)
when the timeout passes, so a hang fails a test instead of stalling the suite.
"""

from __future__ import annotations

import filecmp
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from click.testing import CliRunner
try:  # the test extra
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:
    pytest.skip("hypothesis is not installed (property-based tests); pip install -e '.[test]'", allow_module_level=True)

from distmerge import dist
from distmerge.cli import cli, main, parse_size
from distmerge.errors import MergeError
from distmerge.job import JobOptions, make_plan, run_job
from distmerge.plan import assign_tensors
from distmerge.slurm import sbatch_script
from distmerge.demo import make_family
from tests.helpers import REPO_ROOT, child_env, free_port, launcher_free, load_state

SHARD = "40KB"
"""Small output files: every output has several, and ranks' ranges cut through them."""
LAUNCH_TIMEOUT = 180
"""Seconds any launch may take before it is killed and the test fails."""
INDEX = "model.safetensors.index.json"


# --------------------------------------------------------------------------- processes


@dataclass
class Done:
    rc: int
    stdout: str
    stderr: str
    seconds: float
    ended: float
    """time.time() when it ended."""

    def tail(self) -> str:
        return f"exit {self.rc} after {self.seconds:.1f}s\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-6000:]}"


class Proc:
    """A subprocess in its own session, output to files (no pipe can fill up and block it)."""

    def __init__(self, cmd: list[str], env: dict[str, str], logs: Path):
        logs.parent.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = logs.with_suffix(".out"), logs.with_suffix(".err")
        self.cmd = cmd
        self.start = time.monotonic()
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.popen = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=REPO_ROOT, start_new_session=True)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal this process only (not its session)."""
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def kill_all(self) -> None:
        """SIGKILL this process's whole session (it and every child it started)."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float = LAUNCH_TIMEOUT) -> Done:
        try:
            rc = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            self.popen.wait(timeout=30)
            done = self._done(-1)
            pytest.fail(f"{shlex.join(self.cmd)} did not end within {timeout:.0f}s (killed):\n{done.tail()}")
        # torchrun's workers are in the same session: make sure none is left behind.
        self.kill_all()
        return self._done(rc)

    def _done(self, rc: int) -> Done:
        out, err = self.out_path.read_text(errors="replace"), self.err_path.read_text(errors="replace")
        return Done(rc, out, err, time.monotonic() - self.start, time.time())


def torchrun(k: int, recipe: Path, out: Path, *args: str, env: dict | None = None, quiet: bool = True, wrapper: bool = False) -> Done:
    """``python -m torch.distributed.run --standalone --nproc-per-node K -m distmerge.cli run``
    (or the same through launch/torchrun.sh with ``wrapper``)."""
    run_args = [str(recipe), str(out), "--out-shard-size", SHARD, *(["--quiet"] if quiet else []), *args]
    if wrapper:
        cmd = ["bash", str(REPO_ROOT / "launch" / "torchrun.sh"), str(k), *run_args]
        env = {"PYTHON": sys.executable, **(env or {})}
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={k}", "-m", "distmerge.cli", "run", *run_args]
    return Proc(cmd, child_env(env), out.parent / f"{out.name}-torchrun{k}").wait()


def torchrun_jobs(k: int, jobs: list[tuple[Path, Path, list[str]]], logs: Path) -> Done:
    """``distmerge run RECIPE OUT --out-shard-size SHARD --quiet ARGS`` for each (RECIPE, OUT,
    ARGS) of ``jobs``, one after the other on the same K ranks: one torchrun launch
    (tests/torchrun_jobs.py), whose start-up (torch imported by the agent and K workers, the
    process group) costs more than the merges of these tiny models."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={k}", str(REPO_ROOT / "tests" / "torchrun_jobs.py")]
    for i, (recipe, out, args) in enumerate(jobs):
        cmd += [*(["--"] if i else []), str(recipe), str(out), "--out-shard-size", SHARD, "--quiet", *args]
    return Proc(cmd, child_env(), logs).wait(timeout=LAUNCH_TIMEOUT * 2)


def in_process(recipe: Path, out: Path, *args: str) -> Path:
    """``distmerge run`` as one process, in this one, whatever launcher ran pytest."""
    with mock.patch.dict(os.environ, launcher_free(os.environ), clear=True):
        main(["run", str(recipe), str(out), "--quiet", "--out-shard-size", SHARD, *args])
    return out


def merge_in_process(recipe: Path, out: Path, seed: int = 0):
    with mock.patch.dict(os.environ, launcher_free(os.environ), clear=True):
        return run_job(str(recipe), str(out), JobOptions(out_shard_bytes=parse_size(SHARD), seed=seed, device="cpu", quiet=True))


# --------------------------------------------------------------------------- outputs


def shard_names(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("model-*.safetensors"))


def assert_same_output(out: Path, ref: Path) -> None:
    """Byte for byte: every output file, the index and the config; nothing left half-written."""
    names = shard_names(ref)
    assert len(names) >= 3, f"the reference has only {names}: the test needs several files"
    assert shard_names(out) == names
    assert not list(out.glob("*.partial")), sorted(p.name for p in out.glob("*.partial"))
    for name in names + [INDEX, "config.json"]:
        assert filecmp.cmp(out / name, ref / name, shallow=False), f"{name} differs from the one-process run"


def assert_no_incomplete_final_file(out: Path, ref: Path) -> None:
    """After a failed run: whatever has a final name is whole (equal to the clean run's)."""
    for name in shard_names(out):
        assert filecmp.cmp(out / name, ref / name, shallow=False), f"{name} has its final name but is not complete"


def journal_lines(out: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in (out / ".distmerge" / "journal").glob("*.jsonl"))


# --------------------------------------------------------------------------- recipes


RECIPES = ("linear", "ties", "dare_ties", "slerp", "passthrough")
SEED = {"dare_ties": 7}


def recipe_dicts(fam: dict[str, Path], deep: dict[str, Path]) -> dict[str, dict]:
    def m(name, **params):
        return {"model": str(fam[name]), **({"parameters": params} if params else {})}

    ties_models = [m("ft1", weight=0.6, density=0.5), m("ft2", weight=0.4, density=0.5)]
    return {
        "linear": {"merge_method": "linear", "models": [m("base", weight=0.5), m("ft1", weight=0.3), m("ft2", weight=[0.1, 0.4])], "dtype": "bfloat16"},
        "ties": {"merge_method": "ties", "base_model": str(fam["base"]), "models": ties_models, "parameters": {"normalize": True}, "dtype": "bfloat16"},
        "dare_ties": {"merge_method": "dare_ties", "base_model": str(fam["base"]), "models": ties_models, "parameters": {"normalize": True}, "dtype": "bfloat16"},
        "slerp": {
            "merge_method": "slerp", "base_model": str(fam["base"]),
            "slices": [{"sources": [{"model": str(fam["base"]), "layer_range": [0, 4]}, {"model": str(fam["ft3"]), "layer_range": [0, 4]}]}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}]}, "dtype": "bfloat16",
        },
        "passthrough": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(deep["ft1"]), "layer_range": [0, 5]}]},
                {"sources": [{"model": str(deep["ft2"]), "layer_range": [3, 8]}]},
                {"sources": [{"model": str(deep["ft1"]), "layer_range": [6, 8]}]},
            ],
            "dtype": "bfloat16",
        },
    }  # fmt: skip


@pytest.fixture(scope="module")
def recipes(llama_family, llama_deep, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist_recipes")
    paths = {}
    for name, d in recipe_dicts(llama_family, llama_deep).items():
        paths[name] = root / f"{name}.yml"
        paths[name].write_text(yaml.safe_dump(d, sort_keys=False))
    return paths


def seed_args(name: str, seed: int | None = None) -> list[str]:
    seed = SEED.get(name) if seed is None else seed
    return ["--random-seed", str(seed)] if seed is not None else []


@pytest.fixture(scope="module")
def one_process(recipes, tmp_path_factory):
    """name -> the output of a one-process run (made once per module, in this process)."""
    root = tmp_path_factory.mktemp("dist_k1")
    cache: dict[tuple[str, int | None], Path] = {}

    def get(name: str, seed: int | None = None) -> Path:
        key = (name, seed)
        if key not in cache:
            cache[key] = in_process(recipes[name], root / f"{name}-{seed}", *seed_args(name, seed))
        return cache[key]

    return get


# --------------------------------------------------------------------------- 1. world-size independence


WRAPPED = ("passthrough", 3)
"""(recipe, K) merged through the launch/torchrun.sh wrapper, in a launch of its own."""


@pytest.fixture(scope="module")
def multi_rank(recipes, tmp_path_factory):
    """K -> {recipe name: output of the K-rank run}: every recipe (but WRAPPED's) merged on K
    ranks in one torchrun launch (``torchrun_jobs``), made once per module and K."""
    root = tmp_path_factory.mktemp("dist_kn")
    launched: dict[int, tuple[Done, dict[str, Path]]] = {}

    def get(k: int) -> dict[str, Path]:
        if k not in launched:
            names = [n for n in RECIPES if (n, k) != WRAPPED]
            outs = {n: root / f"{n}-k{k}" for n in names}
            launched[k] = (torchrun_jobs(k, [(recipes[n], outs[n], seed_args(n)) for n in names], root / f"k{k}"), outs)
        done, outs = launched[k]
        assert done.rc == 0, done.tail()
        return outs

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_output_bytes_do_not_depend_on_the_number_of_ranks(name, recipes, one_process, multi_rank, tmp_path):
    ref = one_process(name)
    plan = make_plan(str(recipes[name]), JobOptions(out_shard_bytes=parse_size(SHARD), seed=SEED.get(name, 0)))
    assert len(plan.files) >= 3
    # The test means something only if ranks really share files: some rank's range starts
    # in the middle of a file.
    starts = {sum(len(f.tensors) for f in plan.files[:i]) for i in range(len(plan.files))}
    cuts = {share[0] for k in (2, 3) for share in assign_tensors(plan, k)[1:]}
    assert cuts - starts, f"{name}: every rank boundary falls on a file boundary; make SHARD larger"

    for k in (2, 3):
        if (name, k) == WRAPPED:  # through the launch/torchrun.sh wrapper, the CLI as users run it
            out = tmp_path / f"k{k}"
            r = torchrun(k, recipes[name], out, *seed_args(name), wrapper=True)
            assert r.rc == 0, r.tail()
        else:  # with the other recipes, in one torchrun launch per K
            out = multi_rank(k)[name]
        assert_same_output(out, ref)
        assert sorted(p.name for p in (out / ".distmerge" / "journal").glob("*.jsonl")) == [f"rank-{r:05d}.jsonl" for r in range(k)]


THREAD_RECIPES = ("model_stock", "dare_ties", "slerp", "della", "sce")
"""Methods with whole-tensor reductions (cosines, L1 norms, norms, energies), whose float bits
torch splits by its intra-op thread count once a tensor has more than 32768 elements (della
and sce also run steps on every thread: a row sort, element-wise work)."""


@pytest.fixture(scope="module")
def wide_family(tmp_path_factory) -> dict[str, Path]:
    """bf16 models whose tensors torch reduces on several threads when it has them: MLP
    matrices of 327680 elements (merged in chunks) and embeddings of 131072 (merged whole)."""
    root = tmp_path_factory.mktemp("wide_family")
    return make_family(root, n_finetunes=2, seed=3, num_layers=1, hidden=256, intermediate=1280, vocab=512)


@pytest.mark.slow
@pytest.mark.parametrize("name", THREAD_RECIPES)
def test_output_bytes_do_not_depend_on_the_thread_count(name, wide_family, tmp_path):
    """One rank alone uses every core, torchrun's ranks one each (OMP_NUM_THREADS=1), Slurm
    jobs what --cpus-per-task gives: each rank merges on one intra-op thread (but for steps whose
    bits cannot depend on it), so the bytes are the same whatever the thread count (model_stock,
    dare_ties and slerp differed with 2 threads before)."""
    base, ft1, ft2 = (str(wide_family[k]) for k in ("base", "ft1", "ft2"))
    recipe = {"merge_method": name, "base_model": base, "models": [{"model": ft1}, {"model": ft2}], "dtype": "bfloat16"}
    if name == "slerp":
        recipe = {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": ft1}], "parameters": {"t": 0.4}, "dtype": "bfloat16"}
    elif name in ("dare_ties", "della"):
        recipe["parameters"] = {"density": 0.5, "weight": 0.5, **({"epsilon": 0.1} if name == "della" else {})}
    elif name == "sce":
        recipe["parameters"] = {"select_topk": 0.5}
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    outs = {}
    for threads in (1, 2):
        outs[threads] = tmp_path / f"threads-{threads}"
        cmd = [sys.executable, "-m", "distmerge.cli", "run", str(path), str(outs[threads]), "--quiet", "--device", "cpu"]
        r = Proc(cmd, child_env({"OMP_NUM_THREADS": threads}), tmp_path / f"log-{threads}").wait()
        assert r.rc == 0, r.tail()
    (file,) = outs[1].glob("model*.safetensors")
    assert filecmp.cmp(file, outs[2] / file.name, shallow=False), f"{name}: 1 and 2 threads wrote different bytes"


@pytest.mark.slow
def test_dare_ties_randomness_is_applied_and_follows_the_seed(one_process):
    ties, dare = load_state(one_process("ties")), load_state(one_process("dare_ties"))
    other_seed = load_state(one_process("dare_ties", seed=8))
    layer_tensors = [n for n in ties if ".layers." in n and n.endswith("proj.weight")]
    assert layer_tensors
    # DARE drops at random and rescales; TIES keeps the largest changes: not the same tensors.
    assert all(not torch.equal(ties[n], dare[n]) for n in layer_tensors)
    # Another seed drops other elements.
    assert all(not torch.equal(dare[n], other_seed[n]) for n in layer_tensors)
    # (The same seed gives the same bytes, with any number of ranks: see the test above.)


# --------------------------------------------------------------------------- 2. a rank killed, then a rerun


@pytest.mark.slow
@pytest.mark.parametrize("k, rerun_k", [(2, 2), (3, 1)], ids=["k2-rerun-k2", "k3-rerun-k1"])
def test_killed_rank_stops_the_job_and_a_rerun_resumes_to_identical_bytes(k, rerun_k, recipes, one_process, tmp_path):
    ref = one_process("linear")
    out = tmp_path / "out"
    # Rank 1 kills itself (SIGKILL) as soon as its first journal lines are on disk: whatever
    # the other ranks managed meanwhile, the rerun has something to resume.
    r = torchrun(k, recipes["linear"], out, env={"DISTMERGE_FAULT": "1:journaled:kill"})
    assert r.rc != 0, r.tail()
    # From the last byte written (about when rank 1 died) to the end of the job: torchrun
    # notices the dead worker and ends the others (SIGTERM, SIGKILL 30 s later at worst).
    last_write = max(p.stat().st_mtime for p in out.rglob("*") if p.is_file())
    assert r.ended - last_write < 30, f"the job took {r.ended - last_write:.0f}s to end after a rank was killed\n{r.tail()}"
    assert r.seconds < 120, r.tail()
    assert_no_incomplete_final_file(out, ref)
    assert not (out / INDEX).exists()
    assert journal_lines(out) > 0, f"nothing was journaled before the kill: nothing to resume\n{r.tail()}"

    if rerun_k == 1:
        result = merge_in_process(recipes["linear"], out)
        assert result.resumed
        total = len(result.plan.tensors)
        assert len(result.written) < total, "the rerun redid every tensor instead of resuming"
    else:
        again = torchrun(rerun_k, recipes["linear"], out, quiet=False)  # the same command, with its summary line
        assert again.rc == 0, again.tail()
        assert "(resumed)" in again.stdout, again.tail()
    assert_same_output(out, ref)


# --------------------------------------------------------------------------- 3. a rank fails


@pytest.mark.slow
def test_failing_rank_stops_every_rank_quickly_and_is_named(recipes, tmp_path):
    out = tmp_path / "out"
    r = torchrun(2, recipes["linear"], out, env={"DISTMERGE_FAULT": "1:2:raise"})
    assert r.rc != 0, r.tail()
    assert r.seconds < 60, f"a failing rank took {r.seconds:.0f}s to stop the job\n{r.tail()}"
    # Rank 0 says who failed and why ("error: stopping: rank 1: RuntimeError: injected fault
    # at 2"), unless torchrun's teardown beats it to it; rank 1's own traceback carries its
    # rank either way ("[rank1]: RuntimeError: injected fault at 2").
    assert re.search(r"rank 1: .*injected fault", r.stderr) or re.search(r"\[rank1\]: .*injected fault", r.stderr), r.tail()
    assert not (out / INDEX).exists()


# --------------------------------------------------------------------------- 4. srun without torchrun


def srun_ranks(recipe: Path, out: Path, n: int, *args: str, fault: dict[int, str] | None = None) -> list[Proc]:
    """``n`` ranks started as srun starts them (one task per GPU, no torchrun): distmerge
    reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and meets on MASTER_ADDR:MASTER_PORT."""
    port = free_port()
    procs = []
    for rank in range(n):
        env = {
            "SLURM_PROCID": rank, "SLURM_NTASKS": n, "SLURM_STEP_NUM_TASKS": n, "SLURM_LOCALID": rank, "SLURM_NODEID": 0,
            "SLURM_STEP_TASKS_PER_NODE": n,
            "SLURM_JOB_ID": 4242, "SLURM_JOB_NODELIST": "localhost", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
        }  # fmt: skip
        if fault and rank in fault:
            env["DISTMERGE_FAULT"] = f"{rank}:{fault[rank]}"
        cmd = [sys.executable, "-m", "distmerge.cli", "run", str(recipe), str(out), "--quiet", "--out-shard-size", SHARD, *args]
        procs.append(Proc(cmd, child_env(env), out.parent / f"{out.name}-srun-rank{rank}"))
    return procs


@pytest.mark.slow
def test_srun_style_ranks_merge_like_one_process(recipes, one_process, tmp_path):
    out = tmp_path / "out"
    procs = srun_ranks(recipes["linear"], out, 2, "--timeout", "60")
    try:
        done = [p.wait() for p in procs]
    finally:
        for p in procs:
            p.kill_all()
    for rank, d in enumerate(done):
        assert d.rc == 0, f"rank {rank}: {d.tail()}"
    assert_same_output(out, one_process("linear"))


@pytest.mark.slow
def test_srun_style_rank_killed_midway_ends_rank_0_quickly(recipes, one_process, tmp_path):
    out = tmp_path / "out"
    # Both ranks sleep 0.3 s per tensor, so the test can kill rank 1 in the middle of its share.
    procs = srun_ranks(recipes["linear"], out, 2, "--timeout", "10", fault={0: "1:sleep:0.3", 1: "1:sleep:0.3"})
    try:
        journal = out / ".distmerge" / "journal" / "rank-00001.jsonl"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and procs[1].popen.poll() is None:
            if journal.exists() and journal.stat().st_size > 0:  # rank 1 has written a file's tensors
                break
            time.sleep(0.1)
        assert procs[1].popen.poll() is None, f"rank 1 ended before it could be killed: {procs[1].wait().tail()}"
        procs[1].kill(signal.SIGKILL)
        killed = time.monotonic()
        rank0 = procs[0].wait(timeout=90)
        after = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill_all()
    assert rank0.rc != 0, rank0.tail()
    # The silent-rank detection allows 10 s (--timeout); gloo may notice the dead peer sooner.
    assert after < 45, f"rank 0 took {after:.0f}s to stop after rank 1 was killed\n{rank0.tail()}"
    assert "rank 1" in rank0.stderr or "Error" in rank0.stderr, rank0.tail()
    assert_no_incomplete_final_file(out, one_process("linear"))
    assert not (out / INDEX).exists()


# --------------------------------------------------------------------------- 5. launcher detection


def where(e: dist.Env) -> tuple:
    return (e.rank, e.world_size, e.local_rank, e.launcher, e.master_addr, e.master_port)


def test_detect_torchrun():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    e = dist.detect(env)
    assert where(e) == (3, 8, 3, "torchrun", "node1", 29500)
    assert e.local_world_size == 4


def test_detect_deepspeed_launcher_is_read_like_torchrun():
    # deepspeed's launcher exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT too
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "CROSS_RANK": "0", "CROSS_SIZE": "1"}
    assert where(dist.detect(env)) == (1, 2, 1, "torchrun", "10.0.0.1", 29500)


def test_detect_torchrun_inside_srun_uses_torchruns_ranks():
    env = {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu01", "MASTER_PORT": "29400",
           "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "gpu[01-02]"}  # fmt: skip
    assert where(dist.detect(env)) == (9, 16, 1, "torchrun", "gpu01", 29400)


def test_detect_slurm():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-09,12],cpu1",
           "SLURM_JOB_ID": "123456", "SLURM_TASKS_PER_NODE": "4(x4)", "SLURM_NODEID": "1"}  # fmt: skip
    e = dist.detect(env)
    assert where(e) == (5, 16, 1, "slurm", "gpu07", 20000 + 123456 % 20000)
    assert e.local_world_size == 4


def test_detect_slurm_with_uneven_tasks_per_node():
    env = {"SLURM_PROCID": "4", "SLURM_NTASKS": "5", "SLURM_STEP_NUM_TASKS": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "3,2"}  # fmt: skip
    e = dist.detect(env)
    assert where(e)[:4] == (4, 5, 1, "slurm")
    assert e.local_world_size == 2  # node 1 runs 2 of the 5 tasks
    assert [dist.tasks_on_node("2(x3),1", node) for node in range(4)] == [2, 2, 2, 1]


def test_the_batch_scripts_own_shell_is_not_a_rank():
    """sbatch's shell has SLURM_PROCID=0 and SLURM_NTASKS=N too, but it is no srun step:
    taking it for rank 0 of N would wait for ranks that never start."""
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "node[1-4]", "SLURM_JOB_ID": "7"}
    assert dist.detect(env).world_size == 1
    assert dist.detect({**env, "SLURM_STEP_ID": "0"}).world_size == 4


def test_detect_slurm_prefers_the_step_nodelist_and_explicit_master():
    env = {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_JOB_NODELIST": "node[1-8]", "SLURM_STEP_NODELIST": "node[5-6]", "SLURM_JOB_ID": "7"}
    e = dist.detect(env)
    assert (e.master_addr, e.master_port, e.local_rank) == ("node5", 20007, 0)
    e = dist.detect({**env, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "31000"})
    assert (e.master_addr, e.master_port) == ("10.1.2.3", 31000)


def test_detect_single_process():
    assert where(dist.detect({})) == (0, 1, 0, "none", None, None)
    # `srun -n1` or a one-task job: one process, not a Slurm job of one rank.
    assert where(dist.detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "node1"})) == (0, 1, 0, "none", None, None)
    assert dist.detect({"RANK": "0"}).world_size == 1  # no WORLD_SIZE: not a launcher


def test_detect_slurm_without_any_address_says_what_to_set():
    with pytest.raises(MergeError, match="MASTER_ADDR"):
        dist.detect({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"})


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("gpu[07-09,12],cpu1", "gpu07"),
        ("node1", "node1"),
        ("node1,node2", "node1"),
        ("node[001-128]", "node001"),
        ("node[3,5-7]-ib", "node3-ib"),
        ("cpu1,gpu[07-09]", "cpu1"),
        ("  node7 ", "node7"),
        ("a-b.c[10-11]", "a-b.c10"),
    ],
)
def test_first_host(nodelist, first):
    assert dist.first_host(nodelist) == first


def test_first_host_of_an_empty_list():
    with pytest.raises(MergeError, match="MASTER_ADDR"):
        dist.first_host("")


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(
    prefix=st.from_regex(r"[a-z][a-z0-9-]{0,8}[a-z]", fullmatch=True),
    ranges=st.lists(st.tuples(st.integers(0, 999), st.integers(0, 50)), min_size=1, max_size=4),
    width=st.integers(1, 4),
    rest=st.lists(st.from_regex(r"[a-z]{1,5}[0-9]{0,3}", fullmatch=True), max_size=3),
)
def test_first_host_of_generated_lists(prefix, ranges, width, rest):
    parts = [f"{a:0{width}d}" + (f"-{a + n:0{width}d}" if n else "") for a, n in ranges]
    nodelist = ",".join([f"{prefix}[{','.join(parts)}]", *rest])
    assert dist.first_host(nodelist) == f"{prefix}{ranges[0][0]:0{width}d}"


# --------------------------------------------------------------------------- 7. Slurm scripts


def bash_n(path: Path) -> None:
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"{path}: {r.stderr}"


def test_distmerge_slurm_prints_a_filled_in_script(llama_family, tmp_path):
    recipe = tmp_path / "my recipes" / "ties.yml"  # a space: the paths must be quoted
    recipe.parent.mkdir()  # `distmerge slurm` plans the recipe first: it must exist and be valid
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [str(llama_family["ft1"]), str(llama_family["ft2"])], "parameters": {"weight": 1}}))
    out = tmp_path / "merged out"
    args = ["slurm", str(recipe), str(out), "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu-long",
            "--account", "proj42", "--time", "02:30:00", "--out-shard-size", "2GB"]  # fmt: skip
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    text = r.stdout  # the script; the plan's summary goes to stderr
    lines = text.splitlines()
    for want in ["--nodes=4", "--gpus-per-node=8", "--ntasks-per-node=1", "--partition=gpu-long", "--account=proj42", "--time=02:30:00"]:
        assert f"#SBATCH {want}" in lines, want
    assert f"RECIPE={shlex.quote(str(recipe))}" in lines
    assert f"OUT={shlex.quote(str(out))}" in lines
    assert "--nproc-per-node=8" in text and "--nnodes=4" in text and "--rdzv-backend=c10d" in text
    assert "--kill-on-bad-exit=1" in text and 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in text
    assert "--out-shard-size 2GB" in text
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    bash_n(script)
    # Run it with stand-ins for scontrol and srun: the command it would launch, word by word.
    argv = fake_slurm_run(tmp_path, script, {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_NNODES": "4"})
    assert argv[:4] == ["--kill-on-bad-exit=1", "--ntasks-per-node=1", "--nodes=4", "torchrun"]
    assert "--rdzv-endpoint=gpu07:23456" in argv and "--rdzv-id=123456" in argv
    run = argv[argv.index("distmerge.cli") + 1:]
    assert run[:3] == ["run", str(recipe), str(out)] and run[-2:] == ["--out-shard-size", "2GB"]


def test_distmerge_slurm_refuses_bad_values():
    runner = CliRunner()
    assert runner.invoke(cli, ["slurm", "r.yml", "out", "--gpus-per-node", "8"]).exit_code != 0  # --nodes is required
    assert runner.invoke(cli, ["slurm", "r.yml", "out", "--nodes", "0", "--gpus-per-node", "8"]).exit_code != 0
    r = runner.invoke(cli, ["slurm", "r.yml", "out", "--nodes", "1", "--gpus-per-node", "8", "--out-shard-size", "5XB"])
    assert r.exit_code != 0 and "5XB" in r.output
    with pytest.raises(ValueError):
        sbatch_script("r.yml", "out", nodes=1, gpus_per_node=8, partition="gpu\n#SBATCH --exclusive")


def test_sbatch_script_defaults():
    text = sbatch_script("/r.yml", "/out", nodes=1, gpus_per_node=2)
    assert "#SBATCH --cpus-per-task=8" in text and "export OMP_NUM_THREADS=4" in text
    assert "--partition" not in text and "--account" not in text and "--random-seed" not in text
    assert "--random-seed 5" in sbatch_script("/r.yml", "/out", nodes=1, gpus_per_node=1, random_seed=5)


def fake_slurm_run(tmp_path: Path, script: Path, slurm_env: dict[str, str]) -> list[str]:
    """Run an sbatch script with stand-ins for scontrol and srun; returns srun's arguments."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "srun-args"
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\n[ "$1 $2" = "show hostnames" ] || exit 1\n'
        'case "$3" in gpu\\[07-10\\]) printf "gpu07\\ngpu08\\ngpu09\\ngpu10\\n";; *) echo "$3";; esac\n'
    )
    (bin_dir / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {shlex.quote(str(log))}\n')
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    env = {**launcher_free(os.environ), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(tmp_path), **slurm_env}
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return log.read_text().splitlines()


@pytest.mark.parametrize("name", ["single-node-8gpu.sbatch", "multi-node.sbatch"])
def test_shipped_sbatch_scripts(name, tmp_path):
    path = REPO_ROOT / "slurm" / name
    bash_n(path)
    text = path.read_text()
    assert re.search(r"^#SBATCH --nodes=\d+", text, re.M) and re.search(r"^#SBATCH --gpus-per-node=8", text, re.M)
    assert "srun --kill-on-bad-exit=1" in text
    assert "SLURM_PROCID" in text  # the srun-without-torchrun variant is documented
    env = {"SLURM_JOB_ID": "20001", "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_NNODES": "4", "SLURM_CPUS_PER_TASK": "32"}
    argv = fake_slurm_run(tmp_path, path, env)
    assert "torchrun" in argv and "--nproc-per-node=8" in argv
    run = argv[argv.index("distmerge.cli") + 1:]
    assert run[0] == "run" and run[1].endswith(".yml") and run[2] == str(tmp_path / "merged")
    if name == "multi-node.sbatch":
        assert "--nnodes=4" in argv and "--rdzv-backend=c10d" in argv and "--rdzv-endpoint=gpu07:20001" in argv
    else:
        assert "--standalone" in argv


def test_launch_torchrun_wrapper_checks_its_arguments():
    path = REPO_ROOT / "launch" / "torchrun.sh"
    bash_n(path)
    r = subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr
    r = subprocess.run(["bash", str(path), "two", "r.yml", "out"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "NPROC" in r.stderr
