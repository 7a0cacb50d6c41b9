"""Evolutionary merging: search a merge recipe by evolution, as in Akiba et al., "Evolutionary
optimization of model merging recipes" (Sakana AI, Nature Machine Intelligence 2025,
https://arxiv.org/abs/2403.13187). Two search spaces (``search:``), in :mod:`distmerge.genome`:
``parameters``, CMA-ES over the numbers of a recipe template; ``layers``, a genetic algorithm
over the layer path of a passthrough frankenmerge (the paper's data-flow space; why a GA:
see there).

Fitness: :func:`distmerge.evaluate.evaluate` (lm-eval tasks or an ``--eval-cmd``), cached by
the candidate's content. With ``objectives: {metric: weight, ...}`` the score is the weighted
mean Σ wᵢ·mᵢ / Σ wᵢ of those metrics of the evaluation's result (a scalarisation); without,
the evaluation's own score. An evaluation that fails is logged with its error and scored as
the worst possible (it is never selected; CMA-ES is told a fitness worse than any real one).

One generation, every rank: rank 0 asks the search for the generation's candidates and
writes them as ONE multi-document recipe (a named document per candidate), which
:func:`distmerge.job.run_job` merges with ``keep_intermediates``: each input is read once
for all candidates (``distmerge.graph``), on every rank. Then the candidates are evaluated
in parallel, evaluator k (ranks r with r % ranks_per_eval == 0) taking candidates k, k + E,
...; each result goes to the rendezvous store and rank 0 logs it (the other ranks wait on
the store watching rank 0's heartbeat, as soups do).

Resume: ``evolve.json`` is rewritten atomically after every candidate scored. A rerun replays
the log: the search is recreated from its seed, each logged generation asked again (the
asked genomes must equal the logged ones: else the config or the search code changed) and
told the logged scores; nothing is pickled. The current generation's merge resumes from its
journal and its scored candidates are not evaluated again (and the evaluation cache has the
rest that finished). The same seed gives the same candidates, on any number of ranks.

OUT holds::

    evolve.json        the log: every candidate's genome, recipe values, content hash, score,
                       metrics or error; per generation best, mean, search state, seconds
    best.yaml          the best candidate's recipe, plain mergekit YAML
    best/              the best checkpoint (merged from best.yaml at the end)
    generations.md     a table of the generations (and generations.csv)
    evolve.png         best and mean fitness per generation (needs matplotlib)
    gens/NNN.yaml      the current generation's recipe, and its candidates in gens/NNN/
"""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import yaml

from distmerge import dist
from distmerge.errors import MergeError
from distmerge.evaluate import EvalSpec, evaluate, model_hash
from distmerge.genome import Gene, find_genes, gene_values, genome_recipe, layer_path, make_search
from distmerge.job import JobOptions, run_job

LOG, BEST_RECIPE, BEST, TABLE, CSV, PLOT, GENS = "evolve.json", "best.yaml", "best", "generations.md", "generations.csv", "evolve.png", "gens"
SPACES = ("parameters", "layers")
FAILED = -math.inf
"""The score of a candidate whose evaluation failed: below every real score."""
EVAL_KEYS = {f: f for f in ("tasks", "include_path", "eval_cmd", "metric", "backend", "device", "batch_size", "limit", "model_args", "cache_dir")}
CONFIG_KEYS = {"search", "recipe", "models", "repeats", "dtype", "population", "generations", "seed", "sigma", "mutation",
               "eval", "objectives", "ranks_per_eval", "out"}  # fmt: skip


@dataclass(kw_only=True, slots=True)
class EvolveConfig:
    search: str
    """"parameters" (CMA-ES over a recipe template's genes) or "layers" (a GA over a layer path)."""
    recipe: dict | None = None
    """parameters: the recipe template, with model paths made absolute."""
    genes: list[Gene] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    """layers: the models whose layers the path is made of (absolute paths)."""
    layers: list[int] = field(default_factory=list)
    """layers: each model's number of layers."""
    repeats: int = 1
    """layers: r, how many times the models' layers are offered in a row."""
    dtype: str | None = None
    """layers: the frankenmerge's dtype."""
    population: int = 8
    generations: int = 4
    seed: int = 0
    sigma: float = 0.25
    """CMA-ES's initial step size, in units of each gene's range."""
    mutation: float | None = None
    """GA: probability of flipping each bit; default 1/T."""
    spec: EvalSpec
    objectives: dict[str, float] | None = None
    """metric -> weight; the score is their weighted mean. None: the evaluation's score."""
    ranks_per_eval: int = 1
    """Ranks (GPUs) per evaluation: lm-eval with vLLM tensor_parallel_size=N wants N."""
    out: str | None = None

    @property
    def dim(self) -> int:
        return sum(g.width for g in self.genes) if self.search == "parameters" else self.repeats * sum(self.layers)

    def fingerprint(self) -> dict:
        """What a rerun must repeat to resume (``generations`` may grow: more of the same search)."""
        what = {"search": self.search, "recipe": self.recipe, "models": self.models, "layers": self.layers, "repeats": self.repeats,
                "dtype": self.dtype, "population": self.population, "seed": self.seed, "sigma": self.sigma, "mutation": self.mutation,
                "objectives": self.objectives, "eval": self.spec.key()}  # fmt: skip
        return json.loads(json.dumps(what))


# --------------------------------------------------------------------------- config


def _bad(path: str, what: str) -> MergeError:
    return MergeError(f"evolve config {path}: {what}")


def _abs_models(node, base: Path):
    """The template with each model path that exists next to the config made absolute."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k in ("model", "base_model") and isinstance(v, str) and (base / v).is_dir():
                v = str((base / v).resolve())
            out[k] = _abs_models(v, base)
        return out
    if isinstance(node, list):
        return [_abs_models(v, base) for v in node]
    return node


def _layer_count(model: str, where: str) -> int:
    try:
        n = json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"]
    except (OSError, ValueError, KeyError) as e:
        raise _bad(where, f"model {model}: no config.json with num_hidden_layers ({type(e).__name__}); give local checkpoint directories") from None
    return int(n)


def _int(d: dict, key: str, default: int, lo: int, where: str) -> int:
    v = d.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise _bad(where, f"{key}: {v!r}; give an integer >= {lo}")
    return v


def parse_config(data, base_dir: str = ".", where: str = "config") -> EvolveConfig:
    """The EvolveConfig of a config's YAML data; MergeError (one line) for anything wrong."""
    if not isinstance(data, dict):
        raise _bad(where, "not a mapping; see configs/evolve-skills.yml for the format")
    unknown = set(data) - CONFIG_KEYS
    if unknown:
        raise _bad(where, f"unknown key(s) {', '.join(sorted(map(str, unknown)))}; the keys are {', '.join(sorted(CONFIG_KEYS))}")
    search = data.get("search")
    if search not in SPACES:
        raise _bad(where, f"search: {search!r}; give search: parameters (CMA-ES over a recipe's genes) or search: layers (a GA over a layer path)")
    ev = data.get("eval")
    if not isinstance(ev, dict):
        raise _bad(where, "no eval: section; give eval: {eval_cmd: 'CMD {model}'} or eval: {tasks: [TASK, ...]} (the options of distmerge eval)")
    bad = set(ev) - set(EVAL_KEYS)
    if bad:
        raise _bad(where, f"eval: unknown key(s) {', '.join(sorted(map(str, bad)))}; the keys are {', '.join(EVAL_KEYS)}")
    tasks = ev.get("tasks") or ()
    tasks = tuple(t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if str(t).strip())
    if bool(tasks) == bool(ev.get("eval_cmd")):
        raise _bad(where, "eval: give either tasks (lm-eval) or eval_cmd (a command that prints a score), " + ("not both" if tasks else "one of them"))
    if ev.get("eval_cmd") and "{model}" not in ev["eval_cmd"]:
        raise _bad(where, f"eval: eval_cmd {ev['eval_cmd']!r} has no {{model}}; write where the checkpoint's path goes")
    spec = EvalSpec(**{k: v for k, v in ev.items() if k != "tasks"}, tasks=tasks)
    objectives = data.get("objectives")
    if objectives is not None:
        if not (isinstance(objectives, dict) and objectives and all(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in objectives.values())):
            raise _bad(where, f"objectives: {objectives!r}; give a mapping metric: weight with positive weights, e.g. {{reverse: 1, lookup: 1}}")
        objectives = {str(k): float(w) for k, w in objectives.items()}
    sigma = data.get("sigma", 0.25)
    if not (isinstance(sigma, (int, float)) and 0 < sigma <= 1):
        raise _bad(where, f"sigma: {sigma!r}; give CMA-ES's step size in (0, 1], in units of each gene's range")
    mutation = data.get("mutation")
    if mutation is not None and not (isinstance(mutation, (int, float)) and 0 < mutation < 1):
        raise _bad(where, f"mutation: {mutation!r}; give the probability of flipping each bit, in (0, 1)")
    base = Path(base_dir)
    config = EvolveConfig(
        search=search, spec=spec, objectives=objectives, population=_int(data, "population", 8, 2, where),
        generations=_int(data, "generations", 4, 1, where), seed=_int(data, "seed", 0, 0, where), sigma=float(sigma),
        mutation=None if mutation is None else float(mutation), ranks_per_eval=_int(data, "ranks_per_eval", 1, 1, where),
        repeats=_int(data, "repeats", 1, 1, where), dtype=data.get("dtype"), out=data.get("out"),
    )  # fmt: skip
    if search == "parameters":
        if not isinstance(data.get("recipe"), dict):
            raise _bad(where, "search: parameters needs recipe: a mergekit recipe in which some numbers are genes, {evolve: [lo, hi]}")
        for key in ("models", "repeats"):
            if key in data:
                raise _bad(where, f"{key}: is for search: layers; with search: parameters the models are the recipe's")
        config.recipe = _abs_models(data["recipe"], base)
        try:
            config.genes = find_genes(config.recipe)
        except MergeError as e:
            raise _bad(where, f"recipe: {e}") from None
        if not config.genes:
            raise _bad(where, "recipe: has no gene; write {evolve: [lo, hi]} where a number is to be searched, e.g. weight: {evolve: [0, 1]}")
        _check_recipe(config, where)
    else:
        models = data.get("models")
        if "recipe" in data:
            raise _bad(where, "recipe: is for search: parameters; search: layers builds passthrough recipes from models:")
        if not (isinstance(models, list) and models and all(isinstance(m, str) for m in models)):
            raise _bad(where, "search: layers needs models: a list of checkpoint directories whose layers the path is made of")
        config.models = [str((base / m).resolve()) if (base / m).is_dir() else m for m in models]
        config.layers = [_layer_count(m, where) for m in config.models]
    return config


def _check_recipe(config: EvolveConfig, where: str) -> None:
    """Refuse a template whose middle candidate is not a valid recipe, before anything is merged."""
    from distmerge.recipe import parse_recipe

    try:
        parse_recipe(yaml.safe_dump(genome_recipe(config, [0.5] * config.dim)), source="recipe")
    except MergeError as e:
        raise _bad(where, str(e)) from None


def load_config(path: str) -> EvolveConfig:
    from distmerge.safe_yaml import load_yaml

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise MergeError(f"cannot read evolve config {path}: {e.strerror or e}") from None
    data = load_yaml(text, f"evolve config {path}")
    return parse_config(data, os.path.dirname(os.path.abspath(path)), path)


# --------------------------------------------------------------------------- the log


def save_json(path: Path, obj) -> None:
    """Write JSON whole or not at all (a kill leaves the previous version)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def scalarise(metrics: dict[str, float], score: float, objectives: dict[str, float] | None) -> float:
    """Σ wᵢ·metricᵢ / Σ wᵢ over ``objectives`` ("." read as "/"), or ``score`` without objectives."""
    if not objectives:
        return score
    total = 0.0
    for name, w in objectives.items():
        key = name if name in metrics else name.replace(".", "/")
        if key not in metrics:
            raise MergeError(f"objective {name!r}: the evaluation has no such metric; it has {', '.join(list(metrics)[:8]) or 'none'}")
        total += w * metrics[key]
    return total / sum(objectives.values())


def evaluate_candidate(path: str, spec: EvalSpec, objectives: dict[str, float] | None, say) -> dict:
    """A candidate's result: score (FAILED when the evaluation failed), metrics, error, hash."""
    t0 = time.perf_counter()
    digest = model_hash(path)
    try:
        r = evaluate(path, spec, log=say)
    except MergeError as e:
        say(f"evaluation of {path} failed, scored as a failure: {e}")
        return {"model_hash": digest, "score": None, "metrics": {}, "error": str(e), "eval_seconds": time.perf_counter() - t0, "cached": False}
    score = scalarise(r.metrics, r.score, objectives)
    return {"model_hash": digest, "score": score, "metrics": r.metrics, "error": None, "eval_seconds": time.perf_counter() - t0, "cached": r.cached}


def score_of(c: dict) -> float:
    return FAILED if c["score"] is None else c["score"]


class Evolution:
    """The search on rank 0: the log, the replay, the generations' recipes, the outputs."""

    def __init__(self, out: Path, config: EvolveConfig, say):
        self.out, self.config, self.say = out, config, say
        self.search = make_search(config)
        path = out / LOG
        if path.is_file():
            self.log = json.loads(path.read_text())
            if self.log["fingerprint"] != config.fingerprint():
                old = self.log["fingerprint"]
                diff = ", ".join(k for k in old if old[k] != config.fingerprint().get(k))
                raise MergeError(f"{out} holds a search with a different config ({diff}); rerun with the same config to resume it, or give a new OUT")
        else:
            if out.is_dir() and any(out.iterdir()):
                raise MergeError(f"{out} is not empty and holds no {LOG}: it is not a search's directory; give a new or empty OUT")
            out.mkdir(parents=True, exist_ok=True)
            self.log = {"fingerprint": config.fingerprint(), "candidates": [], "generations": [], "best": None}
        self.gen = 0
        self.current: list = []

    def logged(self, gen: int) -> dict[int, dict]:
        return {c["index"]: c for c in self.log["candidates"] if c["gen"] == gen}

    def next_generation(self) -> dict | None:
        """Ask for the next generation not yet told (replaying logged ones); its merge and
        evaluation tasks, or None when the search is done."""
        while self.gen < self.config.generations:
            genomes = self.search.ask()
            logged = self.logged(self.gen)
            for i, c in logged.items():
                if c["genome"] != genomes[i]:
                    raise MergeError(f"{self.out / LOG}: generation {self.gen} candidate {i} was logged with another genome than this search asks for now "
                                     "(a different cma or distmerge version?); give a new OUT to start again")  # fmt: skip
            self.current = genomes
            if len(logged) == len(genomes) and self.gen < len(self.log["generations"]):
                self.search.tell([score_of(logged[i]) for i in range(len(genomes))])
                self.gen += 1
                continue
            return self._tasks(genomes, logged)
        return None

    def _tasks(self, genomes: list, logged: dict[int, dict]) -> dict:
        g, gdir = self.gen, self.out / GENS / f"{self.gen:03d}"
        recipes = [genome_recipe(self.config, x) for x in genomes]
        todo = [i for i, r in enumerate(recipes) if r is not None and i not in logged]
        self.say(f"generation {g + 1}/{self.config.generations}: {len(genomes)} candidates, {len(todo)} to merge and evaluate")
        for i, r in enumerate(recipes):
            if r is None and i not in logged:  # an empty layer path: nothing to merge or evaluate
                self.record(g, i, {"model_hash": None, "score": None, "metrics": {}, "error": "the layer path is empty", "eval_seconds": 0.0, "cached": False, "rank": 0})
        names = [f"c{i:02d}" for i, r in enumerate(recipes) if r is not None]
        task = {"gen": g, "recipe": None, "out": None, "keep": str(gdir), "dirs": {i: str(gdir / f"c{i:02d}") for i in todo}, "todo": todo}
        if todo:
            docs = [{"name": f"c{i:02d}", **r} for i, r in enumerate(recipes) if r is not None]
            path = self.out / GENS / f"{g:03d}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
            task.update(recipe=str(path), out=str(gdir / names[-1]))
        return task

    def record(self, gen: int, index: int, result: dict) -> None:
        genome = self.current[index]
        entry = {"gen": gen, "index": index, "genome": genome, "values": self.values(genome), **result}
        self.log["candidates"].append(entry)
        self.log["candidates"].sort(key=lambda c: (c["gen"], c["index"]))
        save_json(self.out / LOG, self.log)
        shown = "failed" if result["score"] is None else f"{result['score']:.4f}"
        self.say(f"  candidate {gen}.{index}: {shown}  {json.dumps(entry['values'])}")

    def values(self, genome: list):
        """What a genome means, for people: the genes' values, or the layer path."""
        if self.config.search == "parameters":
            return gene_values(self.config, genome)
        return [f"{Path(self.config.models[m]).name}:{layer}" for m, layer in layer_path(self.config, genome)]

    def finish_generation(self, seconds: dict) -> None:
        logged = self.logged(self.gen)
        scores = [score_of(logged[i]) for i in range(len(self.current))]
        self.search.tell(scores)
        finite = [s for s in scores if math.isfinite(s)]
        best_so_far = max((score_of(c) for c in self.log["candidates"]), default=FAILED)
        row = {"gen": self.gen, "best": max(finite) if finite else None, "mean": sum(finite) / len(finite) if finite else None,
               "failed": len(scores) - len(finite), "best_so_far": best_so_far if math.isfinite(best_so_far) else None,
               "search": self.search.state(), **seconds}  # fmt: skip
        self.log["generations"] = self.log["generations"][: self.gen] + [row]
        save_json(self.out / LOG, self.log)
        shutil.rmtree(self.out / GENS / f"{self.gen:03d}", ignore_errors=True)
        (self.out / GENS / f"{self.gen:03d}.yaml").unlink(missing_ok=True)
        self.say(f"generation {self.gen + 1}: best {_fmt(row['best'])}, mean {_fmt(row['mean'])}, best so far {_fmt(row['best_so_far'])}")
        self.write_tables()
        self.gen += 1

    def best(self) -> dict:
        scored = [c for c in self.log["candidates"] if c["score"] is not None]
        if not scored:
            raise MergeError("every candidate's evaluation failed (see the errors in evolve.json); fix the evaluation and rerun")
        return max(scored, key=lambda c: (c["score"], -c["gen"], -c["index"]))  # ties: the earliest

    def write_best_recipe(self) -> str:
        best = self.best()
        if self.log["best"] and self.log["best"]["model_hash"] != best["model_hash"]:
            shutil.rmtree(self.out / BEST, ignore_errors=True)  # a continued search found a better one
        path = self.out / BEST_RECIPE
        path.write_text(yaml.safe_dump(genome_recipe(self.config, best["genome"]), sort_keys=False))
        return str(path)

    def finish(self, best_result: dict, seconds: float) -> None:
        best = self.best()
        self.log["best"] = {"gen": best["gen"], "index": best["index"], "score": best["score"], "values": best["values"],
                            "model_hash": best["model_hash"], "path": str(self.out / BEST), "recipe": str(self.out / BEST_RECIPE),
                            "rebuilt_hash": best_result["model_hash"], "rebuilt_score": best_result["score"], "final_seconds": seconds}  # fmt: skip
        save_json(self.out / LOG, self.log)
        shutil.rmtree(self.out / GENS, ignore_errors=True)
        self.write_tables()
        self.say(f"best: generation {best['gen']} candidate {best['index']}, score {best['score']:.4f}: {self.out / BEST} (recipe {self.out / BEST_RECIPE})")

    def write_tables(self) -> None:
        rows = self.log["generations"]
        cols = ["gen", "best", "mean", "best_so_far", "failed", "merge_seconds", "eval_seconds"]
        lines = ["| generation | best | mean | best so far | failed | merge s | eval s |", "|---:|---:|---:|---:|---:|---:|---:|"]
        lines += ["| " + " | ".join(_fmt(r.get(c)) if c != "gen" else str(r["gen"]) for c in cols) + " |" for r in rows]
        (self.out / TABLE).write_text("\n".join(lines) + "\n")
        with open(self.out / CSV, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            w.writerows([[r.get(c) for c in cols] for r in rows])
        try:
            from distmerge.plots import evolve_plot

            evolve_plot(self.out / PLOT, self.log)
        except ImportError:
            pass


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


# --------------------------------------------------------------------------- ranks


def evaluators(world_size: int, ranks_per_eval: int) -> int:
    """How many candidates are evaluated at once: one per group of ``ranks_per_eval`` ranks."""
    return max(1, world_size // ranks_per_eval)


def my_candidates(todo: list[int], rank: int, world_size: int, ranks_per_eval: int) -> list[int]:
    """The candidates this rank evaluates: evaluator k = rank / ranks_per_eval (the first rank of
    each group) takes todo[k], todo[k + E], ... (E evaluators); the group's other ranks none."""
    if rank % ranks_per_eval or rank // ranks_per_eval >= evaluators(world_size, ranks_per_eval):
        return []
    return todo[rank // ranks_per_eval :: evaluators(world_size, ranks_per_eval)]


def rank_spec(spec: EvalSpec, env: dist.Env, ranks_per_eval: int) -> EvalSpec:
    """The evaluation as this rank runs it: "cuda" becomes this rank's local GPU (the cache key
    leaves the device out, so every rank shares the cache); with ranks_per_eval > 1, the child
    sees its group's GPUs (CUDA_VISIBLE_DEVICES)."""
    if ranks_per_eval > 1:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(env.local_world_size)]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids[env.local_rank : env.local_rank + ranks_per_eval])
        return replace(spec, device="cuda:0") if spec.device == "cuda" else spec
    return replace(spec, device=f"cuda:{env.local_rank}") if spec.device == "cuda" else spec


def _key(gen: int, i: int) -> str:
    return f"distmerge-evolve/{gen}/{i}"


def run_evolve(config: EvolveConfig, out: str, job: JobOptions, say: Callable[[str], None]) -> dict | None:
    """Run (or resume) the search into ``out`` as this rank of the job; the log on rank 0."""
    out_dir = Path(out).absolute()
    group = dist.init(job.device, job.timeout_s)
    try:
        opened: list[Evolution] = []

        def open_search() -> None:  # on rank 0; a refusal (another search's OUT) stops every rank
            if importlib.util.find_spec("matplotlib") is None:
                say(f"warning: no {PLOT}: install matplotlib (pip install 'distmerge[plot]'); the log {LOG} is written")
            opened.append(Evolution(out_dir, config, say))

        group.on_rank0("evolve-open", open_search)
        evo = opened[0] if opened else None
        spec = rank_spec(config.spec, group.env, config.ranks_per_eval)
        start = time.perf_counter()
        for step in itertools.count():
            task = group.on_rank0(f"evolve-ask-{step}", evo.next_generation if evo else lambda: None)
            if task is None:
                break
            t0 = time.perf_counter()
            if task["recipe"]:
                run_job(task["recipe"], task["out"], replace(job, keep_intermediates=task["keep"]))
                group.wait_all(f"evolve-merged-{step}")  # rank 0 finishes the outputs (index, config) before it returns
            t1 = time.perf_counter()
            try:
                for i in my_candidates(task["todo"], group.rank, group.world_size, config.ranks_per_eval):
                    result = evaluate_candidate(task["dirs"][i], spec, config.objectives, say if evo else _stderr) | {"rank": group.rank}
                    if evo:
                        evo.record(task["gen"], i, result)
                        _drain(group, evo, task)
                    else:
                        group.store.set(_key(task["gen"], i), json.dumps(result))
            except BaseException as e:  # not a failed evaluation (that is a score): stop every rank now
                group.abort(str(e) if isinstance(e, MergeError) else f"{type(e).__name__}: {e}")
                raise
            group.wait_all(f"evolve-eval-{step}")
            if evo:
                _drain(group, evo, task)
            seconds = {"merge_seconds": t1 - t0, "eval_seconds": time.perf_counter() - t1}
            group.on_rank0(f"evolve-tell-{step}", lambda: evo.finish_generation(seconds) if evo else None)
        # the best checkpoint, from best.yaml alone: what `distmerge run best.yaml` writes
        recipe = group.on_rank0("evolve-best", evo.write_best_recipe if evo else lambda: None)
        t0 = time.perf_counter()
        run_job(recipe, str(out_dir / BEST), job)
        if evo:
            evo.finish(evaluate_candidate(str(out_dir / BEST), spec, config.objectives, say), time.perf_counter() - t0)
            say(f"search took {time.perf_counter() - start:.1f} s")
            return evo.log
        return None
    finally:
        group.close()


def _drain(group: dist.Group, evo: Evolution, task: dict) -> None:
    """Log the results other ranks have put in the store (rank 0)."""
    if group.store is None:
        return
    have = evo.logged(task["gen"])
    for i in task["todo"]:
        if i not in have and group.store.check([_key(task["gen"], i)]):
            evo.record(task["gen"], i, json.loads(group.store.get(_key(task["gen"], i))))


def _stderr(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)
