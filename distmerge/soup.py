"""Model soups: the weight average of fine-tunes of one base, uniform or greedy.

Wortsman et al., "Model soups" (ICML 2022, https://arxiv.org/abs/2203.05482):

    uniform soup   S = (1/K) Σᵢ θᵢ over all K ingredients
    greedy soup    rank the ingredients by their own held-out score, S ← θ₍₁₎; then for each
                   next θ:  S' = (n·S + θ) / (n + 1)   (n: ingredients already in S)
                   and S ← S' when score(S') >= score(S) (the score "does not drop")

Each S' is a ``linear`` merge of two checkpoints, S with weight n and θ with weight 1, written
as a recipe and run by distmerge's own merge (:func:`distmerge.job.run_job`): it streams
tensor by tensor, reads only those two models, runs on every rank of the job and resumes from
its journal. Intermediate soups are float32, so that adding n ingredients one at a time rounds
in float32, not n times in bf16. They only decide *which* ingredients go in: the final
checkpoint is the one-shot ``linear`` merge, equal weights, of the accepted ingredients in
``soup.yaml``, so that ``distmerge run soup.yaml`` writes exactly its bytes.

OUT holds::

    soup.json        the log: ingredients' scores, each step (ingredient, scores, accepted?,
                     the candidate's content hash), the final checkpoint's score; rewritten
                     atomically after each score, and read back to resume
    soup.yaml        the mergekit recipe of the final checkpoint
    soup.png         the score at each step (needs matplotlib)
    steps/NN.yaml    the candidate of step NN and its recipe; only the current soup and the
    steps/NN/        candidate being built are kept (disk: two models at most)
    final/           the final checkpoint

Ranks: every rank calls :func:`run_soup`. Rank 0 runs the soup's logic (a generator that
yields the merges to run), evaluates and writes the log; every rank runs each merge. While
rank 0 evaluates, the other ranks wait on the rendezvous store watching its heartbeat
(:meth:`distmerge.dist.Group.wait_all`), not in a collective: an evaluation of any length does
not reach the process group's timeout, and a rank 0 that dies is noticed after ``--timeout``.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import yaml

from distmerge import dist
from distmerge.errors import MergeError
from distmerge.evaluate import EvalSpec, evaluate
from distmerge.job import JobOptions, run_job

LOG, RECIPE, PLOT, STEPS, FINAL = "soup.json", "soup.yaml", "soup.png", "steps", "final"
Merge = tuple[str, str]
"""(recipe path, output directory): one merge every rank runs."""


@dataclass(kw_only=True, slots=True)
class SoupOptions:
    greedy: bool = False
    """Greedy soup: add an ingredient only when the soup's score does not drop."""
    dtype: str | None = None
    """dtype of the final checkpoint (soup.yaml); None: the ingredients' own (mergekit's default)."""
    job: JobOptions = field(default_factory=JobOptions)
    """How each merge runs: device, shard size, timeout, quiet."""


@dataclass(kw_only=True)
class Step:
    """One step of the greedy soup, as soup.json logs it."""

    step: int
    ingredient: str
    ingredient_score: float
    score: float
    """The candidate soup's score (step 0: the best ingredient, alone)."""
    accepted: bool
    model_hash: str
    """Content hash of the candidate (:func:`distmerge.evaluate.model_hash`)."""
    soup: list[str]
    """The ingredients in the soup after this step."""
    soup_score: float
    soup_path: str
    """The checkpoint of the soup after this step."""


def check_ingredients(ingredients: list[str]) -> list[str]:
    """Absolute paths of the ingredients, or a MergeError saying which one is wrong."""
    if len(ingredients) < 2:
        raise MergeError(f"a soup needs at least 2 ingredients (fine-tunes of one base), got {len(ingredients)}; give more checkpoint directories")
    paths = []
    for ref in ingredients:
        path = os.path.abspath(ref)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise MergeError(f"ingredient {ref}: no checkpoint there ({path} has no config.json); give the directories of the fine-tunes")
        if path in paths:
            raise MergeError(f"ingredient {ref} is given twice; give each fine-tune once")
        paths.append(path)
    return paths


def fingerprint(ingredients: list[str], spec: EvalSpec | None, options: SoupOptions) -> dict:
    """What a rerun must repeat to resume this soup."""
    return {"greedy": options.greedy, "ingredients": ingredients, "eval": spec.key() if spec else None, "dtype": options.dtype}


def open_log(out: Path, print_: dict) -> dict:
    """The log of an earlier run with the same ingredients and evaluation, or a new one."""
    path = out / LOG
    if not path.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise MergeError(f"{out} is not empty and holds no {LOG}: it is not a soup's directory; give a new or empty OUT")
        return {"fingerprint": print_, "ingredients": {}, "steps": [], "final": None}
    log = json.loads(path.read_text())
    for key, what in (("greedy", "kind of soup (--greedy or not)"), ("ingredients", "ingredient list"),
                      ("eval", "evaluation (--eval-cmd or --tasks and their options)"), ("dtype", "--dtype")):  # fmt: skip
        if log["fingerprint"].get(key) != print_[key]:
            raise MergeError(f"{out} holds a soup made with a different {what}: rerun the same command to resume it, or give a new OUT")
    return log


def save_log(out: Path, log: dict) -> None:
    """Write soup.json whole or not at all (a kill leaves the previous version)."""
    fd, tmp = tempfile.mkstemp(dir=out, prefix=LOG + ".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(log, f, indent=1)
    os.replace(tmp, out / LOG)


def write_recipe(path: Path, weights: dict[str, float], dtype: str | None) -> str:
    """A mergekit ``linear`` recipe: Σ wᵢ θᵢ / Σ wᵢ over ``weights`` (model path -> wᵢ)."""
    recipe = {
        "merge_method": "linear",
        "models": [{"model": m, "parameters": {"weight": w}} for m, w in weights.items()],
        "parameters": {"normalize": True},
    }
    if dtype:
        recipe["dtype"] = dtype
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


def prune(out: Path, keep: set[str]) -> None:
    """Delete the candidates in OUT/steps but ``keep``: rejected ones and superseded soups."""
    for p in sorted((out / STEPS).glob("*")):
        if str(p.with_suffix("")) not in keep:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def score_ingredients(out: Path, log: dict, ingredients: list[str], spec: EvalSpec, say) -> dict[str, float]:
    """Each ingredient's own score (from the log, else evaluated), logged."""
    for m in ingredients:
        if m not in log["ingredients"]:
            r = evaluate(m, spec, log=say)
            log["ingredients"][m] = {"score": r.score, "model_hash": r.model_hash}
            save_log(out, log)
    return {m: log["ingredients"][m]["score"] for m in ingredients}


def greedy(out: Path, ingredients: list[str], spec: EvalSpec, options: SoupOptions, say) -> Iterator[Merge]:
    """The greedy soup, on rank 0: yields each merge for every rank to run, scores it after."""
    log = open_log(out, fingerprint(ingredients, spec, options))
    scores = score_ingredients(out, log, ingredients, spec, say)
    order = sorted(ingredients, key=lambda m: -scores[m])  # stable: ties keep the order given
    steps = [Step(**s) for s in log["steps"]]
    if not steps:
        first = order[0]
        steps.append(Step(step=0, ingredient=first, ingredient_score=scores[first], score=scores[first], accepted=True,
                          model_hash=log["ingredients"][first]["model_hash"], soup=[first], soup_score=scores[first],
                          soup_path=first))  # fmt: skip
        _log_step(out, log, steps[-1], len(order), say)
    for k, theta in enumerate(order[1:], start=1):
        if k < len(steps):
            continue  # logged by an earlier run
        soup, n = steps[-1], len(steps[-1].soup)
        candidate = out / STEPS / f"{k:02d}"
        prune(out, {soup.soup_path, str(candidate)})
        # S' = (n·S + θ) / (n + 1), in float32
        yield write_recipe(candidate.with_suffix(".yaml"), {soup.soup_path: n, theta: 1}, "float32"), str(candidate)
        r = evaluate(candidate, spec, log=say)
        accepted = r.score >= soup.soup_score
        steps.append(Step(step=k, ingredient=theta, ingredient_score=scores[theta], score=r.score, accepted=accepted,
                          model_hash=r.model_hash, soup=soup.soup + [theta] if accepted else soup.soup,
                          soup_score=r.score if accepted else soup.soup_score,
                          soup_path=str(candidate) if accepted else soup.soup_path))  # fmt: skip
        _log_step(out, log, steps[-1], len(order), say)
    prune(out, {steps[-1].soup_path})
    yield from finish(out, log, steps[-1].soup, spec, options, say)


def _log_step(out: Path, log: dict, step: Step, total: int, say) -> None:
    log["steps"].append(asdict(step))
    save_log(out, log)
    verdict = "accepted" if step.accepted else "rejected"
    say(f"soup step {step.step}/{total - 1}: + {step.ingredient} (own score {step.ingredient_score:.4f}): "
        f"{step.score:.4f} -> {verdict}; the soup has {len(step.soup)} ingredient(s), score {step.soup_score:.4f}")  # fmt: skip
    plot(out, log, say)


def uniform(out: Path, ingredients: list[str], spec: EvalSpec | None, options: SoupOptions, say) -> Iterator[Merge]:
    """The uniform soup, on rank 0: one merge of every ingredient, equal weights."""
    log = open_log(out, fingerprint(ingredients, spec, options))
    if spec:
        score_ingredients(out, log, ingredients, spec, say)
    yield from finish(out, log, ingredients, spec, options, say)


def finish(out: Path, log: dict, soup: list[str], spec: EvalSpec | None, options: SoupOptions, say) -> Iterator[Merge]:
    """soup.yaml (S = mean of ``soup``, in the final dtype), the final checkpoint, its score."""
    yield write_recipe(out / RECIPE, {m: 1.0 for m in soup}, options.dtype), str(out / FINAL)
    final = {"path": str(out / FINAL), "soup": soup, "score": None, "model_hash": None}
    if spec:
        r = evaluate(out / FINAL, spec, log=say)
        final.update(score=r.score, model_hash=r.model_hash)
    log["final"] = final
    save_log(out, log)
    plot(out, log, say)
    score = f", score {final['score']:.4f}" if spec else ""
    say(f"soup of {len(soup)} of {len(log['fingerprint']['ingredients'])} ingredients{score}: {out / FINAL} (recipe {out / RECIPE})")


def plot(out: Path, log: dict, say) -> None:
    """soup.png; nothing without matplotlib (run_soup said so once, at the start)."""
    from distmerge.plots import soup_plot

    try:
        soup_plot(out / PLOT, log)
    except ImportError:
        pass


def run_soup(out: str, ingredients: list[str], spec: EvalSpec | None, options: SoupOptions, say: Callable[[str], None]) -> dict | None:
    """Build the soup in ``out`` as this rank of the job; returns the log on rank 0 (None elsewhere).

    One process group serves the whole soup: every merge joins it (``dist.init`` reuses it).
    """
    if options.greedy and spec is None:
        raise MergeError("a greedy soup needs a score: give --eval-cmd or --tasks (see distmerge eval)")
    ingredients = check_ingredients(ingredients)
    out_dir = Path(out).absolute()
    group = dist.init(options.job.device, options.job.timeout_s)
    try:
        if group.rank == 0:
            if importlib.util.find_spec("matplotlib") is None:
                say(f"warning: no {PLOT}: install matplotlib (pip install 'distmerge[plot]'); the log {LOG} is written")
            out_dir.mkdir(parents=True, exist_ok=True)
            jobs = (greedy if options.greedy else uniform)(out_dir, ingredients, spec, options, say)
        for i in itertools.count():
            job = group.on_rank0(f"soup-{i}", lambda: next(jobs, None))
            if job is None:
                break
            run_job(job[0], job[1], options.job)
        return json.loads((out_dir / LOG).read_text()) if group.rank == 0 else None
    finally:
        group.close()
