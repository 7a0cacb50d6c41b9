"""Nothing lost, nothing half-written: output-directory checks, kills, disk full, NaN, verify."""

import errno
import filecmp
import json
import os
import socket
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from distmerge.cli import main
from tests.helpers import run_cli, run_main


@pytest.fixture
def recipe(llama_family, tmp_path) -> Path:
    f = llama_family
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(f["base"]), "dtype": "float32",
        "models": [{"model": str(f["ft1"]), "parameters": {"weight": 0.6}}, {"model": str(f["ft2"]), "parameters": {"weight": 0.4}}],
    }))  # fmt: skip
    return path


SHARDS = ("--out-shard-size", "60KB")


@pytest.fixture
def clean_run(recipe, tmp_path) -> Path:
    out = tmp_path / "clean"
    main(["run", str(recipe), str(out), "--quiet", *SHARDS])
    return out


def same_output(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("model-*.safetensors"))
    assert names and names == sorted(p.name for p in b.glob("model-*.safetensors"))
    for name in names + ["model.safetensors.index.json", "config.json"]:
        assert filecmp.cmp(a / name, b / name, shallow=False), name


def finished_files_are_whole(out: Path, clean: Path) -> None:
    """Every file with a final name is byte-identical to the clean run's."""
    for p in out.glob("model-*.safetensors"):
        assert filecmp.cmp(p, clean / p.name, shallow=False), p.name


# ---------------------------------------------------------------- killed at any point, resumed


@pytest.mark.slow
@pytest.mark.parametrize("where", ["1", "7", "publish", "index"])
def test_killed_run_resumes_to_identical_bytes(recipe, clean_run, tmp_path, where):
    """The killed run is a subprocess; the rerun is the ``distmerge`` command after the first
    kill and ``main`` in this process after the others (the same code, without starting Python
    and torch again), as is the verify (its command is tested in the verify tests below)."""
    out = tmp_path / "out"
    r = run_cli("run", recipe, out, "--quiet", *SHARDS, env={"DISTMERGE_FAULT": f"0:{where}:kill"})
    assert r.returncode == -9, r.stderr
    finished_files_are_whole(out, clean_run)
    assert not (out / "model.safetensors.index.json").exists()
    r = (run_cli if where == "1" else run_main)("run", recipe, out, *SHARDS)
    assert r.returncode == 0, r.stderr
    assert "(resumed)" in r.stdout
    same_output(out, clean_run)
    assert not list(out.glob("*.partial"))
    assert run_main("verify", out, "--full").returncode == 0


@pytest.mark.slow
def test_resume_redoes_only_unjournaled_tensors(recipe, clean_run, tmp_path):
    out = tmp_path / "out"
    r = run_cli("run", recipe, out, "--quiet", *SHARDS, env={"DISTMERGE_FAULT": "0:20:kill"})
    assert r.returncode == -9
    journaled = sum(1 for line in (out / ".distmerge/journal/rank-00000.jsonl").read_text().splitlines())
    assert 0 < journaled <= 20  # journal lines follow fsynced data; the rest is redone
    main(["run", str(recipe), str(out), "--quiet", *SHARDS])
    same_output(out, clean_run)


# ---------------------------------------------------------------- disk full, write errors


def test_disk_full_mid_run_fails_clearly_and_resumes(recipe, clean_run, tmp_path, monkeypatch, capsys):
    import distmerge.io.writer as writer

    real, calls = os.pwrite, {"n": 0}

    def full_disk(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", full_disk)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["run", str(recipe), str(out), "--quiet", *SHARDS])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "rerun the same command to resume" in err
    finished_files_are_whole(out, clean_run)
    assert not (out / "model.safetensors.index.json").exists()
    assert not (out / ".distmerge.lock").exists()  # released: the rerun needs no cleanup
    monkeypatch.setattr(writer.os, "pwrite", real)
    main(["run", str(recipe), str(out), "--quiet", *SHARDS])
    same_output(out, clean_run)


def test_too_little_free_space_is_refused_before_writing(recipe, tmp_path, monkeypatch, capsys):
    import distmerge.output as output

    from types import SimpleNamespace

    monkeypatch.setattr(output.psutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9, free=1000))
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        main(["run", str(recipe), str(out), "--quiet"])
    assert "not enough disk space" in capsys.readouterr().err
    assert not list(out.glob("model-*"))


# ---------------------------------------------------------------- the output directory


def test_non_distmerge_directory_is_refused_then_overwritten_on_request(recipe, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(["run", str(recipe), str(out), "--quiet"])
    assert "not empty and is not a distmerge output" in capsys.readouterr().err
    main(["run", str(recipe), str(out), "--quiet", "--overwrite"])
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes only what distmerge writes
    assert (out / "model.safetensors.index.json").exists()


def test_a_different_recipe_cannot_resume_another_runs_output(recipe, clean_run, tmp_path, capsys):
    other = tmp_path / "other.yml"
    other.write_text(recipe.read_text().replace("0.6", "0.7"))
    with pytest.raises(SystemExit):
        main(["run", str(other), str(clean_run), "--quiet", *SHARDS])
    assert "different recipe or options" in capsys.readouterr().err


def test_output_path_that_cannot_be_created(recipe, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit):
        main(["run", str(recipe), str(tmp_path / "afile" / "out"), "--quiet"])
    assert "cannot create output directory" in capsys.readouterr().err


def test_a_live_run_holds_the_lock(recipe, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".distmerge.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "since": 0}))
    with pytest.raises(SystemExit):
        main(["run", str(recipe), str(out), "--quiet"])
    err = capsys.readouterr().err
    assert f"pid {os.getppid()}" in err and "is writing to" in err


def test_a_dead_runs_lock_is_taken_over(recipe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = max(psutil.pids()) + 10_000
    (out / ".distmerge.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "since": 0}))
    main(["run", str(recipe), str(out), "--quiet"])
    assert (out / "model.safetensors.index.json").exists() and not (out / ".distmerge.lock").exists()


# ---------------------------------------------------------------- non-finite results


def test_nan_or_inf_is_reported_with_the_tensor_name(llama_family, tmp_path, capsys):
    f = llama_family
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "linear", "dtype": "float32", "parameters": {"normalize": False},
        "models": [{"model": str(f["ft1"]), "parameters": {"weight": 3e38}}, {"model": str(f["ft2"]), "parameters": {"weight": 3e38}}],
    }))  # fmt: skip  (finite weights, but 3e38 + 3e38 overflows float32: the norms' weights of 1 become inf)
    with pytest.raises(SystemExit):
        main(["run", str(recipe), str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert "NaN/Inf values (64 found)" in err and "tensor 'model.layers.0.input_layernorm.weight'" in err and "--allow-nonfinite" in err
    main(["run", str(recipe), str(tmp_path / "out"), "--quiet", "--allow-nonfinite"])


# ---------------------------------------------------------------- verify


@pytest.mark.slow
def test_verify_finds_corruption_truncation_and_config_mismatch(clean_run):
    """The first and the failing ``--full`` check through the ``distmerge`` command (exit codes
    and messages as a user sees them); the others in this process (``run_main``: the same
    ``main``, without starting Python and torch again for each)."""
    r = run_cli("verify", clean_run, "--full")
    assert r.returncode == 0 and "OK" in r.stdout
    shard = sorted(clean_run.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(data)
    assert run_main("verify", clean_run).returncode == 0  # sizes and headers still fine
    r = run_cli("verify", clean_run, "--full")
    assert r.returncode == 1 and "does not match its recorded sha256" in r.stderr
    shard.write_bytes(data[:-10])
    r = run_main("verify", clean_run)
    assert r.returncode == 1 and "truncated" in r.stderr
    config = json.loads((clean_run / "config.json").read_text())
    config["num_hidden_layers"] = 5
    (clean_run / "config.json").write_text(json.dumps(config))
    r = run_main("verify", clean_run)
    assert r.returncode == 1 and "num_hidden_layers is 5, the weights have 4 layers" in r.stderr


def test_verify_of_something_that_is_not_an_output(tmp_path):
    r = run_main("verify", tmp_path)
    assert r.returncode == 1 and "model.safetensors.index.json" in r.stderr


# ---------------------------------------------------------------- pickles


class Exploit:
    """Unpickling this runs a shell command, the reason pickles are refused by default."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/distmerge-pwned",))


def _as_pickle(src: Path, dst: Path, payload=None) -> Path:
    import shutil

    import torch

    from tests.helpers import load_state

    dst.mkdir()
    shutil.copy(src / "config.json", dst)
    state = load_state(src)
    if payload is not None:
        state["extra"] = payload
    torch.save(state, dst / "pytorch_model.bin")
    return dst


def test_pickle_checkpoint_needs_allow_pickle_and_then_merges_like_safetensors(llama_family, tmp_path, capsys):
    f = llama_family
    pickled = _as_pickle(f["ft1"], tmp_path / "ft1-bin")

    def recipe(ft1) -> Path:
        path = tmp_path / f"r-{Path(ft1).name}.yml"
        path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(ft1), "parameters": {"weight": 1}}, {"model": str(f["ft2"]), "parameters": {"weight": 1}}]}))
        return path

    with pytest.raises(SystemExit):
        main(["run", str(recipe(pickled)), str(tmp_path / "a"), "--quiet"])
    assert "--allow-pickle" in capsys.readouterr().err
    main(["run", str(recipe(pickled)), str(tmp_path / "a"), "--quiet", "--allow-pickle"])
    main(["run", str(recipe(f["ft1"])), str(tmp_path / "b"), "--quiet"])
    same_output(tmp_path / "a", tmp_path / "b")


def test_allow_pickle_still_never_runs_pickled_code(llama_family, tmp_path, capsys):
    marker = Path("/tmp/distmerge-pwned")
    marker.unlink(missing_ok=True)
    evil = _as_pickle(llama_family["ft1"], tmp_path / "evil", payload=Exploit())
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [str(evil)], "parameters": {"weight": 1}}))
    with pytest.raises(SystemExit):
        main(["plan", str(recipe), "--allow-pickle"])
    assert "weights_only=True" in capsys.readouterr().err
    assert not marker.exists()


def _output_named(name: str):
    """An OutputTensor with only a name: all ``check_finite`` reads of it."""
    from distmerge.plan import OutputTensor

    t = OutputTensor.__new__(OutputTensor)
    object.__setattr__(t, "name", name)
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_finite_check_finds_one_bad_value_anywhere(dtype, bad):
    from distmerge.errors import MergeError
    from distmerge.tensor_merge import check_finite

    t = _output_named("x")
    value = torch.linspace(-3, 3, 10001).to(dtype)
    check_finite(t, value)  # finite: no error
    for where in (0, 5000, 10000):
        broken = value.clone()
        broken[where] = bad
        with pytest.raises(MergeError, match=r"\(1 found\)"):
            check_finite(t, broken)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_values_whose_sum_overflows_pass_the_finite_check(dtype):
    from distmerge.tensor_merge import check_finite

    t = _output_named("x")
    largest = torch.finfo(dtype).max
    check_finite(t, torch.full((4096,), largest, dtype=dtype))  # the sum overflows; every value is finite
    check_finite(t, torch.tensor([largest, largest, -largest], dtype=dtype))
