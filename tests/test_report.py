"""Progress while it runs, and the run report at the end."""

import json

import pytest
import yaml

from tests.helpers import run_cli


@pytest.mark.slow
def test_run_report_and_plain_progress_lines(llama_family, tmp_path):
    f = llama_family
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(f["ft1"]), "parameters": {"weight": 1}}, {"model": str(f["ft2"]), "parameters": {"weight": 1}}]}))
    report = tmp_path / "report.json"
    # stderr is a pipe here, as in a Slurm log: progress comes as plain lines, not a bar.
    r = run_cli("run", recipe, tmp_path / "out", "--report-json", report, "--log-every", "0.2", env={"DISTMERGE_FAULT": "0:0:sleep:0.05"})
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("distmerge: ")]
    assert lines and "tensors" in lines[-1] and "GB/s" in lines[-1] and "ETA" in lines[-1]
    assert "\r" not in r.stderr  # no bar redraws in a log file
    data = json.loads(report.read_text())
    plan = json.loads(run_cli("plan", recipe, "--json").stdout)
    read = sum(i["end"] - i["begin"] for t in plan["tensors"] for i in t["inputs"] + ([t["base"]] if t["base"] else []))
    assert data["tensors"] == 39 and data["read_bytes"] == read
    assert data["write_bytes"] == json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    (rank,) = data["ranks"]
    assert rank["tensors"] == 39 and rank["peak_rss"] > 50e6 and set(rank["seconds"]) == {"read", "merge", "write", "sync"}
    assert set(data["phases"]) == {"plan", "merge", "finish"} and data["imbalance"] == 0.0
    assert "GB/s moved" in r.stdout and "peak RSS" in r.stdout


@pytest.mark.slow
def test_quiet_prints_nothing(llama_family, tmp_path):
    f = llama_family
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(f["ft1"]), "parameters": {"weight": 1}}]}))
    r = run_cli("run", recipe, tmp_path / "out", "--quiet", "--log-every", "0.01")
    assert r.returncode == 0 and r.stdout == "" and "distmerge:" not in r.stderr


def test_run_refuses_to_start_without_the_memory_the_plan_predicts(llama_family, tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    import pytest

    import distmerge.job as job
    from distmerge.cli import main

    f = llama_family
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(f["ft1"]), "parameters": {"weight": 1}}]}))
    monkeypatch.setattr(job.psutil, "virtual_memory", lambda: SimpleNamespace(available=1000))
    with pytest.raises(SystemExit):
        main(["run", str(recipe), str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert "needs about" in err and "fewer ranks per node" in err
    assert not (tmp_path / "out").exists()
