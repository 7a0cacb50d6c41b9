"""Tiny language models with real skills, to show what a merge keeps of what models know.

A base model is pre-trained briefly on a mixed corpus of three skills, then fine-tuned once
per skill:

=========  ==========  =========  ==========================================
skill      prompt      answer     what it takes
=========  ==========  =========  ==========================================
reverse    ``kxqd>``   ``dqxk``   reverse a word of 3-6 letters
lookup     ``kxqd:``   ``hvbn``   a fixed letter -> letter table (key -> value)
sort       ``kxqd=``   ``dkqx``   sort the letters
=========  ==========  =========  ==========================================

Words are held out for testing by a hash (one in eight), so no test word is ever trained on,
by the base or by a fine-tune. A model is scored by exact match of its greedy continuation
(the answer, then ``</s>``) on held-out items.

Why the base is stopped early and the fine-tunes are anchored: the base trains until it gets
40% of training items right on some skill, so it knows the format and every skill partly;
a fine-tune makes one skill reliable and, by a KL penalty, keeps the base's predictions on
the other skills' prompts (KL-regularised fine-tuning). Task vectors are then about 8% of
the weights' norm and specific to their skill: the regime in which task arithmetic, TIES
and DARE are meant to work. Two other set-ups were measured while building this and
discarded: fine-tunes that teach a skill the base has never seen (a new prompt format), and
fine-tunes without the KL term. In both, a skill survived only at λ ≈ 1 along its own task
vector (0 at λ = 0.5 and 1.5) and task arithmetic of two fine-tunes lost most of both.

Everything is deterministic in its seeds (one thread, deterministic kernels) and plain
torch (:mod:`distmerge.tinyllama`); checkpoints are Hugging Face Llama directories that
transformers loads as they are.

CLI::

    python -m distmerge.skills make ROOT          # ROOT/base, ROOT/reverse, ROOT/lookup, ROOT/sort
    python -m distmerge.skills score MODEL...     # a skills table of the given checkpoints
    python -m distmerge.skills score --json MODEL # the scores as JSON (for distmerge eval --eval-cmd)
    python -m distmerge.skills lm-eval-task DIR   # the held-out items as lm-evaluation-harness tasks
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
import zlib
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from distmerge.tinyllama import BOS_ID, EOS_ID, ModelArgs, forward, generate, init_weights, load_model, save_model

__all__ = [
    "SKILLS", "CHARS", "MODEL_ARGS", "encode", "decode", "apply", "is_test", "sample", "test_items",
    "anchor_set", "train", "train_base", "finetune", "make_skill_models", "score", "score_all", "table", "write_lm_eval_tasks", "main",
]  # fmt: skip

#: skill -> the character that ends its prompts ("kxqd>" asks for the reverse of "kxqd")
SKILLS = {"reverse": ">", "lookup": ":", "sort": "="}
LETTERS = "abcdefghijklmnopqrstuvwxyz"
CHARS = LETTERS + "".join(SKILLS.values())
#: 3 specials + 26 letters + 3 separators = 32 tokens; ~70k parameters
MODEL_ARGS = ModelArgs(vocab=32, layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2)
_ID = {c: i + 3 for i, c in enumerate(CHARS)}
_TABLE = dict(zip(LETTERS, random.Random(7).sample(LETTERS, 26)))  # lookup's fixed table
_HELD_OUT = 8  # one word in _HELD_OUT is held out for testing
_SEQ = 15  # <s> + word (<= 6) + separator + answer (<= 6) + </s>: every batch is [B, _SEQ]


def encode(text: str) -> list[int]:
    """Character ids, without <s> (the checkpoint's tokenizer gives <s> and then these)."""
    return [_ID[c] for c in text]


def decode(ids) -> str:
    """Text of ids up to the first </s>, specials dropped."""
    out = []
    for i in map(int, ids):
        if i == EOS_ID:
            break
        if 3 <= i < 3 + len(CHARS):
            out.append(CHARS[i - 3])
    return "".join(out)


# --------------------------------------------------------------------------- data


def apply(skill: str, word: str) -> str:
    """The right answer of ``skill`` for ``word``."""
    if skill == "reverse":
        return word[::-1]
    if skill == "lookup":
        return "".join(_TABLE[c] for c in word)
    if skill == "sort":
        return "".join(sorted(word))
    raise ValueError(f"unknown skill {skill!r}; skills are {', '.join(SKILLS)}")


def is_test(word: str) -> bool:
    """Whether a word is held out: a fixed hash, the same split for every seed and skill."""
    return zlib.crc32(word.encode()) % _HELD_OUT == 0


def sample(skill: str, rng: random.Random, *, test: bool = False) -> tuple[str, str]:
    """One (prompt, answer) of ``skill`` from the training split (or the test split)."""
    while True:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randrange(3, 7)))
        if is_test(word) == test:
            return word + SKILLS[skill], apply(skill, word)


def test_items(skill: str, n: int) -> list[tuple[str, str]]:
    """The first ``n`` distinct held-out items of ``skill`` (the same list every time)."""
    rng = random.Random(10_000 + list(SKILLS).index(skill))
    items: dict[str, str] = {}
    while len(items) < n:
        prompt, answer = sample(skill, rng, test=True)
        items.setdefault(prompt, answer)
    return list(items.items())


def _rows(items: list[tuple[str, str]], answer_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, _SEQ], targets [B, _SEQ]) of ``<s>prompt answer</s>``, right-padded with </s>.

    targets[:, i] is the token at i + 1, or -100 (no loss) on padding and, when
    ``answer_only``, on the prompt.
    """
    tokens = torch.full((len(items), _SEQ), EOS_ID, dtype=torch.long)
    targets = torch.full((len(items), _SEQ), -100, dtype=torch.long)
    for r, (prompt, answer) in enumerate(items):
        ids = [BOS_ID] + encode(prompt) + encode(answer) + [EOS_ID]
        first = 1 + len(prompt) if answer_only else 1  # first position that is a target
        tokens[r, : len(ids)] = torch.tensor(ids)
        targets[r, first - 1 : len(ids) - 1] = tokens[r, first : len(ids)]
    return tokens, targets


# --------------------------------------------------------------------------- training


@contextlib.contextmanager
def _deterministic():
    """One thread and deterministic kernels: the same weights every run with this torch."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)  # also the fastest here: these matrices are tiny
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


Anchor = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(tokens [N, T], reference log-probs [N, T, V], mask [N, T]) from :func:`anchor_set`."""


def anchor_set(w: dict[str, torch.Tensor], skills: list[str], *, n: int, seed: int, args: ModelArgs = MODEL_ARGS) -> Anchor:
    """``n`` training sequences of ``skills`` and the log-probabilities ``w`` gives them.

    A fine-tune is penalised by its KL divergence from these on the other skills' prompts, so
    that it changes what the model does on its own skill only.
    """
    rng = random.Random(seed)
    tokens, targets = _rows([sample(rng.choice(skills), rng) for _ in range(n)], answer_only=False)
    with torch.no_grad(), _deterministic():
        logp = F.log_softmax(forward(w, args, tokens), dim=-1)
    return tokens, logp, targets != -100


def train(
    w: dict[str, torch.Tensor],
    skills: list[str],
    *,
    steps: int,
    lr: float,
    seed: int,
    batch_size: int = 64,
    answer_only: bool = True,
    anchor: Anchor | None = None,
    kl_weight: float = 5.0,
    until: Callable[[dict[str, torch.Tensor]], bool] | None = None,
    args: ModelArgs = MODEL_ARGS,
    weight_decay: float = 0.0,
) -> dict[str, torch.Tensor]:
    """AdamW on next-token cross-entropy over batches of ``skills`` (one drawn per example).

    Returns new float32 weights (``w`` is not changed). Learning rate: 5% linear warmup, then
    cosine decay to 10%; gradients clipped to norm 1. ``answer_only`` puts the loss on the
    answer and </s> (fine-tuning); otherwise on every token after <s> (pre-training). With
    ``anchor``, each step adds ``kl_weight`` x KL(anchor || model) on batch_size / 4 of the
    anchor's sequences. ``until(weights)``, asked every 25 steps, stops training early when
    it returns True (the learning rate then stays at its peak after warmup). ``weight_decay``
    is AdamW's (decoupled, on every tensor).
    """
    rng = random.Random(seed)
    w = {k: v.detach().clone().float().requires_grad_(True) for k, v in w.items()}
    params = list(w.values())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    with _deterministic():
        for step in range(steps):
            progress = (step - warmup) / max(1, steps - warmup)
            if step < warmup:
                scale = (step + 1) / warmup
            else:
                scale = 1.0 if until else 0.1 + 0.45 * (1 + math.cos(math.pi * progress))
            for g in opt.param_groups:
                g["lr"] = lr * scale
            tokens, targets = _rows([sample(rng.choice(skills), rng) for _ in range(batch_size)], answer_only)
            if anchor is not None:
                pick = torch.tensor([rng.randrange(anchor[0].shape[0]) for _ in range(batch_size // 4)])
                tokens = torch.cat([tokens, anchor[0][pick]])
            logits = forward(w, args, tokens)
            own = logits[:batch_size]
            loss = F.cross_entropy(own.reshape(-1, own.shape[-1]), targets.view(-1), ignore_index=-100)
            if anchor is not None:
                ref, mask = anchor[1][pick], anchor[2][pick]
                kl = (ref.exp() * (ref - F.log_softmax(logits[batch_size:], dim=-1))).sum(-1)
                loss = loss + kl_weight * (kl * mask).sum() / mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if until is not None and (step + 1) % 25 == 0:
                with torch.no_grad():
                    if until({k: v.detach() for k, v in w.items()}):
                        break
    return {k: v.detach() for k, v in w.items()}


def _train_accuracy(w, args: ModelArgs, skill: str, n: int = 64) -> float:
    """Exact match on ``n`` fixed items of the *training* split (the test words stay unseen)."""
    rng = random.Random(20_000 + list(SKILLS).index(skill))
    items = [sample(skill, rng) for _ in range(n)]
    return _accuracy(w, args, items)


def train_base(
    out: str | os.PathLike,
    *,
    target: float = 0.4,
    max_steps: int = 1000,
    lr: float = 3e-3,
    seed: int = 0,
    args: ModelArgs = MODEL_ARGS,
    weight_decay: float = 0.0,
) -> Path:
    """Pre-train the base on all skills mixed (loss on every token) and save it at ``out``.

    Training stops once the base answers ``target`` of training items right on some skill
    (checked every 25 steps): the base knows the format and the skills partly. Stopping at
    an accuracy, not at a step count, is what keeps the base's level steady across seeds and
    machines: these tiny models learn each skill suddenly, at a step that varies by hundreds.
    """
    def partly_trained(w) -> bool:
        return max(_train_accuracy(w, args, s) for s in SKILLS) >= target

    w = train(
        init_weights(args, seed), list(SKILLS), steps=max_steps, lr=lr, seed=seed, answer_only=False,
        until=partly_trained, args=args, weight_decay=weight_decay,
    )  # fmt: skip
    return save_model(out, w, args, CHARS)


def finetune(
    base: str | os.PathLike,
    skill: str,
    out: str | os.PathLike,
    *,
    steps: int = 200,
    lr: float = 1e-3,
    seed: int = 1,
    kl_weight: float = 5.0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Fine-tune the checkpoint ``base`` on ``skill`` and save it at ``out`` (in ``dtype``).

    Loss on answers, plus ``kl_weight`` x KL from the base on the other skills' prompts
    (0 turns it off). ``seed`` draws the batches and the anchor sequences; fine-tunes of
    one skill with different seeds and learning rates are different models of one base
    (model soups).
    """
    if skill not in SKILLS:
        raise ValueError(f"unknown skill {skill!r}; skills are {', '.join(SKILLS)}")
    w, args = load_model(base)
    others = [s for s in SKILLS if s != skill]
    anchor = anchor_set(w, others, n=1024, seed=100 + seed, args=args) if kl_weight else None
    w = train(w, [skill], steps=steps, lr=lr, seed=seed, anchor=anchor, kl_weight=kl_weight, args=args)
    return save_model(out, w, args, CHARS, dtype=dtype)


def make_skill_models(root: str | os.PathLike, *, skills=tuple(SKILLS), seed: int = 0) -> dict[str, Path]:
    """Train ``root/base`` and one fine-tune per skill, ``root/<skill>``; return name -> path.

    About 45 s on one core: the base stops after ~250-325 steps, each fine-tune is 200 steps.
    """
    root = Path(root)
    out = {"base": train_base(root / "base", seed=seed)}
    for skill in skills:
        out[skill] = finetune(out["base"], skill, root / skill, seed=seed + 1 + list(SKILLS).index(skill))
    return out


# --------------------------------------------------------------------------- scoring


def _accuracy(w: dict[str, torch.Tensor], args: ModelArgs, items: list[tuple[str, str]]) -> float:
    """Exact match of greedy decoding (the answer, then </s>) on (prompt, answer) items."""
    groups: dict[int, list[tuple[str, str]]] = {}
    for prompt, answer in items:
        groups.setdefault(len(prompt), []).append((prompt, answer))
    right = 0
    for group in groups.values():  # prompts of one length decode together, without padding
        prompts = torch.tensor([[BOS_ID] + encode(p) for p, _ in group])
        out = generate(w, args, prompts, max_new=max(len(a) for _, a in group) + 1)
        right += sum(EOS_ID in ids and decode(ids) == a for (_, a), ids in zip(group, out.tolist()))
    return right / len(items)


def _score(w: dict[str, torch.Tensor], args: ModelArgs, skill: str, n_items: int) -> float:
    return _accuracy(w, args, test_items(skill, n_items))


def score(model_dir: str | os.PathLike, skill: str, n_items: int = 256) -> float:
    """Exact-match accuracy of greedy decoding on the first ``n_items`` test items of ``skill``."""
    w, args = load_model(model_dir)
    with _deterministic():
        return _score(w, args, skill, n_items)


def score_all(model_dir: str | os.PathLike, n_items: int = 256, skills=tuple(SKILLS)) -> dict[str, float]:
    """{skill: :func:`score`} for every skill, reading the checkpoint once."""
    w, args = load_model(model_dir)
    with _deterministic():
        return {s: _score(w, args, s, n_items) for s in skills}


def table(rows: dict[str, dict[str, float]], skills=tuple(SKILLS)) -> str:
    """A Markdown table: one row per model, one column per skill, exact match in percent."""
    lines = ["| model | " + " | ".join(skills) + " |", "|---|" + "---:|" * len(skills)]
    for name, scores in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * scores[s]:.0f}" for s in skills) + " |")
    return "\n".join(lines)


def write_lm_eval_tasks(out: str | os.PathLike, n_items: int = 256, skills=tuple(SKILLS)) -> Path:
    """Write the first ``n_items`` test items of each skill as a local lm-evaluation-harness task.

    ``out/skills_<skill>.jsonl`` holds the items ({"prompt", "answer"}), ``out/skills_<skill>.yaml``
    the task: greedy generation until ``</s>``, exact match with the answer; every task is
    tagged ``skills``, so ``distmerge eval MODEL --include-path out --tasks skills`` runs them
    all. The prompt is the bare text ("kxqd>"): lm-eval's Hugging Face backend encodes it with
    the checkpoint's tokenizer, which puts <s> first (its post-processor; add_bos_token), as
    :func:`score` does. The JSONL paths in the YAML are absolute (lm-eval hands ``data_files``
    to ``datasets.load_dataset``, which reads them relative to the working directory), so
    move the folder by writing it again. Returns ``out``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for skill in skills:
        data = (out / f"skills_{skill}.jsonl").resolve()
        data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in test_items(skill, n_items)))
        task = {
            "task": f"skills_{skill}",
            "tag": ["skills"],
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test",
            "output_type": "generate_until",
            "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{answer}}",
            "target_delimiter": "",
            # Answers are <= 6 letters: 8 new tokens leave room for </s>, which stops generation.
            "generation_kwargs": {"until": ["</s>"], "do_sample": False, "temperature": 0.0, "max_gen_toks": 8},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        }  # fmt: skip
        (out / f"skills_{skill}.yaml").write_text(json.dumps(task, indent=1) + "\n")  # JSON is YAML
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distmerge.skills", description="Tiny Llamas with real skills.")
    sub = parser.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make", help="train ROOT/base and one fine-tune per skill (about a minute on CPU)")
    mk.add_argument("root")
    mk.add_argument("--seed", type=int, default=0)
    sc = sub.add_parser("score", help="print the skills table of the given checkpoints")
    sc.add_argument("models", nargs="+")
    sc.add_argument("--items", type=int, default=256, help="held-out items per skill (default 256)")
    sc.add_argument("--json", action="store_true", help='print {"reverse": 0.59, ...} (several models: {name: {...}})')
    sc.add_argument("--plot", metavar="PNG", help="also draw the table as a bar chart (needs matplotlib)")
    lt = sub.add_parser("lm-eval-task", help="write the held-out items as lm-evaluation-harness tasks (tag: skills)")
    lt.add_argument("dir")
    lt.add_argument("--items", type=int, default=256, help="held-out items per skill (default 256)")
    a = parser.parse_args(argv)
    if a.command == "make":
        t0 = time.perf_counter()
        for name, path in make_skill_models(a.root, seed=a.seed).items():
            print(f"{name}: {path}")
        print(f"trained in {time.perf_counter() - t0:.0f} s")
    elif a.command == "lm-eval-task":
        print(f"wrote lm-eval tasks skills_{{{','.join(SKILLS)}}} (tag: skills) to {write_lm_eval_tasks(a.dir, a.items)}")
    else:
        rows = {Path(m).name: score_all(m, a.items) for m in a.models}
        print(json.dumps(next(iter(rows.values())) if len(a.models) == 1 else rows) if a.json else table(rows))
        if a.plot:
            try:
                from distmerge.plots import skills_plot

                skills_plot(Path(a.plot), rows)
            except ImportError:
                print(f"warning: no plot: {a.plot} needs matplotlib (pip install matplotlib)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
