"""distmerge eval: lm-eval tasks or an --eval-cmd, scores cached by the checkpoint's content.

The models are the skills harness's (tests/skills_fixtures.py); the scorer behind --eval-cmd
is ``python -m distmerge.skills score --json``, and the lm-eval task is the same held-out
items written by ``python -m distmerge.skills lm-eval-task``. Every call gets its own cache
folder (--cache-dir), so no test sees another's scores.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time

import pytest

from distmerge import evaluate as ev
from distmerge import skills
from distmerge.errors import MergeError
from tests.helpers import run_main
from tests.skills_fixtures import skill_merge, skill_models  # noqa: F401  (fixtures)

ITEMS = 64  # held-out items per skill: 1.6 points each
PY = shlex.quote(sys.executable)
SKILLS_CMD = f"{PY} -m distmerge.skills score --json --items {ITEMS} {{model}}"


def counting_cmd(tmp_path) -> tuple[str, object]:
    """An --eval-cmd that appends a line to a counter file and prints {"runs": lines so far}."""
    counter = tmp_path / "runs.txt"
    script = tmp_path / "count.py"
    script.write_text(
        "import json, sys\n"
        f"with open({str(counter)!r}, 'a') as f: f.write(sys.argv[1] + '\\n')\n"
        f"print(json.dumps({{'runs': len(open({str(counter)!r}).read().splitlines())}}))\n"
    )
    return f"{PY} {shlex.quote(str(script))} {{model}}", counter


def eval_json(model, *args, cache) -> dict:
    r = run_main("eval", model, *args, "--cache-dir", cache, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# --------------------------------------------------------------------------- --eval-cmd


@pytest.mark.slow
def test_eval_cmd_with_the_skills_scorer_gives_skills_scores(skill_models, tmp_path):
    got = eval_json(skill_models["reverse"], "--eval-cmd", SKILLS_CMD, cache=tmp_path / "cache")
    want = skills.score_all(skill_models["reverse"], ITEMS)
    assert got["metrics"] == want
    assert got["score"] == pytest.approx(sum(want.values()) / len(want))  # no --metric: the mean of the top-level numbers
    assert got["cached"] is False
    picked = eval_json(skill_models["reverse"], "--eval-cmd", SKILLS_CMD, "--metric", "reverse", cache=tmp_path / "cache2")
    assert picked["score"] == want["reverse"]


def test_score_of_json_rules():
    assert ev.score_of_json(0.25, None, "cmd") == (0.25, {"score": 0.25})
    assert ev.score_of_json({"acc": 0.5, "n": 10}, "acc", "cmd")[0] == 0.5
    nested = {"task": {"acc": 0.5, "f1": 0.75}, "other": {"acc": 0.125}}
    assert ev.score_of_json(nested, "task.f1", "cmd")[0] == 0.75  # a dotted path
    assert ev.score_of_json(nested, "other/acc", "cmd")[0] == 0.125  # a / path
    assert ev.score_of_json({"only": {"one": 0.3, "flag": True}}, None, "cmd")[0] == 0.3  # the only number (booleans are not)
    assert ev.score_of_json({"a": 0.2, "b": 0.4, "c": {"d": 9.0}}, None, "cmd")[0] == pytest.approx(0.3)  # top level only
    with pytest.raises(MergeError, match="none at the top level; name the score with --metric"):
        ev.score_of_json(nested, None, "cmd")
    with pytest.raises(MergeError, match="--metric task/bleu: cmd has no such number; it has: task/acc, task/f1, other/acc"):
        ev.score_of_json(nested, "task/bleu", "cmd")


@pytest.mark.slow
def test_second_call_is_a_cache_hit_and_changed_bytes_are_a_miss(skill_models, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(skill_models["sort"], model)
    cmd, counter = counting_cmd(tmp_path)
    cache = tmp_path / "cache"
    first = eval_json(model, "--eval-cmd", cmd, cache=cache)
    second = eval_json(model, "--eval-cmd", cmd, cache=cache)
    assert (first["score"], first["cached"]) == (1.0, False)
    assert (second["score"], second["cached"]) == (1.0, True)
    assert len(counter.read_text().splitlines()) == 1  # the command did not run again
    other_metric = eval_json(model, "--eval-cmd", cmd, "--metric", "runs", cache=cache)
    assert other_metric["cached"] is False  # another spec is another evaluation

    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor
    weights.write_bytes(bytes(data))
    changed = eval_json(model, "--eval-cmd", cmd, cache=cache)
    assert changed["cached"] is False and changed["model_hash"] != first["model_hash"]
    assert len(counter.read_text().splitlines()) == 3


@pytest.mark.slow
def test_the_same_bytes_in_two_merges_are_evaluated_once(skill_models, skill_merge, tmp_path, monkeypatch):
    recipe = {"merge_method": "task_arithmetic", "base_model": str(skill_models["base"]), "dtype": "float32",
              "models": [{"model": str(skill_models[s]), "parameters": {"weight": 1.0}} for s in ("reverse", "lookup")]}  # fmt: skip
    a, b = skill_merge("eval_twice_a", recipe), skill_merge("eval_twice_b", recipe)
    cmd, counter = counting_cmd(tmp_path)
    first = eval_json(a, "--eval-cmd", cmd, cache=tmp_path / "cache")
    second = eval_json(b, "--eval-cmd", cmd, cache=tmp_path / "cache")
    assert (first["cached"], second["cached"]) == (False, True)
    assert counter.read_text().splitlines() == [str(a)]

    # The hash of a finished merge comes from its manifest (no weights read) and equals the
    # hash of the same files without distmerge's state, read byte by byte.
    plain = tmp_path / "plain"
    shutil.copytree(a, plain, ignore=shutil.ignore_patterns(".distmerge*"))
    assert ev.model_hash(plain) == first["model_hash"]
    monkeypatch.setattr(ev, "_safetensors_digest", lambda path: pytest.fail(f"{path} was read to hash it"))
    assert ev.model_hash(b) == first["model_hash"]

    # A merge whose weights changed after it finished is hashed from its bytes, not its manifest.
    monkeypatch.undo()
    edited = tmp_path / "edited"
    shutil.copytree(a, edited)
    time.sleep(0.01)
    weights = next(edited.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert ev.model_hash(edited) != first["model_hash"]


# --------------------------------------------------------------------------- lm-eval


@pytest.mark.slow
def test_lm_eval_local_task_agrees_with_skills_score(skill_models, tmp_path):
    pytest.importorskip("lm_eval")
    tasks = tmp_path / "tasks"
    assert skills.main(["lm-eval-task", str(tasks), "--items", str(ITEMS)]) == 0
    model = skill_models["reverse"]
    t0 = time.perf_counter()
    got = eval_json(model, "--include-path", tasks, "--tasks", "skills", "--batch-size", "64", cache=tmp_path / "cache")
    print(f"lm-eval, 3 tasks x {ITEMS} items, hf backend on CPU: {time.perf_counter() - t0:.1f} s")
    want = skills.score_all(model, ITEMS)
    # lm-eval generates in left-padded batches: its float sums may differ from skills' unpadded
    # ones in the last bits, enough to flip one near-tie. Measured: equal on every item.
    assert {s: got["metrics"][f"skills_{s}/exact_match"] for s in skills.SKILLS} == pytest.approx(want, abs=1 / ITEMS)
    assert got["score"] == pytest.approx(sum(want.values()) / len(want), abs=1 / ITEMS)
    assert max(want.values()) - min(want.values()) > 0.2  # the scores tell the skills apart: a real comparison


# --------------------------------------------------------------------------- bad input


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give either --tasks (lm-eval tasks) or --eval-cmd (a command that prints a score), one of them"),
        (["--tasks", "x", "--eval-cmd", "echo 1 {model}"], "give either --tasks (lm-eval tasks) or --eval-cmd (a command that prints a score), not both"),
        (["--eval-cmd", "echo 1"], "--eval-cmd 'echo 1' has no {model}: write where the checkpoint's path goes"),
        (["--eval-cmd", "echo 1 {model}", "--batch-size", "0"], "--batch-size 0: a positive integer or auto"),
        (["--tasks", "skills", "--model-args", "trust_remote_code=True"], "trust_remote_code is refused"),
    ],
)
def test_refusals_are_one_line_before_any_work(skill_models, tmp_path, args, message):
    r = run_main("eval", skill_models["base"], *args, "--cache-dir", tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and message in r.stderr, r.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "cmd, message",
    [
        ("echo hello {model}", "printed no JSON (first line: 'hello "),
        ("echo 1 {model}; echo oops >&2; exit 3", "failed (exit status 3): oops"),
    ],
)
def test_a_failing_command_is_one_line(skill_models, tmp_path, cmd, message):
    r = run_main("eval", skill_models["base"], "--eval-cmd", cmd, "--cache-dir", tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    last = r.stderr.splitlines()[-1]  # after the command's own stderr, passed on
    assert last.startswith(f"error: --eval-cmd '{cmd.replace('{model}', str(skill_models['base']))}'") and message in last, r.stderr


@pytest.mark.slow
def test_missing_model_and_missing_lm_eval_are_one_line(tmp_path, skill_models, monkeypatch):
    r = run_main("eval", tmp_path / "nope", "--eval-cmd", "echo 1 {model}", "--cache-dir", tmp_path)
    assert (r.returncode, r.stderr) == (2, f"error: {tmp_path / 'nope'}: no such directory (give a checkpoint directory: config.json and weights)\n")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    r = run_main("eval", skill_models["base"], "--tasks", "skills", "--cache-dir", tmp_path)
    assert (r.returncode, r.stderr) == (2, f"error: {ev.LM_EVAL_MISSING}\n")
