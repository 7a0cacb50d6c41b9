"""The output directory's state: inputs changed under a resume, --overwrite's deletions,
verify against the manifest, and kills during setup."""

import json
import os
import random
import shutil
import socket
from pathlib import Path

import psutil
import pytest
import yaml

from distmerge.cli import main
from tests.helpers import run_cli
from tests.test_faults import SHARDS, same_output


def write_recipe(path: Path, models: dict[str, Path], weight: float = 0.6) -> Path:
    path.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(models["base"]), "dtype": "float32",
        "models": [{"model": str(models["ft1"]), "parameters": {"weight": weight}}, {"model": str(models["ft2"]), "parameters": {"weight": 0.4}}],
    }))  # fmt: skip
    return path


@pytest.fixture
def models(llama_family, tmp_path) -> dict[str, Path]:
    """Copies of the session's models, which these tests change."""
    return {k: Path(shutil.copytree(llama_family[k], tmp_path / "models" / k)) for k in ("base", "ft1", "ft2")}


@pytest.fixture
def recipe(models, tmp_path) -> Path:
    return write_recipe(tmp_path / "r.yml", models)


def merge(recipe: Path, out: Path, *extra: str) -> None:
    main(["run", str(recipe), str(out), "--quiet", *SHARDS, *extra])


def interrupted(recipe: Path, out: Path, monkeypatch, hash_inputs: bool = False) -> None:
    """A run that stops after 7 tensors, leaving a resumable directory."""
    from distmerge.job import JobOptions, run_job

    monkeypatch.setenv("DISTMERGE_FAULT", "0:7:raise")
    with pytest.raises(RuntimeError, match="injected fault"):
        run_job(str(recipe), str(out), JobOptions(out_shard_bytes=60_000, quiet=True, hash_inputs=hash_inputs))
    monkeypatch.delenv("DISTMERGE_FAULT")


def refused(recipe: Path, out: Path, capsys, *extra: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        merge(recipe, out, *extra)
    assert e.value.code == 2
    return capsys.readouterr().err


def keep_mtime(path: Path, change) -> None:
    st = path.stat()
    change(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(data)


# ---------------------------------------------------------------- inputs changed under a resume


def _append(p: Path) -> None:
    p.write_bytes(p.read_bytes() + b"\0" * 8)  # the plan still fits: only the identity changes


def _flip_data(p: Path) -> None:
    flip(p, p.stat().st_size - 3)


def _edit_header(p: Path) -> None:
    p.write_bytes(p.read_bytes().replace(b'"format":"pt"', b'"format":"tf"', 1))


CHANGES = {  # what changes -> (model, file, how, what the refusal says)
    "size": ("ft1", "model.safetensors", _append, "(size "),
    "mtime": ("ft1", "model.safetensors", _flip_data, "(modified "),
    "header": ("ft2", "model-00002-of-00003.safetensors", lambda p: keep_mtime(p, _edit_header), "(its safetensors header differs)"),
    "generation config": ("base", "generation_config.json", lambda p: p.write_text(p.read_text().replace("4.45.0", "4.46.0")), "(its content sha256 differs)"),
    "tokenizer file deleted": ("base", "special_tokens_map.json", Path.unlink, "was deleted since this run started"),
    "tokenizer file added": ("base", "tokenizer.model", lambda p: p.write_bytes(b"new"), "appeared since this run started"),
}


@pytest.mark.parametrize("change", CHANGES)
def test_resume_refuses_inputs_changed_since_the_run_started(models, recipe, tmp_path, monkeypatch, capsys, change):
    model, file, how, says = CHANGES[change]
    out = tmp_path / "out"
    interrupted(recipe, out, monkeypatch)
    how(models[model] / file)
    err = refused(recipe, out, capsys)
    assert f"model {str(models[model])!r}: {file} " in err and says in err and "rerun with --overwrite to start afresh" in err, err
    assert not (out / "model.safetensors.index.json").exists()
    merge(recipe, out, "--overwrite")  # starts afresh: the same bytes as a clean run of the inputs as they are now
    merge(recipe, tmp_path / "clean")
    same_output(out, tmp_path / "clean")


def test_hash_inputs_finds_a_change_that_keeps_size_mtime_and_header(models, recipe, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    interrupted(recipe, out, monkeypatch, hash_inputs=True)
    record = json.loads((out / ".distmerge/inputs.json").read_text())
    weights = [e for e in record["files"] if e["file"].endswith(".safetensors")]
    assert record["full"] and len(weights) == 6 and all(len(e["sha256"]) == 64 for e in weights)
    keep_mtime(models["ft1"] / "model.safetensors", _flip_data)
    err = refused(recipe, out, capsys)  # the record holds content hashes: they are checked without the flag too
    assert f"model {str(models['ft1'])!r}: model.safetensors changed since this run started (its content sha256 differs)" in err


def test_a_model_now_read_from_another_directory_is_refused(llama_family, tmp_path, monkeypatch, capsys):
    """The same recipe text resolving to other directories (a hub model updated since: a new
    snapshot) has the same plan fingerprint, but is not the same input."""
    first, second = tmp_path / "a", tmp_path / "b"
    for root in (first, second):
        for k in ("base", "ft1", "ft2"):
            shutil.copytree(llama_family[k], root / k)
        write_recipe(root / "r.yml", {k: Path(k) for k in ("base", "ft1", "ft2")})  # relative to the recipe
    out = tmp_path / "out"
    interrupted(first / "r.yml", out, monkeypatch)
    err = refused(second / "r.yml", out, capsys)
    assert f"model 'base' is now read from {second / 'base'}, this run started with {first / 'base'}" in err


def test_inputs_changed_during_the_run_are_refused_at_finish(models, recipe, tmp_path, monkeypatch, capsys):
    import distmerge.job as job

    real = job.run_rank

    def then_touch(*args, **kwargs):
        written = real(*args, **kwargs)
        os.utime(models["ft2"] / "model-00003-of-00003.safetensors", ns=(0, 10**18))
        return written

    monkeypatch.setattr(job, "run_rank", then_touch)
    err = refused(recipe, tmp_path / "out", capsys)
    assert "model-00003-of-00003.safetensors changed since this run started (modified" in err
    assert "may mix old and new inputs" in err and not (tmp_path / "out/model.safetensors.index.json").exists()


# ---------------------------------------------------------------- --overwrite deletes only what distmerge wrote


def test_overwrite_removes_only_files_distmerge_wrote(recipe, tmp_path):
    out = tmp_path / "out"
    merge(recipe, out)  # 14 shards
    mine = {"notes.txt": "mine", "model-notes.safetensors.txt": "mine too", "tokenizer.model": "never written by distmerge"}
    for name, text in mine.items():
        (out / name).write_text(text)
    (out / "README.md.partial").write_text("left by a killed finish")
    main(["run", str(recipe), str(out), "--quiet", "--out-shard-size", "200KB", "--overwrite"])  # 4 shards
    main(["run", str(recipe), str(tmp_path / "clean"), "--quiet", "--out-shard-size", "200KB"])
    names = {p.name for p in out.iterdir()}
    assert names == {p.name for p in (tmp_path / "clean").iterdir()} | set(mine), names
    assert all((out / name).read_text() == text for name, text in mine.items())


def test_overwrite_of_a_directory_distmerge_never_wrote_keeps_lookalikes(recipe, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("notes.txt", "model-notes.safetensors.txt", "model-00001-of-00099.safetensors"):
        (out / name).write_text("mine")
    refused(recipe, out, capsys)
    merge(recipe, out, "--overwrite")
    assert all((out / n).read_text() == "mine" for n in ("notes.txt", "model-notes.safetensors.txt", "model-00001-of-00099.safetensors"))


# ---------------------------------------------------------------- verify: any changed byte


def verify_fails_naming(out: Path, name: str, capsys, *full: str) -> None:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["verify", str(out), *full])
    err = capsys.readouterr().err
    assert e.value.code == 1 and f"problem: {name}:" in err, (name, err)


@pytest.mark.slow
def test_verify_full_finds_a_changed_byte_anywhere_in_every_file(recipe, tmp_path, capsys):
    out = tmp_path / "out"
    merge(recipe, out)
    manifest = json.loads((out / ".distmerge/manifest.json").read_text())["files"]
    written = {p.name for p in out.iterdir() if p.is_file()}
    assert {e["name"] for e in manifest} == written  # every file distmerge wrote is recorded
    assert {"README.md", "distmerge_config.yml", "config.json", "generation_config.json", "tokenizer.json"} <= written
    rng = random.Random(13)
    flips = 0
    for name in sorted(written):
        path = out / name
        size = path.stat().st_size
        offsets = [0, size - 1, *(rng.randrange(size) for _ in range(3))]
        if name.endswith(".safetensors"):
            header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
            offsets += [rng.randrange(8), *(rng.randrange(8, header) for _ in range(3))]
        for offset in offsets:
            flip(path, offset)
            verify_fails_naming(out, name, capsys, "--full")
            if name.endswith(".safetensors") and offset < header:
                verify_fails_naming(out, name, capsys)  # a header is checked without --full too
            flip(path, offset)
            flips += 1
            main(["verify", str(out), "--full"])  # restored: passes again
            assert "OK" in capsys.readouterr().out
    assert flips >= 5 * len(written)


def test_verify_finds_a_missing_or_resized_file_without_full(recipe, tmp_path, capsys):
    out = tmp_path / "out"
    merge(recipe, out)
    (out / "generation_config.json").unlink()
    verify_fails_naming(out, "generation_config.json", capsys)
    (out / "README.md").write_text((out / "README.md").read_text() + "\nedited by hand\n")
    verify_fails_naming(out, "README.md", capsys)
    (out / ".distmerge/manifest.json").unlink()
    verify_fails_naming(out, ".distmerge/manifest.json", capsys)


@pytest.mark.slow
def test_the_manifest_comes_last_a_run_killed_before_it_does_not_verify(recipe, clean_run, tmp_path, capsys):
    out = tmp_path / "out"
    r = run_cli("run", recipe, out, "--quiet", *SHARDS, env={"DISTMERGE_FAULT": "0:manifest:kill"})
    assert r.returncode == -9 and (out / "README.md").exists(), r.stderr  # every other file is written
    verify_fails_naming(out, ".distmerge/manifest.json", capsys)
    merge(recipe, out)
    same_output(out, clean_run)
    main(["verify", str(out), "--full"])


# ---------------------------------------------------------------- kills during setup


@pytest.fixture
def clean_run(recipe, tmp_path) -> Path:
    out = tmp_path / "clean"
    merge(recipe, out)
    return out


SETUP = ["setup-mkdir", "setup-lock", "setup-state", "setup-plan", "setup-inputs", "setup-done"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "where, overwrite",
    [(w, False) for w in SETUP] + [("setup-clear", True), ("setup-inputs", True)],
)
def test_killed_during_setup_the_same_command_succeeds(models, recipe, clean_run, tmp_path, where, overwrite):
    out = tmp_path / "out"
    extra = ["--overwrite"] if overwrite else []
    if overwrite:  # replacing the output of another recipe
        merge(write_recipe(tmp_path / "other.yml", models, 0.7), out)
    r = run_cli("run", recipe, out, "--quiet", *SHARDS, *extra, env={"DISTMERGE_FAULT": f"0:{where}:kill"})
    assert r.returncode == -9, r.stderr
    merge(recipe, out, *extra)
    same_output(out, clean_run)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean_run.iterdir())  # no leftovers
    main(["verify", str(out), "--full"])


def test_setup_leftovers_count_as_distmerges_own(recipe, clean_run, tmp_path):
    out = tmp_path / "out"
    dead = str(max(psutil.pids()) + 10_000)
    (out / ".distmerge").mkdir(parents=True)
    (out / ".distmerge/plan.json.partial").write_text('{"finger')
    (out / f".distmerge.tmp-{dead}").mkdir()
    (out / f".distmerge.tmp-{dead}/plan.json").write_text("{}")
    (out / ".distmerge.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead), "since": 0}))
    (out / f".distmerge.lock.tmp-{dead}").write_text("")
    merge(recipe, out)
    same_output(out, clean_run)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean_run.iterdir())


# ---------------------------------------------------------------- plan-time failures write nothing


def test_a_recipe_refused_at_plan_time_writes_nothing(models, tmp_path, capsys):
    bad = write_recipe(tmp_path / "bad.yml", {**models, "ft2": tmp_path / "no-such-model"})
    refused(bad, tmp_path / "new", capsys)
    assert not (tmp_path / "new").exists()
    out = tmp_path / "existing"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused(bad, out, capsys, "--overwrite")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
