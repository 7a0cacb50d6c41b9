"""Merges that do something: tiny models with real skills, merged through the CLI.

The session trains (distmerge.skills, about 45 s of one core) a base that knows three skills
partly and one fine-tune per skill, merges them with ``distmerge run`` and scores every
model by exact match of greedy decoding on 256 held-out items per skill. Each claim is a
predicate with its threshold, checked on the real merge and, to show it has teeth, shown to
fail on a merge that is wrong the way a bug would make it.

The thresholds: every gap asserted here held with at least 4 points to spare for each of
three seeds of the whole pipeline (0, the fixture's, and 1, 2), and DARE's for four
``--random-seed`` values each. One item is 0.4 points.

Measured but not asserted, because it does not hold at this scale:
- TIES does not *beat* task arithmetic here; with ``normalize: false`` it matches it (-2 to
  +5 points). With mergekit's default ``normalize: true`` it averages the deltas whose
  signs agree, and half a task vector is not enough for a skill: 4-17 points below.
- DARE-TIES at density 0.5 and 0.7 is 2-30 points below task arithmetic: random drops
  and the 1/density rescale add noise a 70k-parameter model has no redundancy to absorb.
- Negating the *reverse* task vector costs the other skills 10-28 points (negating lookup
  or sort costs them 1-10): reversal needs new attention patterns, quadratic in τ.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from distmerge import skills
from distmerge.tinyllama import BOS_ID, forward, init_weights, load_model
from tests.skills_fixtures import TRAIN_SECONDS, skill_merge, skill_models  # noqa: F401  (fixtures)

N_ITEMS = 256
A, B = "reverse", "lookup"  # the pair merged; "sort" is a third skill no merge below includes

# --------------------------------------------------------------------------- the claims

LEARNS = 0.25  # a fine-tune beats the base on its skill by at least this
COMBINES = 0.20  # a merge of A and B beats the base on both by at least this
DARE_COMBINES = 0.15  # the same for DARE-TIES, which loses points here (see the docstring)
FORGETS = 0.5  # negating τ leaves at most this fraction of the base's score on its skill
KEEPS = 0.12  # ... and costs any other skill at most this (measured: 2-7 points)
AS_GOOD = 0.06  # TIES is as good as task arithmetic to within this (measured: -2 to +5)


def learns(ft: dict, base: dict, skill: str) -> bool:
    return ft[skill] >= base[skill] + LEARNS


def combines(merged: dict, base: dict, margin: float = COMBINES) -> bool:
    return all(merged[s] >= base[s] + margin for s in (A, B))


def forgets(negated: dict, base: dict, skill: str) -> bool:
    others = [s for s in skills.SKILLS if s != skill]
    return negated[skill] <= FORGETS * base[skill] and all(negated[s] >= base[s] - KEEPS for s in others)


def as_good(merged: dict, ta: dict) -> bool:
    return all(merged[s] >= ta[s] - AS_GOOD for s in (A, B))


# --------------------------------------------------------------------------- merges


def recipe(method: str, weights: dict[str, float], density: float | None = None, **parameters) -> dict:
    """A float32 recipe over the fixture's models, named by relative paths (``base``,
    ``reverse``...): run from the models' directory, DARE's masks, which distmerge keys by
    tensor and model name, are the same in every session."""
    models = []
    for name, w in weights.items():
        p = {"weight": w} | ({"density": density} if density is not None else {})
        models.append({"model": name, "parameters": p})
    r = {"merge_method": method, "base_model": "base", "dtype": "float32", "models": models}
    return r | ({"parameters": parameters} if parameters else {})


#: name -> recipe of every merge the table shows
RECIPES = {
    "task_arithmetic": recipe("task_arithmetic", {A: 1.0, B: 1.0}),
    f"negate {B}": recipe("task_arithmetic", {B: -1.0}),
    "ties d0.5": recipe("ties", {A: 1.0, B: 1.0}, density=0.5, normalize=False),
    "ties d0.7": recipe("ties", {A: 1.0, B: 1.0}, density=0.7, normalize=False),
    "dare_ties d0.5": recipe("dare_ties", {A: 1.0, B: 1.0}, density=0.5),
    "dare_ties d0.7": recipe("dare_ties", {A: 1.0, B: 1.0}, density=0.7),
    "task_arithmetic bf16": recipe("task_arithmetic", {A: 1.0, B: 1.0}) | {"dtype": "bfloat16"},
    # broken on purpose: B's weight lost (0), as a dropped model or a zeroed weight would
    f"broken: {B} weight 0": recipe("task_arithmetic", {A: 1.0, B: 0.0}),
}


@pytest.fixture(scope="module")
def scores(skill_models, skill_merge) -> dict[str, dict[str, float]]:
    rows = {name: skills.score_all(path, N_ITEMS) for name, path in skill_models.items()}
    cwd = skill_models["base"].parent

    def merge(name: str):
        return skill_merge(name.replace(" ", "_").replace(":", ""), RECIPES[name], cwd=cwd)

    with ThreadPoolExecutor(2) as pool:  # two merges at a time: most of each is starting Python
        merged = dict(zip(RECIPES, pool.map(merge, RECIPES)))
    for name, path in merged.items():
        rows[name] = skills.score_all(path, N_ITEMS)
    print(f"\ntrained in {TRAIN_SECONDS.get('skill_models', float('nan')):.0f} s\n" + skills.table(rows))
    if os.environ.get("DISTMERGE_SKILLS_TABLE"):
        with open(os.environ["DISTMERGE_SKILLS_TABLE"], "w") as f:
            json.dump(rows, f, indent=1)
    return rows


# --------------------------------------------------------------------------- the checkpoints


@pytest.mark.slow
def test_checkpoint_is_a_transformers_llama(skill_models):
    """transformers loads the base as it is: same logits as distmerge.tinyllama, same tokens."""
    transformers = pytest.importorskip("transformers")
    path = skill_models["base"]
    model = transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    prompts = [p + a for p, a in skills.test_items("reverse", 4) + skills.test_items("lookup", 4)]
    w, args = load_model(path)
    for text in prompts:
        ids = tok(text)["input_ids"]
        assert ids == [BOS_ID] + skills.encode(text), text
        assert tok.decode(ids, skip_special_tokens=True) == text
        x = torch.tensor([ids])
        with torch.no_grad():
            theirs = model(x).logits
            ours = forward(w, args, x)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_held_out_words_are_never_trained_on():
    rng = __import__("random").Random(0)
    train_words = {skills.sample("sort", rng)[0][:-1] for _ in range(5000)}
    test_words = {p[:-1] for s in skills.SKILLS for p, _ in skills.test_items(s, N_ITEMS)}
    assert all(skills.is_test(w) for w in test_words)
    assert not train_words & test_words
    assert skills.test_items("lookup", 50) == skills.test_items("lookup", 50)


def test_training_is_deterministic():
    w0 = init_weights(skills.MODEL_ARGS, 3)
    a = skills.train(w0, ["reverse"], steps=6, lr=1e-3, seed=5, batch_size=8)
    b = skills.train(w0, ["reverse"], steps=6, lr=1e-3, seed=5, batch_size=8)
    c = skills.train(w0, ["reverse"], steps=6, lr=1e-3, seed=6, batch_size=8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# --------------------------------------------------------------------------- the merges


@pytest.mark.slow
@pytest.mark.parametrize("skill", list(skills.SKILLS))
def test_each_finetune_learns_its_skill(scores, skill):
    assert learns(scores[skill], scores["base"], skill), skills.table(scores)


@pytest.mark.slow
def test_task_arithmetic_combines_two_skills(scores):
    assert combines(scores["task_arithmetic"], scores["base"]), skills.table(scores)
    assert combines(scores["task_arithmetic bf16"], scores["base"]), skills.table(scores)
    # teeth: the same recipe with B's weight lost does not pass
    assert not combines(scores[f"broken: {B} weight 0"], scores["base"])


@pytest.mark.slow
def test_negating_a_task_vector_removes_that_skill_only(scores):
    base = scores["base"]
    assert base[B] >= 0.15, "the base must know some of the skill for a drop to show"
    assert forgets(scores[f"negate {B}"], base, B), skills.table(scores)
    # teeth: a merge that lost the sign (weight +1) is the fine-tune itself
    assert not forgets(scores[B], base, B)


@pytest.mark.slow
@pytest.mark.parametrize("density", [0.5, 0.7])
def test_ties_is_as_good_as_task_arithmetic(scores, density):
    ties = scores[f"ties d{density}"]
    assert combines(ties, scores["base"]) and as_good(ties, scores["task_arithmetic"]), skills.table(scores)
    assert not as_good(scores[f"broken: {B} weight 0"], scores["task_arithmetic"])


@pytest.mark.slow
@pytest.mark.parametrize("density", [0.5, 0.7])
def test_dare_ties_combines_two_skills(scores, density):
    assert combines(scores[f"dare_ties d{density}"], scores["base"], DARE_COMBINES), skills.table(scores)


@pytest.mark.slow
def test_score_plot_draws_the_table(skill_models, tmp_path, capsys):
    """``skills score --plot``: the table printed, and the same numbers drawn (read back from the PNG)."""
    pytest.importorskip("matplotlib")
    from PIL import Image

    png = tmp_path / "skills.png"
    assert skills.main(["score", str(skill_models["base"]), str(skill_models["lookup"]), "--items", "16", "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    rows = {name: skills.score_all(skill_models[name], 16) for name in ("base", "lookup")}
    assert printed.strip() == skills.table(rows)
    with Image.open(png) as im:
        assert im.size[0] >= 400
        assert json.loads(im.text["Description"]) == rows
