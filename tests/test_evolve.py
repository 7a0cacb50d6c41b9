"""``distmerge evolve``: the genome <-> recipe maps, replay, failures and config errors (fast),
and a search on the skills harness (slow).

The search merges the *reverse* and *lookup* fine-tunes of ``skill_models`` with TIES
(normalize false), CMA-ES over each model's weight and density, started at the hand-set
recipe of the README's skills table (weights 1, density 0.5), and selects on the first
SELECT held-out items of both skills. Its budget: POPULATION x GENERATIONS candidates. The
claim is checked on the next UNSEEN held-out items, which the search never scored, against
the hand-set TIES (density 0.5) and DARE-TIES (density 0.7) recipes scored on those same
items here.

Evaluations go through ``--eval-cmd`` to tests/score_client.py, a client of a scorer in this
test process (as tests/test_soup.py does): ``skills.score_all`` without a new Python and torch
per candidate.
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
import yaml

from distmerge import skills
from distmerge.errors import MergeError
from distmerge.evaluate import EvalSpec, model_hash
from distmerge.evolve import Evolution, evaluate_candidate, load_config, my_candidates, parse_config
from distmerge.genome import CMASearch, LayerGA, gene_values, genome_recipe, layer_path
from tests.helpers import REPO_ROOT, child_env, free_port, run_main
from tests.skills_fixtures import skill_models  # noqa: F401  (fixture)

SKILLS = ("reverse", "lookup")
SELECT, UNSEEN = 256, 512
POPULATION, GENERATIONS = 8, 3
"""The search's budget: 24 candidates."""
SHORT = 2
"""Generations of the kill/resume and two-rank runs: the first two of the same search."""
RUN_TIMEOUT = 600


def slow(test):
    """Trained models, merges, evaluations, subprocesses: over a minute together."""
    return pytest.mark.slow(pytest.mark.timeout(900)(test))


# --------------------------------------------------------------------------- fast: genome <-> recipe


TEMPLATE = {
    "merge_method": "ties",
    "base_model": "/m/base",
    "dtype": "float32",
    "parameters": {"normalize": False, "lambda": {"evolve": [0.5, 1.5]}},
    "models": [
        {"model": "/m/a", "parameters": {"weight": {"evolve": [0, 2], "gradient": 3}, "density": 0.5}},
        {"model": "/m/b", "parameters": {"weight": [{"filter": "mlp", "value": {"evolve": [0, 1], "init": 0.25}}, {"value": 1.0}],
                                         "density": {"evolve": [0.2, 1.0]}}},
    ],
}  # fmt: skip


def config_of(**over) -> dict:
    return {"search": "parameters", "recipe": TEMPLATE, "eval": {"eval_cmd": "score {model}"}} | over


def test_genome_to_recipe_parameters():
    c = parse_config(config_of())
    assert [g.path for g in c.genes] == [
        ("parameters", "lambda"), ("models", 0, "parameters", "weight"), ("models", 1, "parameters", "weight", 0, "value"),
        ("models", 1, "parameters", "density"),
    ]  # fmt: skip
    assert c.dim == 1 + 3 + 1 + 1
    x = [0.5, 0.0, 0.25, 1.0, 0.123456, 2.0]  # the last one out of [0, 1]: clamped
    assert gene_values(c, x) == [1.0, [0.0, 0.5, 2.0], 0.1235, 1.0]
    r = genome_recipe(c, x)
    assert r["parameters"] == {"normalize": False, "lambda": 1.0}
    assert r["models"][0]["parameters"] == {"weight": [0.0, 0.5, 2.0], "density": 0.5}
    assert r["models"][1]["parameters"] == {"weight": [{"filter": "mlp", "value": 0.1235}, {"value": 1.0}], "density": 1.0}
    assert TEMPLATE["parameters"]["lambda"] == {"evolve": [0.5, 1.5]}, "the template is left as it was"
    # a plain mergekit recipe: distmerge's own parser takes it
    from distmerge.recipe import parse_recipe

    assert parse_recipe(yaml.safe_dump(r)).merge_method == "ties"
    # CMA-ES starts at init (0.25 of [0, 1]) or the middle of each range
    assert list(CMASearch(c).es.mean) == [0.5, 0.5, 0.5, 0.5, 0.25, 0.5]


def test_genome_to_recipe_layers(tmp_path):
    for name, n in (("a", 2), ("b", 3)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"num_hidden_layers": n}))
    c = parse_config({"search": "layers", "models": ["a", "b"], "repeats": 2, "dtype": "bfloat16", "eval": {"eval_cmd": "s {model}"}}, str(tmp_path))
    assert c.layers == [2, 3] and c.dim == 10
    bits = [1, 1, 0, 1, 1, 0, 1, 0, 0, 1]
    assert layer_path(c, bits) == [(0, 0), (0, 1), (1, 1), (1, 2), (0, 1), (1, 2)]
    r = genome_recipe(c, bits)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert r == {"merge_method": "passthrough", "dtype": "bfloat16", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 2]}]}, {"sources": [{"model": b, "layer_range": [1, 3]}]},
        {"sources": [{"model": a, "layer_range": [1, 2]}]}, {"sources": [{"model": b, "layer_range": [2, 3]}]},
    ]}  # fmt: skip
    assert genome_recipe(c, [0] * 10) is None  # an empty path: scored as a failure, never merged
    ga = LayerGA(c)
    first = ga.ask()
    assert first[:2] == [[1, 1, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]]  # each model alone first
    assert len(first) == c.population and len({tuple(b) for b in first}) == len(first)
    ga.tell([float("-inf")] + [float(i) for i in range(1, len(first))])
    assert ga.population[-1][1] == float("-inf"), "a failure is ranked last"
    assert not {tuple(b) for b in ga.ask()} & {tuple(b) for b in first}, "no genome is asked twice"


@pytest.mark.parametrize("change, says", [
    ({"search": "grid"}, "search: 'grid'; give search: parameters"),
    ({"eval": None}, "no eval: section"),
    ({"eval": {"eval_cmd": "s {model}", "tasks": "x"}}, "not both"),
    ({"eval": {"eval_cmd": "score"}}, "has no {model}"),
    ({"eval": {"eval_cmd": "s {model}", "devices": 2}}, "eval: unknown key(s) devices"),
    ({"population": 1}, "population: 1; give an integer >= 2"),
    ({"sigma": 3}, "sigma: 3; give CMA-ES's step size in (0, 1]"),
    ({"objectives": {"reverse": -1}}, "objectives: "),
    ({"generation": 3}, "unknown key(s) generation"),
    ({"models": ["x"]}, "models: is for search: layers"),
    ({"recipe": {"merge_method": "ties", "models": [{"model": "a"}]}}, "recipe: has no gene"),
    ({"recipe": {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": {"evolve": [1, 0]}}}]}}, "is not a range"),
    ({"recipe": {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": {"evolve": [0, 1], "gradient": 1}}}]}}, "gradient: 1"),
    ({"recipe": {"merge_method": "linear", "models": [{"model": "a", "parameters": {"wieght": {"evolve": [0, 1]}}}]}}, "wieght"),
    ({"search": "layers", "models": ["/nowhere"]}, "recipe: is for search: parameters"),
    ({"search": "layers", "recipe": None, "models": ["/nowhere"]}, "model /nowhere: no config.json with num_hidden_layers"),
])  # fmt: skip
def test_config_errors(change, says, tmp_path):
    data = {k: v for k, v in (config_of() | change).items() if v is not None}
    with pytest.raises(MergeError) as e:
        parse_config(data, str(tmp_path), "c.yml")
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert str(e.value).startswith("evolve config c.yml: ")


def test_config_errors_through_the_cli(tmp_path):
    (tmp_path / "c.yml").write_text("search: parameters\neval: {eval_cmd: 's {model}'}\nrecipe: [\n")
    r = run_main("evolve", tmp_path / "c.yml", tmp_path / "out")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "line" in r.stderr, r.stderr
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config_of()))
    r = run_main("evolve", tmp_path / "c.yml")
    assert r.returncode == 2 and "no output directory; give OUT" in r.stderr, r.stderr


def fake_score(genome) -> float:
    """A deterministic score of a genome, for searches that merge nothing."""
    return -sum((v - 0.3) ** 2 for v in genome)


def drive(evo: Evolution, stop_after: int | None = None) -> int:
    """Run ``evo``'s generations with fake scores (no merge, no evaluation); stop after
    ``stop_after`` candidates are recorded. Returns the number recorded."""
    n = 0
    while (task := evo.next_generation()) is not None:
        for i in task["todo"]:
            if stop_after is not None and n == stop_after:
                return n
            s = fake_score(evo.current[i])
            evo.record(task["gen"], i, {"model_hash": f"h{task['gen']}.{i}", "score": s, "metrics": {}, "error": None, "eval_seconds": 0.0,
                                        "cached": False, "rank": 0})  # fmt: skip
            n += 1
        evo.finish_generation({"merge_seconds": 0.0, "eval_seconds": 0.0})
    return n


def test_resume_replays_the_search(tmp_path):
    config = parse_config(config_of(population=4, generations=3, seed=7))
    drive(Evolution(tmp_path / "whole", config, lambda line: None))
    whole = json.loads((tmp_path / "whole" / "evolve.json").read_text())
    assert len(whole["candidates"]) == 12 and len(whole["generations"]) == 3

    # killed after 6 candidates (in generation 2 of 3): a new Evolution replays the first
    # generation from the log, asks the second again and scores only its last two
    part = tmp_path / "part"
    assert drive(Evolution(part, config, lambda line: None), stop_after=6) == 6
    evo = Evolution(part, config, lambda line: None)
    task = evo.next_generation()
    assert task["gen"] == 1 and task["todo"] == [2, 3]
    evo.record(1, 2, {"model_hash": "h1.2", "score": fake_score(evo.current[2]), "metrics": {}, "error": None, "eval_seconds": 0.0, "cached": False, "rank": 0})
    evo.record(1, 3, {"model_hash": "h1.3", "score": fake_score(evo.current[3]), "metrics": {}, "error": None, "eval_seconds": 0.0, "cached": False, "rank": 0})
    evo.finish_generation({"merge_seconds": 0.0, "eval_seconds": 0.0})
    drive(evo)
    resumed = json.loads((part / "evolve.json").read_text())
    assert [(c["genome"], c["score"]) for c in resumed["candidates"]] == [(c["genome"], c["score"]) for c in whole["candidates"]]
    assert resumed["generations"] == whole["generations"]

    # another seed: the same first genomes are not what it asks for, and it says so
    log = json.loads((part / "evolve.json").read_text())
    log["candidates"][0]["genome"][0] += 1e-9
    (part / "evolve.json").write_text(json.dumps(log))
    with pytest.raises(MergeError, match="candidate 0 was logged with another genome"):
        Evolution(part, config, lambda line: None).next_generation()
    # a changed config is refused with one line naming what changed
    with pytest.raises(MergeError, match=r"different config \(seed\)"):
        Evolution(part, parse_config(config_of(population=4, generations=3, seed=8)), lambda line: None)
    # more generations: the same search, continued
    evo = Evolution(tmp_path / "whole", parse_config(config_of(population=4, generations=4, seed=7)), lambda line: None)
    assert drive(evo) == 4


def test_failed_evaluation_is_scored_worst(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    spec = EvalSpec(eval_cmd="echo broken >&2; exit 3 # {model}", cache_dir=str(tmp_path / "cache"))
    lines = []
    r = evaluate_candidate(str(model), spec, None, lines.append)
    assert r["score"] is None and "exit status 3" in r["error"] and "broken" in r["error"], r
    assert r["model_hash"] == model_hash(model)
    assert any("scored as a failure" in line for line in lines)
    # CMA-ES is told a fitness worse than any real one: it moves as when that candidate scored lowest
    c = parse_config(config_of(population=4))
    failed, worst = CMASearch(c), CMASearch(c)
    assert failed.ask() == worst.ask()
    failed.tell([float("-inf"), 0.2, 0.1, 0.3])
    worst.tell([-1e6, 0.2, 0.1, 0.3])
    assert list(failed.es.mean) == list(worst.es.mean) and failed.ask() == worst.ask()


def test_candidates_spread_over_ranks():
    todo = [0, 1, 2, 3, 4, 5, 6]
    assert [my_candidates(todo, r, 1, 1) for r in range(1)] == [todo]
    assert [my_candidates(todo, r, 3, 1) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    # groups of 2 ranks per evaluation (tensor parallel): the group's first rank evaluates
    assert [my_candidates(todo, r, 4, 2) for r in range(4)] == [[0, 2, 4, 6], [], [1, 3, 5], []]
    assert [my_candidates(todo, r, 3, 2) for r in range(3)] == [todo, [], []]


def test_slurm_script_for_a_search(tmp_path):
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config_of()))
    r = run_main("slurm", tmp_path / "c.yml", tmp_path / "out", "--evolve", "--nodes", "2", "--gpus-per-node", "4", "--", "--timeout", "900")
    assert r.returncode == 0, r.stderr
    assert "-m distmerge.cli evolve" in r.stdout and "--timeout 900" in r.stdout and "--nodes=2" in r.stdout
    assert "6 genes, 8 candidates x 4 generations" in r.stderr
    r = run_main("slurm", tmp_path / "c.yml", tmp_path / "out", "--evolve", "--nodes", "1", "--gpus-per-node", "1", "--", "--io", "pread")
    assert r.returncode == 2 and "distmerge evolve" in r.stderr, r.stderr


# --------------------------------------------------------------------------- slow: the skills harness


class _Score(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        request = json.loads(self.rfile.readline())
        self.server.requests.append(request["model"])
        try:
            reply = {"ok": json.dumps(skills.score_all(request["model"], request["items"], skills=SKILLS))}
        except Exception as e:
            reply = {"error": f"{type(e).__name__}: {e}"}
        self.wfile.write(json.dumps(reply).encode() + b"\n")


@pytest.fixture(scope="module")
def scorer():
    """(the --eval-cmd, the list of models it was asked to score) of a scorer in this process."""
    with tempfile.TemporaryDirectory(prefix="dm-evolve-") as d:
        server = socketserver.UnixStreamServer(os.path.join(d, "s"), _Score)
        server.requests = []
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"{sys.executable} -I {REPO_ROOT / 'tests' / 'score_client.py'} {server.server_address} {SELECT} {{model}}", server.requests
        finally:
            server.shutdown()
            server.server_close()


def write_config(path: Path, models: dict[str, Path], eval_cmd: str, cache: Path, generations: int = GENERATIONS) -> Path:
    gene = lambda lo, hi, init: {"evolve": [lo, hi], "init": init}  # noqa: E731
    config = {
        "search": "parameters", "population": POPULATION, "generations": generations, "seed": 0, "sigma": 0.12,
        "eval": {"eval_cmd": eval_cmd, "cache_dir": str(cache)},
        "objectives": {s: 1 for s in SKILLS},
        "recipe": {
            "merge_method": "ties", "base_model": str(models["base"]), "dtype": "float32", "parameters": {"normalize": False},
            "models": [{"model": str(models[s]), "parameters": {"weight": gene(0.5, 1.5, 1.0), "density": gene(0.2, 1.0, 0.5)}} for s in SKILLS],
        },
    }  # fmt: skip
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def unseen(model: Path) -> float:
    """Mean exact match over both skills on held-out items SELECT .. SELECT + UNSEEN."""
    n = SELECT + UNSEEN
    whole, first = skills.score_all(model, n, skills=SKILLS), skills.score_all(model, SELECT, skills=SKILLS)
    return sum((whole[s] * n - first[s] * SELECT) / UNSEEN for s in SKILLS) / len(SKILLS)


def selection(model: Path) -> float:
    return sum(skills.score_all(model, SELECT, skills=SKILLS).values()) / len(SKILLS)


def weights(model: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model.iterdir()) if p.suffix == ".safetensors" or p.name == "config.json"}


def candidates_of(out: Path, generations: int | None = None) -> list[tuple]:
    log = json.loads((out / "evolve.json").read_text())
    return [(c["gen"], c["index"], c["genome"], c["score"], c["model_hash"]) for c in log["candidates"] if generations is None or c["gen"] < generations]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("evolve_scores")


@pytest.fixture(scope="module")
def search(skill_models, scorer, cache, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evolve")
    config = write_config(root / "evolve.yml", skill_models, scorer[0], cache)
    t0 = time.perf_counter()
    r = run_main("evolve", config, root / "out", "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr[-4000:]
    log = json.loads((root / "out" / "evolve.json").read_text())
    merge = sum(g["merge_seconds"] for g in log["generations"])
    evals = sum(g["eval_seconds"] for g in log["generations"])
    print(f"\nsearch: {POPULATION} x {GENERATIONS} candidates in {time.perf_counter() - t0:.1f} s: merging {merge:.1f} s, evaluating {evals:.1f} s, "
          f"best checkpoint {log['best']['final_seconds']:.1f} s")  # fmt: skip
    return root / "out"


@pytest.fixture(scope="module")
def hand_set(skill_models, tmp_path_factory) -> dict[str, Path]:
    """The README table's TIES (density 0.5, normalize false) and DARE-TIES (density 0.7)
    recipes, merged from one read, the models named as the table names them (DARE's masks
    are keyed by the models' names)."""
    root = tmp_path_factory.mktemp("hand_set")
    docs = []
    for name, method, density, top in (("ties", "ties", 0.5, {"normalize": False}), ("dare_ties", "dare_ties", 0.7, {})):
        models = [{"model": s, "parameters": {"weight": 1.0, "density": density}} for s in SKILLS]
        docs.append({"name": name, "merge_method": method, "base_model": "base", "dtype": "float32", "models": models} | ({"parameters": top} if top else {}))
    recipe = skill_models["base"].parent / f"hand-set-{os.getpid()}.yml"  # next to the models: their names resolve there
    try:
        recipe.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        r = run_main("run", recipe, root / "dare_ties", "--keep-intermediates", root, "--quiet", "--device", "cpu")
    finally:
        recipe.unlink(missing_ok=True)
    assert r.returncode == 0, r.stderr
    return {"ties": root / "ties", "dare_ties": root / "dare_ties"}


@slow
def test_search_beats_hand_set_ties_and_dare(search, hand_set, skill_models):
    log = json.loads((search / "evolve.json").read_text())
    rows = {name: {"selection": selection(m), "unseen": unseen(m)} for name, m in {**hand_set, "evolved": search / "best"}.items()}
    rows |= {s: {"selection": selection(skill_models[s]), "unseen": unseen(skill_models[s])} for s in SKILLS}
    print("\n| model | selection | unseen |\n|---|---:|---:|")
    print("\n".join(f"| {n} | {100 * r['selection']:.1f} | {100 * r['unseen']:.1f} |" for n, r in rows.items()))
    print(f"best: {log['best']['values']}")
    assert len(log["candidates"]) == POPULATION * GENERATIONS
    assert log["best"]["score"] == rows["evolved"]["selection"], "the logged score is the selection score"
    best = rows["evolved"]["unseen"]
    assert best > rows["ties"]["unseen"] and best > rows["dare_ties"]["unseen"], rows
    # teeth: the worst candidate of the search is below both on the items it was selected on
    worst = min(c["score"] for c in log["candidates"])
    assert worst < rows["ties"]["selection"] and worst < rows["dare_ties"]["selection"]


@slow
def test_best_yaml_rebuilds_the_best_checkpoint(search, tmp_path):
    log = json.loads((search / "evolve.json").read_text())
    best = next(c for c in log["candidates"] if (c["gen"], c["index"]) == (log["best"]["gen"], log["best"]["index"]))
    # the checkpoint merged among its generation's candidates has the bytes best.yaml gives alone
    assert model_hash(search / "best") == best["model_hash"] == log["best"]["rebuilt_hash"]
    r = run_main("run", search / "best.yaml", tmp_path / "again", "--quiet", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert weights(tmp_path / "again") == weights(search / "best")
    recipe = yaml.safe_load((search / "best.yaml").read_text())
    assert "evolve" not in json.dumps(recipe) and recipe["merge_method"] == "ties"


@slow
def test_tables_and_plot(search):
    log = json.loads((search / "evolve.json").read_text())
    rows = log["generations"]
    assert [r["gen"] for r in rows] == list(range(GENERATIONS))
    for r in rows:
        scores = [c["score"] for c in log["candidates"] if c["gen"] == r["gen"]]
        assert r["best"] == max(scores) and abs(r["mean"] - sum(scores) / len(scores)) < 1e-12
    assert rows[-1]["best_so_far"] == log["best"]["score"]
    table = (search / "generations.md").read_text().splitlines()
    assert len(table) == 2 + GENERATIONS and table[2].startswith("| 0 | ")
    assert (search / "generations.csv").read_text().count("\n") == 1 + GENERATIONS
    from PIL import Image

    with Image.open(search / "evolve.png") as im:
        assert im.size[0] >= 500 and im.size[1] >= 300
        shown = json.loads(im.text["Description"])
    assert shown == [{k: r[k] for k in ("gen", "best", "mean", "best_so_far")} for r in rows]
    assert not (search / "gens").exists(), "the generations' candidates are deleted once scored"


@slow
def test_kill_mid_generation_then_resume(search, skill_models, scorer, tmp_path):
    """SIGKILL while generation 2 is being evaluated; the same command finishes it with the
    same candidates and scores as the uninterrupted search, and evaluates no logged candidate again."""
    eval_cmd, requests = scorer
    out = tmp_path / "out"
    config = write_config(tmp_path / "evolve.yml", skill_models, eval_cmd, tmp_path / "cache", generations=SHORT)  # its own cache: real evaluations
    cmd = [sys.executable, "-m", "distmerge.cli", "evolve", str(config), str(out), "--device", "cpu", "--quiet"]
    proc = subprocess.Popen(cmd, env=child_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not ((out / "evolve.json").is_file() and len(json.loads((out / "evolve.json").read_text())["candidates"]) >= POPULATION + 2):
            assert proc.poll() is None, f"the search ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    logged = json.loads((out / "evolve.json").read_text())["candidates"]
    assert POPULATION + 2 <= len(logged) < SHORT * POPULATION, "killed outside generation 2"
    before = len(requests)
    r = run_main("evolve", config, out, "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr[-4000:]
    again = {os.path.basename(p.rstrip("/")) for p in requests[before:] if p.startswith(str(out))}
    assert not again & {f"c{c['index']:02d}" for c in logged if c["gen"] == 1}, "a logged candidate was evaluated again"
    assert not any("/000/" in p for p in requests[before:]), "generation 1 was evaluated again"
    assert candidates_of(out) == candidates_of(search, SHORT)
    mine = json.loads((out / "evolve.json").read_text())["best"]
    assert mine["model_hash"] == max((c for c in json.loads((search / "evolve.json").read_text())["candidates"] if c["gen"] < SHORT),
                                     key=lambda c: (c["score"], -c["gen"], -c["index"]))["model_hash"]  # fmt: skip
    assert model_hash(out / "best") == mine["model_hash"]


@slow
def test_two_ranks_give_the_same_candidates_and_scores(search, skill_models, scorer, tmp_path):
    eval_cmd, _ = scorer
    out = tmp_path / "out"
    config = write_config(tmp_path / "evolve.yml", skill_models, eval_cmd, tmp_path / "cache", generations=SHORT)  # its own cache: both ranks evaluate
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "distmerge.cli",
           "evolve", str(config), str(out), "--device", "cpu", "--quiet"]  # fmt: skip
    proc = subprocess.run(cmd, env=child_env({"MASTER_PORT": free_port()}), capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert candidates_of(out) == candidates_of(search, SHORT)
    log = json.loads((out / "evolve.json").read_text())
    assert {(c["index"] % 2, c["rank"]) for c in log["candidates"]} == {(0, 0), (1, 1)}, "rank r evaluates candidates r, r + 2, ..."
    assert not any(c["cached"] for c in log["candidates"])


def test_example_configs_load(tmp_path):
    root = REPO_ROOT / "configs"
    c = load_config(str(root / "evolve-skills.yml"))
    assert c.search == "parameters" and c.dim == 4 and c.objectives == {"reverse": 1.0, "lookup": 1.0}
    c = load_config(str(root / "evolve-mistral-gradients.yml"))
    assert c.dim == 5 + 5 + 1 and c.spec.tasks == ("arc_easy", "hellaswag")
    for name in ("reverse", "lookup"):  # the layer search reads each model's layer count
        (tmp_path / "skills" / name).mkdir(parents=True)
        (tmp_path / "skills" / name / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    (tmp_path / "c.yml").write_text((root / "evolve-frankenmerge.yml").read_text())
    c = load_config(str(tmp_path / "c.yml"))
    assert c.search == "layers" and c.dim == 8


@slow
def test_a_failed_evaluation_does_not_stop_the_search(skill_models, scorer, cache, tmp_path):
    """One candidate's evaluation fails (its command exits 1): it is logged with the error and
    scored as a failure (CMA-ES told the worst fitness), and the search goes on to the end."""
    eval_cmd = f"case {{model}} in */c01) echo no score for c01 >&2; exit 1;; esac; {scorer[0]}"
    config = write_config(tmp_path / "evolve.yml", skill_models, eval_cmd, cache, generations=1)
    data = yaml.safe_load(config.read_text()) | {"population": 3}
    config.write_text(yaml.safe_dump(data))
    r = run_main("evolve", config, tmp_path / "out", "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "scored as a failure" in r.stderr and "no score for c01" in r.stderr
    log = json.loads((tmp_path / "out" / "evolve.json").read_text())
    failed = [c for c in log["candidates"] if c["score"] is None]
    assert [(c["gen"], c["index"]) for c in failed] == [(0, 1)]
    assert all("exit status 1" in c["error"] and "no score for c01" in c["error"] for c in failed)
    assert [g["failed"] for g in log["generations"]] == [1]
    assert log["best"]["index"] != 1 and (tmp_path / "out" / "best" / "config.json").is_file()
