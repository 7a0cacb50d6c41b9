"""A mergekit-yaml command line typed from habit works: its flags translate or are ignored
with a warning, and the README maps every one of them."""

import filecmp

import pytest
import yaml

from distmerge.cli import parse_size
from distmerge.mergekit_cli import FOREIGN, OPTIONS, markdown_table
from tests.helpers import REPO_ROOT, run_cli

HABITS = ["--lazy-unpickle", "--allow-crimes", "--no-copy-tokenizer", "-j", "4", "-v", "--low-cpu-memory",
          "--write-model-card", "--safe-serialization", "--clone-tensors", "--async-write", "--write-threads", "2",
          "--transformers-cache", "/tmp/x", "--lora-merge-cache", "/tmp/y", "--no-trust-remote-code", "--multi-gpu", "--read-to-gpu"]  # fmt: skip


@pytest.fixture
def recipe(llama_family, tmp_path):
    f = llama_family
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "bfloat16", "models": [{"model": str(f[m]), "parameters": {"weight": 0.5}} for m in ("ft1", "ft2")]}))
    return path


@pytest.mark.slow
def test_mergekit_flags_are_accepted_with_one_warning_each_and_change_nothing(recipe, tmp_path):
    plain, habit = tmp_path / "plain", tmp_path / "habit"
    assert run_cli("run", recipe, plain, "--quiet").returncode == 0
    r = run_cli("run", recipe, habit, "--quiet", "--no-cuda", "--out-shard-size", "5B", "--random-seed", "0", *HABITS)
    assert r.returncode == 0, r.stderr
    warnings = r.stderr.strip().splitlines()
    assert all(line.startswith("warning: ") and line.endswith("; ignored") for line in warnings), r.stderr
    for flag in ("--lazy-unpickle", "--allow-crimes", "--no-copy-tokenizer", "--num-threads", "-v ", "--no-trust-remote-code"):
        assert sum(flag in line for line in warnings) >= 1, flag
    assert "--cuda" not in r.stderr  # translated, not warned about
    assert "pickle" not in r.stderr.replace("--lazy-unpickle", "")  # never suggests --allow-pickle for it
    for name in ("model-00001-of-00001.safetensors", "model.safetensors.index.json", "config.json"):
        assert filecmp.cmp(plain / name, habit / name, shallow=False), name


@pytest.mark.slow
def test_cuda_means_device_cuda(recipe, tmp_path):
    r = run_cli("run", recipe, tmp_path / "out", "--cuda")  # this machine has no GPU
    assert r.returncode == 2 and "--device cuda: no CUDA device is available" in r.stderr, r.stderr
    r = run_cli("run", recipe, tmp_path / "out", "--no-cuda", "--device", "cuda")
    assert r.returncode == 2 and "contradicts --device cuda" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, size", [("5B", 5 * 10**9), ("1b", 10**9), ("500M", 500 * 10**6), ("100K", 100_000), ("123456", 123456), ("5GB", 5 * 10**9), ("2GiB", 2 * 2**30)])
def test_out_shard_size_takes_mergekits_forms(text, size):
    assert parse_size(text) == size


@pytest.mark.needs("mergekit")
def test_readme_maps_every_mergekit_yaml_option():
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    readme = (REPO_ROOT / "README.md").read_text()
    assert markdown_table() in readme, "README's mergekit-yaml table is out of date: paste distmerge.mergekit_cli.markdown_table()"
    theirs = {opt.lstrip("-") for p in mergekit_yaml.params for opt in p.opts if opt.startswith("--") or opt == "-v"}
    ours = {o.flag for o in OPTIONS}
    assert theirs - {"help"} == ours, (sorted(theirs - ours), sorted(ours - theirs))
    assert set(FOREIGN) == ours - {"out-shard-size", "random-seed", "device", "quiet"}
