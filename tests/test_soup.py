"""``distmerge soup`` on the skills harness: five fine-tunes of "reverse" from one base (four
good ones with different seeds and learning rates, one with a learning rate 30x too high).

The soup selects on the first 64 held-out items (its --eval-cmd prints what ``python -m
distmerge.skills score --json --items 64 MODEL`` prints); the claims are checked there and on
the next 512 held-out items, which the selection never saw (score on 576 items minus score
on the first 64: ``test_items`` lists are prefixes of each other).

The --eval-cmd is a stdlib-only client (tests/score_client.py) of a scorer in this test
process (``scorer``): the same ``skills.score_all`` the command would run, without starting
Python and importing torch for each of the ~25 scores the module's soups ask for (3-4 s
each; the real command behind --eval-cmd is tested in tests/test_eval.py).

Measured but not asserted with a zero margin, because it does not hold at this scale: on the
512 unseen items the greedy soup is within a point of the best ingredient, above or below
(-1.0 to +0.4 points over four ingredient sets and selections on 64, 128 and 256 items, while
building this): these 70k-parameter fine-tunes of one base are about equally good, and
selecting on 64 items is noisy. It is asserted within ``UNSEEN_SLACK``.
"""

from __future__ import annotations

import json
import os
import signal
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from distmerge import skills
from tests.helpers import REPO_ROOT, free_port, run_cli, run_main
from tests.skills_fixtures import SOUP_SKILL, TRAIN_SECONDS, skill_models, soup_ingredients  # noqa: F401  (fixtures)

# trained skill models, soups of many merges and evaluations, two-rank runs. The module's first
# test trains five fine-tunes and runs a greedy soup (about 2.5 min alone on 2 cores, 5 min in
# a loaded CI run, past pytest's default 300 s).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

SELECT, UNSEEN = 64, 512
UNSEEN_SLACK = 0.03
"""The greedy soup may score this much below the best ingredient on unseen items (measured: 1 point at most)."""
RUN_TIMEOUT = 900
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def soup_args(out: Path, ingredients: dict[str, Path], cache: Path, *more: str, eval_cmd: str) -> list[str]:
    return ["soup", str(out), *map(str, ingredients.values()), "--eval-cmd", eval_cmd, "--metric", SOUP_SKILL,
            "--cache-dir", str(cache), "--quiet", "--device", "cpu", *more]  # fmt: skip


def soup(out: Path, ingredients: dict[str, Path], cache: Path, *more: str, eval_cmd: str) -> Path:
    proc = run_cli(*soup_args(out, ingredients, cache, *more, eval_cmd=eval_cmd), timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, f"distmerge soup failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return out


def unseen(model: Path) -> float:
    """Exact match on held-out items SELECT .. SELECT + UNSEEN, which the soup's selection never scored."""
    n = SELECT + UNSEEN
    return (skills.score(model, SOUP_SKILL, n) * n - skills.score(model, SOUP_SKILL, SELECT) * SELECT) / UNSEEN


def weights(model: Path) -> dict[str, bytes]:
    """The bytes of a checkpoint's weight files and config."""
    return {p.name: p.read_bytes() for p in sorted(model.iterdir()) if p.suffix == ".safetensors" or p.name == "config.json"}


def steps_of(out: Path) -> list[tuple]:
    return [(s["ingredient"], s["score"], s["accepted"], s["model_hash"]) for s in json.loads((out / "soup.json").read_text())["steps"]]


def launcher_free() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return env | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


class _Score(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        request = json.loads(self.rfile.readline())
        try:  # what `python -m distmerge.skills score --json --items N MODEL` prints
            reply = {"ok": json.dumps(skills.score_all(request["model"], request["items"]))}
        except Exception as e:  # the client prints it and exits 1, as the command would fail
            reply = {"error": f"{type(e).__name__}: {e}"}
        self.wfile.write(json.dumps(reply).encode() + b"\n")


@pytest.fixture(scope="module")
def scorer():
    """The soups' --eval-cmd: tests/score_client.py asks this process's scorer (a Unix socket
    server in a thread, one request at a time) for ``skills.score_all(MODEL, SELECT)``."""
    with tempfile.TemporaryDirectory(prefix="dm-score-") as d:  # short: a socket path has ~100 characters
        server = socketserver.UnixStreamServer(os.path.join(d, "s"), _Score)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"{sys.executable} -I {REPO_ROOT / 'tests' / 'score_client.py'} {server.server_address} {SELECT} {{model}}"
        finally:
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One score cache for the module: each checkpoint's bytes are evaluated once."""
    return tmp_path_factory.mktemp("soup_scores")


@pytest.fixture(scope="module")
def greedy(soup_ingredients, cache, scorer, tmp_path_factory) -> Path:
    t0 = time.perf_counter()
    out = soup(tmp_path_factory.mktemp("greedy") / "soup", soup_ingredients, cache, "--greedy", eval_cmd=scorer)
    print(f"\ngreedy soup: {time.perf_counter() - t0:.0f} s; ingredients trained in {TRAIN_SECONDS.get('soup_ingredients', 0):.0f} s (0: by another worker)")
    return out


@pytest.fixture(scope="module")
def uniform(soup_ingredients, cache, scorer, tmp_path_factory) -> Path:
    return soup(tmp_path_factory.mktemp("uniform") / "soup", soup_ingredients, cache, eval_cmd=scorer)


def test_greedy_soup_beats_its_ingredients_and_the_uniform_soup(greedy, uniform, soup_ingredients):
    log = json.loads((greedy / "soup.json").read_text())
    models = {**soup_ingredients, "uniform soup": uniform / "final", "greedy soup": greedy / "final"}
    rows = {name: {"selection": skills.score(m, SOUP_SKILL, SELECT), "unseen": unseen(m)} for name, m in models.items()}
    print("\n| model | selection (64) | unseen (512) |\n|---|---:|---:|")
    print("\n".join(f"| {n} | {100 * r['selection']:.1f} | {100 * r['unseen']:.1f} |" for n, r in rows.items()))
    g, u = rows["greedy soup"], rows["uniform soup"]
    best = {k: max(rows[n][k] for n in soup_ingredients) for k in ("selection", "unseen")}

    # The greedy soup leaves the bad ingredient out, keeps more than one, and scores as logged.
    assert str(soup_ingredients["bad_lr3e-2"]) not in log["final"]["soup"]
    assert len(log["final"]["soup"]) >= 2, log["final"]["soup"]
    assert log["final"]["score"] == g["selection"]
    # On the items it selected on, it is at least the best ingredient and the uniform soup.
    assert g["selection"] >= best["selection"] and g["selection"] >= u["selection"], rows
    # On items it never saw: far above the uniform soup (which the bad ingredient ruins),
    # and within UNSEEN_SLACK of the best ingredient.
    assert g["unseen"] >= u["unseen"] + 0.3, rows
    assert g["unseen"] >= best["unseen"] - UNSEEN_SLACK, rows
    # teeth: the soup with the bad ingredient in it fails the first of those
    assert not u["unseen"] >= best["unseen"] - UNSEEN_SLACK


def test_soup_yaml_reproduces_the_final_checkpoint(greedy, tmp_path):
    proc = run_cli("run", greedy / "soup.yaml", tmp_path / "again", "--quiet", "--device", "cpu", timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert weights(tmp_path / "again") == weights(greedy / "final")
    log = json.loads((greedy / "soup.json").read_text())
    recipe = (greedy / "soup.yaml").read_text()
    assert all(m in recipe for m in log["final"]["soup"]) and recipe.count("model: ") == len(log["final"]["soup"])


def test_log_plot_and_pruned_steps(greedy, soup_ingredients):
    log = json.loads((greedy / "soup.json").read_text())
    steps = log["steps"]
    assert [s["step"] for s in steps] == list(range(len(soup_ingredients)))
    own = [s["ingredient_score"] for s in steps]
    assert own == sorted(own, reverse=True), "ingredients are tried best first"
    for before, s in zip(steps, steps[1:]):  # accepted exactly when the score does not drop
        assert s["accepted"] == (s["score"] >= before["soup_score"])
    png = (greedy / "soup.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(greedy / "soup.png") as im:
        assert im.size[0] >= 500 and im.size[1] >= 300
        shown = json.loads(im.text["Description"])
    assert shown["steps"] == [{k: s[k] for k in ("step", "ingredient", "score", "accepted")} for s in steps]
    assert shown["final"] == log["final"]["score"]
    # Only the current soup's candidate is kept (none when the soup is one ingredient).
    kept = sorted(p.name for p in (greedy / "steps").iterdir() if p.is_dir())
    last = [s for s in steps if s["accepted"]][-1]["step"]
    assert kept == ([f"{last:02d}"] if last else []), kept


def test_resume_after_kill(soup_ingredients, greedy, scorer, tmp_path):
    """SIGKILL after the first candidate is logged; the same command finishes the same soup,
    and evaluates nothing whose score was already cached."""
    calls, cache, out = tmp_path / "calls.txt", tmp_path / "cache", tmp_path / "soup"
    eval_cmd = f"echo {{model}} >> {calls} && {scorer}"
    args = soup_args(out, soup_ingredients, cache, "--greedy", eval_cmd=eval_cmd)
    proc = subprocess.Popen([sys.executable, "-m", "distmerge.cli", *args], env=launcher_free(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not ((out / "soup.json").is_file() and len(json.loads((out / "soup.json").read_text())["steps"]) >= 2):
            assert proc.poll() is None, f"the soup ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = len(json.loads((out / "soup.json").read_text())["steps"])
    assert killed_at < len(soup_ingredients), "killed too late to test a resume"
    scored = {json.loads(p.read_text())["model"] for p in cache.glob("*.json")}
    first_calls = calls.read_text().split()
    soup(out, soup_ingredients, cache, "--greedy", eval_cmd=eval_cmd)
    again = calls.read_text().split()[len(first_calls):]
    assert not set(again) & scored, f"re-evaluated after the resume: {set(again) & scored}"
    assert not set(again) & {str(p) for p in soup_ingredients.values()}
    assert steps_of(out) == steps_of(greedy)
    assert weights(out / "final") == weights(greedy / "final")


def test_two_ranks_give_the_same_soup(soup_ingredients, greedy, cache, scorer, tmp_path):
    out = tmp_path / "soup"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "distmerge.cli",
           *soup_args(out, soup_ingredients, cache, "--greedy", eval_cmd=scorer)]  # fmt: skip
    env = launcher_free() | {"MASTER_PORT": str(free_port())}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert steps_of(out) == steps_of(greedy)  # each candidate's content hash too
    assert weights(out / "final") == weights(greedy / "final")


def test_refusals(soup_ingredients, greedy, scorer, tmp_path):
    one = list(soup_ingredients.values())[:1]
    r = run_main("soup", tmp_path / "a", *one, "--eval-cmd", scorer)
    assert r.returncode == 2 and "at least 2 ingredients" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_main("soup", tmp_path / "b", *one, tmp_path / "nowhere", "--eval-cmd", scorer)
    assert r.returncode == 2 and "nowhere" in r.stderr and "no config.json" in r.stderr, r.stderr
    r = run_main("soup", tmp_path / "c", *list(soup_ingredients.values())[:2], "--greedy")
    assert r.returncode == 2 and "greedy soup needs a score" in r.stderr, r.stderr
    before = (greedy / "soup.json").read_bytes()
    r = run_main(*soup_args(greedy, dict(list(soup_ingredients.items())[:3]), tmp_path / "cache", "--greedy", eval_cmd=scorer))
    assert r.returncode == 2 and "a different ingredient list" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (greedy / "soup.json").read_bytes() == before
