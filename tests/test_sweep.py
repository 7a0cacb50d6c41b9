"""Many outputs from one read: ``sweep:`` variants and multi-document recipes (--keep-intermediates).

* Each sweep variant is, byte for byte, the recipe with its values run alone (deterministic
  and randomized methods), and its own distmerge_config.yml reproduces it. (That a kept
  stage or the final output of a multi-document recipe is its document run alone is
  tests/test_stages.py's.)
* Every input tensor is read once for all the outputs of a run (counted at the reader).
* Outputs do not depend on the number of ranks (torchrun, 1-3 ranks); a killed 2-rank sweep
  resumes to the bytes of a clean run, and each variant passes ``distmerge verify``.
* ``distmerge plan`` shows every output and the combined reads; recipe errors are one line.

The torchrun tests run every subprocess in its own session with a timeout and kill it (with
its children) when the timeout passes, so a hang fails a test instead of stalling the suite.
"""

from __future__ import annotations

import collections
import filecmp
import json
import os
import shlex
import signal
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from distmerge.cli import human, parse_size
from distmerge.demo import make_family
from distmerge.graph import assign_units, work_units
from distmerge.io.reader import TensorReader
from distmerge.job import JobOptions, make_graph, make_plan
from tests.helpers import REPO_ROOT, child_env, launcher_free, run_main, safetensors_files

SHARD = "40KB"
"""Small output files: each output has several, and ranks' shares cut through them."""
SEED = 7
"""--random-seed of every run (dare_ties draws with it)."""
LAUNCH_TIMEOUT = 240
"""Seconds a torchrun launch may take before it is killed and the test fails."""
INDEX = "model.safetensors.index.json"


# --------------------------------------------------------------------------- recipes


def ties_sweep(fam: dict[str, Path]) -> dict:
    """Deterministic: TIES over density and weight (a gradient among the weights), 4 variants.
    normalize is off, so that the weight changes the result."""
    return {
        "merge_method": "ties", "base_model": str(fam["base"]),
        "models": [{"model": str(fam["ft1"])}, {"model": str(fam["ft2"])}],
        "parameters": {"normalize": False}, "dtype": "bfloat16",
        "sweep": {"density": [0.3, 0.7], "weight": [1.0, [0.5, 1.5]]},
    }  # fmt: skip


def dare_sweep(fam: dict[str, Path]) -> dict:
    """Randomized: DARE-TIES over density (per-model weights stay), 2 variants."""
    return {
        "merge_method": "dare_ties", "base_model": str(fam["base"]),
        "models": [{"model": str(fam["ft1"]), "parameters": {"weight": 0.6}}, {"model": str(fam["ft2"]), "parameters": {"weight": 0.4}}],
        "parameters": {"normalize": True}, "dtype": "bfloat16",
        "sweep": {"density": [0.4, 0.8]},
    }  # fmt: skip


def arithmetic_sweep(fam: dict[str, Path]) -> dict:
    """Cheap (for counting reads and the plan): task arithmetic over weight and lambda, 4 variants."""
    return {
        "merge_method": "task_arithmetic", "base_model": str(fam["base"]),
        "models": [{"model": str(fam["ft1"])}, {"model": str(fam["ft2"])}], "dtype": "bfloat16",
        "sweep": {"weight": [0.5, 1.0], "lambda": [0.3, 1.0]},
    }  # fmt: skip


def wide_ties_sweep(fam: dict[str, Path]) -> dict:
    """TIES on the wide family, whose MLP matrices merge chunk by chunk: the variants share
    each task vector's top-k statistics (``sparsify.SharedTopK``), 4 variants."""
    return {**ties_sweep(fam), "sweep": {"density": [0.3, 0.7], "weight": [0.5, 1.0]}}


def wide_breadcrumbs_sweep(fam: dict[str, Path]) -> dict:
    """breadcrumbs_ties on the wide family (two cuts per task vector, shared), 4 variants."""
    return {
        "merge_method": "breadcrumbs_ties", "base_model": str(fam["base"]),
        "models": [{"model": str(fam["ft1"]), "parameters": {"weight": 0.6}}, {"model": str(fam["ft2"]), "parameters": {"weight": 0.4}}],
        "dtype": "bfloat16", "sweep": {"density": [0.5, 0.8], "gamma": [0.01, 0.05]},
    }  # fmt: skip


SWEEPS = {
    "ties": ties_sweep, "dare_ties": dare_sweep, "arithmetic": arithmetic_sweep,
    "wide_ties": wide_ties_sweep, "wide_breadcrumbs": wide_breadcrumbs_sweep, "wide_arithmetic": arithmetic_sweep,
}  # fmt: skip
VARIANTS = {
    "ties": {
        "density-0.3_weight-1.0": {"density": 0.3, "weight": 1.0},
        "density-0.3_weight-0.5~1.5": {"density": 0.3, "weight": [0.5, 1.5]},
        "density-0.7_weight-1.0": {"density": 0.7, "weight": 1.0},
        "density-0.7_weight-0.5~1.5": {"density": 0.7, "weight": [0.5, 1.5]},
    },
    "dare_ties": {"density-0.4": {"density": 0.4}, "density-0.8": {"density": 0.8}},
    "arithmetic": {
        "weight-0.5_lambda-0.3": {"weight": 0.5, "lambda": 0.3},
        "weight-0.5_lambda-1.0": {"weight": 0.5, "lambda": 1.0},
        "weight-1.0_lambda-0.3": {"weight": 1.0, "lambda": 0.3},
        "weight-1.0_lambda-1.0": {"weight": 1.0, "lambda": 1.0},
    },
    "wide_ties": {
        "density-0.3_weight-0.5": {"density": 0.3, "weight": 0.5},
        "density-0.3_weight-1.0": {"density": 0.3, "weight": 1.0},
        "density-0.7_weight-0.5": {"density": 0.7, "weight": 0.5},
        "density-0.7_weight-1.0": {"density": 0.7, "weight": 1.0},
    },
    "wide_arithmetic": {
        "weight-0.5_lambda-0.3": {"weight": 0.5, "lambda": 0.3},
        "weight-0.5_lambda-1.0": {"weight": 0.5, "lambda": 1.0},
        "weight-1.0_lambda-0.3": {"weight": 1.0, "lambda": 0.3},
        "weight-1.0_lambda-1.0": {"weight": 1.0, "lambda": 1.0},
    },
    "wide_breadcrumbs": {
        "density-0.5_gamma-0.01": {"density": 0.5, "gamma": 0.01},
        "density-0.5_gamma-0.05": {"density": 0.5, "gamma": 0.05},
        "density-0.8_gamma-0.01": {"density": 0.8, "gamma": 0.01},
        "density-0.8_gamma-0.05": {"density": 0.8, "gamma": 0.05},
    },
}
"""Each sweep's variants in order (the last swept key varies fastest): name -> its values."""


def alone(recipe: dict, values: dict) -> dict:
    """The plain recipe of one variant: no sweep, the swept values among the top-level parameters."""
    plain = {k: v for k, v in recipe.items() if k != "sweep"}
    plain["parameters"] = {**recipe.get("parameters", {}), **values}
    return plain


def multi_doc(fam: dict[str, Path]) -> list[dict]:
    """Three documents: the final dare_ties reads the stages "soup" (linear of ft1 and ft2)
    and "near" (slerp of base and ft1), and ft3. soup and near share ft1; near and the final
    share base."""
    return [
        {"name": "soup", "merge_method": "linear", "models": [{"model": str(fam["ft1"]), "parameters": {"weight": 0.5}}, {"model": str(fam["ft2"]), "parameters": {"weight": 0.5}}], "dtype": "bfloat16"},
        {"name": "near", "merge_method": "slerp", "base_model": str(fam["base"]), "models": [{"model": str(fam["base"])}, {"model": str(fam["ft1"])}], "parameters": {"t": 0.3}, "dtype": "bfloat16"},
        {
            "merge_method": "dare_ties", "base_model": str(fam["base"]),
            "models": [
                {"model": "soup", "parameters": {"weight": 0.5, "density": 0.6}},
                {"model": "near", "parameters": {"weight": 0.3, "density": 0.6}},
                {"model": str(fam["ft3"]), "parameters": {"weight": 0.2, "density": 0.6}},
            ],
            "dtype": "bfloat16",
        },
    ]  # fmt: skip


def write_recipe(path: Path, recipe: dict | list[dict]) -> Path:
    docs = recipe if isinstance(recipe, list) else [recipe]
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def wide_family(tmp_path_factory) -> dict[str, Path]:
    """One layer whose MLP matrices (64 x 4200) are larger than tensor_merge.CHUNK_ELEMENTS:
    merged chunk by chunk, where a unit's merges share statistics."""
    from distmerge.tensor_merge import CHUNK_ELEMENTS

    assert 64 * 4200 > CHUNK_ELEMENTS
    root = tmp_path_factory.mktemp("wide_family")
    return make_family(root, n_finetunes=2, seed=3, dtype=torch.bfloat16, num_layers=1, intermediate=4200, shards={"base": 2})


@pytest.fixture(scope="module")
def recipes(llama_family, wide_family, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sweep_recipes")
    paths = {name: write_recipe(root / f"{name}.yml", make(wide_family if name.startswith("wide") else llama_family)) for name, make in SWEEPS.items()}
    paths["multi"] = write_recipe(root / "multi.yml", multi_doc(llama_family))
    return paths


# --------------------------------------------------------------------------- running


def cli(*args: object):
    """``distmerge ARGS...`` in this process, as one process whatever launcher ran pytest."""
    with mock.patch.dict(os.environ, launcher_free(os.environ), clear=True):
        return run_main(*args)


def merge(recipe: Path, out: Path, *args: object) -> Path:
    r = cli("run", recipe, out, "--quiet", "--out-shard-size", SHARD, "--random-seed", SEED, *args)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def one_process(recipes, tmp_path_factory):
    """name -> OUT of ``distmerge run`` of that recipe in this process (made once per module);
    the multi-document recipe keeps its stages in OUT-keep."""
    root = tmp_path_factory.mktemp("sweep_k1")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            keep = ["--keep-intermediates", root / f"{name}-keep"] if name == "multi" else []
            cache[name] = merge(recipes[name], root / name, *keep)
        return cache[name]

    return get


def shard_names(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("model-*.safetensors"))


def assert_same_bytes(out: Path, ref: Path) -> None:
    """Byte for byte: every output file, the index and config.json; nothing half-written."""
    names = shard_names(ref)
    assert len(names) >= 3, f"{ref} has only {names}: the test needs several files"
    assert shard_names(out) == names, out
    assert not list(out.glob("*.partial")), sorted(p.name for p in out.glob("*.partial"))
    for name in names + [INDEX, "config.json"]:
        assert filecmp.cmp(out / name, ref / name, shallow=False), f"{out / name} differs from {ref / name}"


def outputs_of(out: Path, keep: Path | None = None) -> dict[str, Path]:
    """Every checkpoint directory under OUT (and KEEP): relative name -> path."""
    dirs = {}
    for root, label in ((out, ""), (keep, "keep/")):
        if root is None:
            continue
        for d in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
            if (d / INDEX).exists():
                dirs[label + (d.name if d != root else "")] = d
    return dirs


# --------------------------------------------------------------------------- each output is its recipe run alone


BYTE_CASES = ["dare_ties", "wide_ties", "wide_arithmetic", pytest.param("ties", marks=pytest.mark.slow), pytest.param("wide_breadcrumbs", marks=pytest.mark.slow)]
"""dare_ties (randomized); TIES and breadcrumbs_ties (deterministic) on tensors merged in chunks,
where the variants share top-k statistics; task arithmetic (element-wise) on tensors merged in
chunks, where the variants are merged chunk by chunk together; TIES on small whole tensors. The slow ones
take 15-30 s each (their top-k trims, for the sweep and each variant alone)."""


@pytest.mark.parametrize("name", BYTE_CASES)
def test_each_sweep_variant_is_its_recipe_run_alone(name, recipes, one_process, tmp_path):
    out = one_process(name)
    recipe = yaml.safe_load(recipes[name].read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted(VARIANTS[name])
    for variant, values in VARIANTS[name].items():
        ref = merge(write_recipe(tmp_path / f"{variant}.yml", alone(recipe, values)), tmp_path / variant)
        assert_same_bytes(out / variant, ref)
    # The test means something only if the swept values matter: no two variants are the same.
    tensors = [b"".join((out / v / f).read_bytes() for f in shard_names(out / v)) for v in VARIANTS[name]]
    assert len(set(tensors)) == len(tensors), "two variants wrote the same tensors"


@pytest.mark.parametrize("name", BYTE_CASES)
def test_a_variants_own_recipe_reproduces_it(name, recipes, one_process, tmp_path):
    out = one_process(name)
    recipe = yaml.safe_load(recipes[name].read_text())
    variant = list(VARIANTS[name])[-1]
    own = yaml.safe_load((out / variant / "distmerge_config.yml").read_text())
    assert "sweep" not in own
    assert own["parameters"] == alone(recipe, VARIANTS[name][variant])["parameters"]
    assert {k: v for k, v in own.items() if k != "parameters"} == {k: v for k, v in recipe.items() if k not in ("parameters", "sweep")}
    again = merge(out / variant / "distmerge_config.yml", tmp_path / "again")
    assert_same_bytes(again, out / variant)


# --------------------------------------------------------------------------- inputs are read once


def tensor_ranges(model_dirs: list[Path]) -> dict[tuple[str, int], int]:
    """(real path of the file, first byte) -> bytes, of every tensor of these checkpoints,
    from their safetensors headers."""
    ranges = {}
    for d in model_dirs:
        for f in safetensors_files(d):
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for name, info in header.items():
                if name != "__metadata__":
                    begin, end = info["data_offsets"]
                    ranges[(os.path.realpath(f), 8 + n + begin)] = end - begin
    return ranges


@pytest.fixture
def reads(monkeypatch):
    """Counter of (file, first byte) of every TensorReader.read in this process."""
    counter: collections.Counter = collections.Counter()
    read = TensorReader.read

    def counting(self, path, dtype, shape, begin, end):
        counter[(os.path.realpath(path), begin)] += 1
        return read(self, path, dtype, shape, begin, end)

    monkeypatch.setattr(TensorReader, "read", counting)
    return counter


def test_a_sweep_reads_each_input_tensor_once_for_all_its_variants(recipes, llama_family, reads, tmp_path):
    expected = set(tensor_ranges([llama_family[m] for m in ("base", "ft1", "ft2")]))
    merge(recipes["arithmetic"], tmp_path / "sweep")
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == sorted(VARIANTS["arithmetic"])
    assert set(reads) == expected
    assert set(reads.values()) == {1}, {k: n for k, n in reads.items() if n != 1}

    # The same four outputs as four runs: each input is read four times.
    reads.clear()
    recipe = yaml.safe_load(recipes["arithmetic"].read_text())
    for variant in VARIANTS["arithmetic"]:
        merge(write_recipe(tmp_path / f"{variant}.yml", alone(recipe, VARIANTS["arithmetic"][variant])), tmp_path / variant)
    assert set(reads) == expected
    assert set(reads.values()) == {4}


def test_element_wise_variants_read_each_chunk_of_their_inputs_once_for_all(recipes, wide_family, monkeypatch, tmp_path):
    """The wide MLP matrices merge chunk by chunk; a sweep's task-arithmetic variants are merged
    together, chunk by chunk (``tensor_merge.merge_together``): each chunk of the inputs is read
    (and widened) once for the four variants while it is in cache, not once per variant."""
    from distmerge.tensor_merge import CHUNK_ELEMENTS, DROP_ELEMENTS, TensorInputs

    chunks: collections.Counter = collections.Counter()
    read_range = TensorInputs.read_range

    def counting(self, i, j, how=None):
        chunks[self.t.name, i] += 1
        return read_range(self, i, j, how)

    monkeypatch.setattr(TensorInputs, "read_range", counting)
    merge(recipes["wide_arithmetic"], tmp_path / "sweep")
    assert len(list((tmp_path / "sweep").iterdir())) == 4
    wide = {name for name, n in chunks if name.endswith(("up_proj.weight", "gate_proj.weight", "down_proj.weight"))}
    assert len(wide) == 3 and set(chunks.values()) == {1}, chunks
    assert len(chunks) == 3 * -(-64 * 4200 // CHUNK_ELEMENTS)  # every chunk of each wide matrix

    chunks.clear()  # one variant alone reads each input once too (its loop writes the output in ranges of DROP_ELEMENTS)
    recipe = yaml.safe_load(recipes["wide_arithmetic"].read_text())
    merge(write_recipe(tmp_path / "one.yml", alone(recipe, VARIANTS["wide_arithmetic"]["weight-0.5_lambda-0.3"])), tmp_path / "one")
    assert len(chunks) == 3 * -(-64 * 4200 // DROP_ELEMENTS) and set(chunks.values()) == {1}


def test_a_multi_document_recipe_reads_each_input_tensor_once_for_every_stage_and_output(recipes, llama_family, reads, tmp_path):
    expected = set(tensor_ranges([llama_family[m] for m in ("base", "ft1", "ft2", "ft3")]))
    merge(recipes["multi"], tmp_path / "out", "--keep-intermediates", tmp_path / "keep")
    assert sorted(outputs_of(tmp_path / "out", tmp_path / "keep")) == ["", "keep/near", "keep/soup"]
    assert set(reads) == expected
    assert set(reads.values()) == {1}, {k: n for k, n in reads.items() if n != 1}


# --------------------------------------------------------------------------- plan


def test_plan_lists_each_output_and_reads_the_inputs_once_for_all(recipes, llama_family, tmp_path):
    recipe = yaml.safe_load(recipes["arithmetic"].read_text())
    one = make_plan(str(write_recipe(tmp_path / "one.yml", alone(recipe, VARIANTS["arithmetic"]["weight-0.5_lambda-0.3"]))), JobOptions(out_shard_bytes=parse_size(SHARD)))
    r = cli("plan", recipes["arithmetic"], "--out-shard-size", SHARD)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    at = lines.index("outputs (4):")
    assert lines[at + 1 : at + 5] == [
        f"  {v} -> OUT/{v}: task_arithmetic, {len(one.tensors)} tensors, writes {human(one.write_bytes)}" for v in VARIANTS["arithmetic"]
    ]
    # One read of base, ft1 and ft2 for the four outputs (not four), and four outputs' writes.
    read = sum(tensor_ranges([llama_family[m] for m in ("base", "ft1", "ft2")]).values())
    assert one.read_bytes == read
    assert lines[at + 5].startswith(f"reads {human(read)} once for all outputs; writes {human(4 * one.write_bytes)}; "), lines[at + 5]
    # Then each output's own plan, headed by its name.
    assert [line for line in lines if line.startswith("== ")] == [f"== {v} ==" for v in VARIANTS["arithmetic"]]


# --------------------------------------------------------------------------- errors


def error_cases(fam: dict[str, Path]) -> dict[str, tuple[list[dict], list[str]]]:
    """name -> (documents, what the one line of the error says)."""
    linear = {"merge_method": "linear", "models": [{"model": str(fam["ft1"])}, {"model": str(fam["ft2"])}], "parameters": {"weight": 1.0}, "dtype": "bfloat16"}
    soup, near, final = multi_doc(fam)
    return {
        "not-a-parameter": ([{**linear, "sweep": {"density": [0.3, 0.5]}}], ["sweep", "linear has no parameter 'density'"]),
        "stage-sweeps": ([{**soup, "sweep": {"normalize": [True, False]}}, near, final], ["stage 'soup' has a sweep", "only the final document may sweep"]),
        "model-sets-it": ([{**linear, "models": [{"model": str(fam["ft1"]), "parameters": {"weight": 0.4}}, {"model": str(fam["ft2"])}], "sweep": {"weight": [0.5, 1.0]}}], ["sweep.weight: models[0].parameters sets weight too"]),
    }  # fmt: skip


@pytest.mark.parametrize("case", ["not-a-parameter", "stage-sweeps", "model-sets-it"])
def test_a_bad_sweep_is_one_line_exit_2_and_writes_nothing(case, llama_family, tmp_path):
    docs, says = error_cases(llama_family)[case]
    recipe = write_recipe(tmp_path / "bad.yml", docs)
    r = cli("run", recipe, tmp_path / "out", "--quiet", "--out-shard-size", SHARD, "--keep-intermediates", tmp_path / "keep")
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith(f"error: {recipe}: "), r.stderr
    for words in says:
        assert words in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yml"]


# --------------------------------------------------------------------------- many ranks (torchrun), a kill and a rerun


@dataclass
class Done:
    rc: int
    stdout: str
    stderr: str

    def tail(self) -> str:
        return f"exit {self.rc}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-6000:]}"


def launch(cmd: list[str], logs: Path, env: dict | None = None, timeout: float = LAUNCH_TIMEOUT) -> Done:
    """Run ``cmd`` in its own session, output to files; kill the session (torchrun and its
    workers) when it ends or when ``timeout`` passes (the test then fails)."""
    out_path, err_path = logs.with_suffix(".out"), logs.with_suffix(".err")
    with open(out_path, "w") as out, open(err_path, "w") as err:
        popen = subprocess.Popen(cmd, env=child_env(env), stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=REPO_ROOT, start_new_session=True)
    try:
        rc = popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        try:
            os.killpg(popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        popen.wait(timeout=30)
    done = Done(popen.returncode if rc is None else rc, out_path.read_text(errors="replace"), err_path.read_text(errors="replace"))
    if rc is None:
        pytest.fail(f"{shlex.join(cmd)} did not end within {timeout:.0f}s (killed):\n{done.tail()}")
    return done


def torchrun(k: int, jobs: list[tuple[Path, Path, list]], logs: Path, env: dict | None = None, quiet: bool = True) -> Done:
    """``distmerge run RECIPE OUT --out-shard-size SHARD --random-seed SEED ARGS`` for each
    (RECIPE, OUT, ARGS) of ``jobs``, one after the other on the same K ranks: one torchrun
    launch (tests/torchrun_jobs.py)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={k}", str(REPO_ROOT / "tests" / "torchrun_jobs.py")]
    for i, (recipe, out, args) in enumerate(jobs):
        cmd += [*(["--"] if i else []), str(recipe), str(out), "--out-shard-size", SHARD, "--random-seed", str(SEED), *(["--quiet"] if quiet else []), *map(str, args)]
    return launch(cmd, logs, env)


def every_output(sweep: Path, multi: Path, keep: Path) -> dict[str, Path]:
    """The outputs of the dare_ties sweep and of the multi-document recipe, by name."""
    return {**{f"sweep/{n}": d for n, d in outputs_of(sweep).items()}, **{f"multi/{n}": d for n, d in outputs_of(multi, keep).items()}}


@pytest.fixture(scope="module")
def multi_rank(recipes, tmp_path_factory):
    """K -> every output of the dare_ties sweep and the multi-document recipe (with
    --keep-intermediates) merged on K ranks, both in one torchrun launch per K."""
    root = tmp_path_factory.mktemp("sweep_kn")
    launched: dict[int, tuple[Done, Path]] = {}

    def get(k: int) -> dict[str, Path]:
        if k not in launched:
            out = root / f"k{k}"
            jobs = [(recipes["dare_ties"], out / "sweep", []), (recipes["multi"], out / "multi", ["--keep-intermediates", out / "keep"])]
            launched[k] = (torchrun(k, jobs, root / f"k{k}"), out)
        done, out = launched[k]
        assert done.rc == 0, done.tail()
        return every_output(out / "sweep", out / "multi", out / "keep")

    return get


def test_ranks_share_output_files(recipes):
    """What makes the next test mean something: with 2 and 3 ranks, some file of each output is
    written by two ranks (the ranks' shares of units cut through files)."""
    for name in ("dare_ties", "multi"):
        graph = make_graph(str(recipes[name]), JobOptions(out_shard_bytes=parse_size(SHARD), seed=SEED, keep_intermediates="keep"))
        plans = [t.plan for t in graph.targets]
        units = work_units(plans)
        assert len(plans) == (2 if name == "dare_ties" else 3) and len(units) == len(plans[0].tensors)
        for k in (2, 3):
            rank_of = {(target, i): r for r, share in enumerate(assign_units(units, k)) for u in share for target, i in units[u].members}
            for target, plan in enumerate(plans):
                index = {t.name: i for i, t in enumerate(plan.tensors)}
                shared = [f.name for f in plan.files if len({rank_of[target, index[n]] for n in f.tensors}) > 1]
                assert shared, f"{name}: with {k} ranks no file of output {target} is written by two ranks; make SHARD larger"


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 3])  # the reference is one rank (in this process; one rank under torchrun: test_distributed)
def test_outputs_do_not_depend_on_the_number_of_ranks(k, multi_rank, one_process):
    outs = multi_rank(k)
    multi = one_process("multi")
    ref = every_output(one_process("dare_ties"), multi, multi.parent / "multi-keep")
    assert sorted(outs) == sorted(ref) == sorted([*(f"sweep/{v}" for v in VARIANTS["dare_ties"]), "multi/", "multi/keep/near", "multi/keep/soup"])
    for name, d in outs.items():
        assert_same_bytes(d, ref[name])
        assert sorted(p.name for p in (d / ".distmerge" / "journal").glob("*.jsonl")) == [f"rank-{r:05d}.jsonl" for r in range(k)], name


def journaled(out: Path) -> int:
    """Tensors the journals of OUT's variants hold."""
    from distmerge.state import read_journal

    return sum(len(read_journal(str(d))) for d in out.iterdir() if (d / ".distmerge").is_dir())


@pytest.mark.slow
def test_a_killed_sweep_resumes_to_the_bytes_of_a_clean_run(recipes, one_process, tmp_path):
    ref = one_process("dare_ties")
    out = tmp_path / "out"
    # Rank 1 kills itself (SIGKILL) once its first journal lines are on disk; torchrun ends rank 0.
    r = torchrun(2, [(recipes["dare_ties"], out, [])], tmp_path / "killed", env={"DISTMERGE_FAULT": "1:journaled:kill"})
    assert r.rc != 0, r.tail()
    assert sorted(p.name for p in out.iterdir()) == sorted(VARIANTS["dare_ties"])
    for v in VARIANTS["dare_ties"]:
        assert not (out / v / INDEX).exists(), f"{v} was finished although rank 1 died"
        for name in shard_names(out / v):  # whatever has its final name is whole
            assert filecmp.cmp(out / v / name, ref / v / name, shallow=False), f"{v}/{name} has its final name but is not complete"
    kept = journaled(out)
    total = sum(len(json.loads((ref / v / INDEX).read_text())["weight_map"]) for v in VARIANTS["dare_ties"])
    assert 0 < kept < total, f"{kept} of {total} tensors journaled before the kill: nothing to resume, or nothing left to do\n{r.tail()}"

    # Rank 0 starts late: rank 1 writes meanwhile, which the count of what was kept must not include.
    again = torchrun(2, [(recipes["dare_ties"], out, [])], tmp_path / "rerun", env={"DISTMERGE_FAULT": "0:prepared:sleep:2"}, quiet=False)
    assert again.rc == 0, again.tail()
    assert f"merging {total} tensors ({kept} kept from the earlier run: resuming)" in again.stderr, again.tail()
    for v in VARIANTS["dare_ties"]:
        assert f"wrote {out / v}: " in again.stdout, again.tail()
        assert_same_bytes(out / v, ref / v)
        check = cli("verify", out / v, "--full")
        assert check.returncode == 0 and check.stdout.startswith(f"{out / v}: OK"), check.stdout + check.stderr
