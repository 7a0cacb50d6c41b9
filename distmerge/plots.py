"""Plots of distmerge's logs (matplotlib, imported only when a plot is drawn)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def _name(path: str) -> str:
    return os.path.basename(path.rstrip("/")) or path


def soup_plot(path: Path, log: dict) -> None:
    """soup.png from soup.json's ``log``: the candidate's score at each greedy step (accepted:
    green dot, rejected: red cross), the soup's score as it grows, each ingredient's own score
    (grey), the final checkpoint (star) and the best ingredient as a line.

    The PNG's Description field holds the plotted steps as JSON (step, ingredient, score,
    accepted), so that a test or a script can read what the picture shows. Raises ImportError
    without matplotlib.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    own = {m: v["score"] for m, v in log["ingredients"].items()}
    steps, final = log["steps"], log.get("final") or {}
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * (len(steps) or len(own)) + 2), 3.6), dpi=100)
    if steps:
        xs = [s["step"] for s in steps]
        ax.step(xs, [s["soup_score"] for s in steps], where="post", color="tab:blue", label="soup")
        ax.scatter(xs, [s["ingredient_score"] for s in steps], color="0.6", s=18, label="ingredient alone", zorder=2)
        for s in steps:
            style = dict(color="tab:green", marker="o") if s["accepted"] else dict(color="tab:red", marker="x")
            ax.scatter([s["step"]], [s["score"]], s=40, zorder=3, **style)
        ax.scatter([], [], color="tab:green", marker="o", label="accepted")
        ax.scatter([], [], color="tab:red", marker="x", label="rejected")
        labels = [_name(s["ingredient"]) if s["step"] == 0 else "+" + _name(s["ingredient"]) for s in steps]
        title = f"greedy soup: {len(steps[-1]['soup'])} of {len(own)} ingredients"
    else:
        xs = list(range(len(own)))
        ax.scatter(xs, list(own.values()), color="0.6", s=18, label="ingredient alone", zorder=2)
        labels = [_name(m) for m in own]
        title = f"uniform soup of {len(own)} ingredients"
    if final.get("score") is not None:
        x = len(xs)
        ax.scatter([x], [final["score"]], marker="*", s=120, color="tab:purple", zorder=3, label="final")
        if not steps:
            ax.axhline(final["score"], color="tab:purple", lw=1, ls=":", label="uniform soup")
        xs, labels = xs + [x], labels + ["final"]
    if own:
        ax.axhline(max(own.values()), color="0.4", lw=1, ls="--", label="best ingredient")
    ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("score")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    shown = [{k: s[k] for k in ("step", "ingredient", "score", "accepted")} for s in steps]
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, metadata={"Description": json.dumps({"steps": shown, "final": final.get("score")})})
    plt.close(fig)
    os.replace(tmp, path)


def skills_plot(path: Path, rows: dict[str, dict[str, float]]) -> None:
    """A grouped bar chart of a skills table (distmerge.skills): one group per model, one bar
    per skill, exact match in percent. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(rows)
    skills = list(next(iter(rows.values())))
    width = 0.8 / len(skills)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(models) + 1.5), 3.6), dpi=100)
    for i, skill in enumerate(skills):
        xs = [m + (i - (len(skills) - 1) / 2) * width for m in range(len(models))]
        ax.bar(xs, [100 * rows[name][skill] for name in models], width, label=skill)
    ax.set_xticks(range(len(models)), models, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("exact match on held-out items (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, metadata={"Description": json.dumps(rows)})
    plt.close(fig)
    os.replace(tmp, path)


def evolve_plot(path: Path, log: dict) -> None:
    """evolve.png from evolve.json's ``log``: every candidate's score (grey dots; failures
    left out), each generation's mean and best, and the best so far, per generation.

    The PNG's Description field holds the plotted rows as JSON (gen, best, mean,
    best_so_far). Raises ImportError without matplotlib.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = log["generations"]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(rows) + 3), 3.6), dpi=100)
    scored = [c for c in log["candidates"] if c["score"] is not None and c["gen"] < len(rows)]
    ax.scatter([c["gen"] for c in scored], [c["score"] for c in scored], color="0.7", s=12, label="candidate", zorder=2)
    xs = [r["gen"] for r in rows]
    for key, style in (("mean", dict(color="tab:blue", marker="o")), ("best", dict(color="tab:green", marker="^")),
                       ("best_so_far", dict(color="tab:purple", ls="--"))):  # fmt: skip
        pts = [(x, r[key]) for x, r in zip(xs, rows) if r[key] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key.replace("_", " "), zorder=3, **style)
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness")
    ax.set_xticks(xs)
    ax.set_title(f"evolutionary merge: {len(rows)} generations, {len(scored)} candidates scored", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    shown = [{k: r[k] for k in ("gen", "best", "mean", "best_so_far")} for r in rows]
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, metadata={"Description": json.dumps(shown)})
    plt.close(fig)
    os.replace(tmp, path)
