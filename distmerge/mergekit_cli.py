"""mergekit-yaml's command-line options, and what ``distmerge run`` does with each.

Users type mergekit-yaml's flags from habit. ``distmerge run`` accepts every one of them:
those with a meaning here are translated, the others are ignored with a warning saying why
they are not needed (never an error: a command line that worked with mergekit should work).
The README's table of options is this data.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MergekitOption:
    flag: str
    """As mergekit-yaml spells it, without the dashes (``cuda`` for --cuda/--no-cuda)."""
    kind: str
    """"bool" (--x/--no-x), "flag" (--x alone), "count" (-v, -vv), "int", "text", or "native"
    (distmerge has it too)."""
    distmerge: str
    """What distmerge does instead, for the warning and the README."""


OPTIONS = (
    MergekitOption("out-shard-size", "native", "`--out-shard-size` (also mergekit's forms: 5B, 500M, 100K, plain integers; counted in bytes, as mergekit does)"),
    MergekitOption("random-seed", "native", "`--random-seed`"),
    MergekitOption("device", "native", "`--device`"),
    MergekitOption("quiet", "native", "`--quiet`"),
    MergekitOption("cuda", "bool", "`--device cuda` (`--no-cuda`: `--device cpu`)"),
    MergekitOption("copy-tokenizer", "bool", "not needed: the tokenizer of `tokenizer_source` (else the base or first model) is always written"),
    MergekitOption("lazy-unpickle", "bool", "not needed: inputs are always read tensor by tensor"),
    MergekitOption("allow-crimes", "bool", "not needed: distmerge checks that the models' tensor names and shapes line up, not their architecture names"),
    MergekitOption("low-cpu-memory", "bool", "not needed: memory is bounded by one tensor's inputs"),
    MergekitOption("read-to-gpu", "bool", "not needed: with `--device cuda` inputs are staged to the GPU tensor by tensor"),
    MergekitOption("multi-gpu", "bool", "not needed here: run one rank per GPU with torchrun or srun"),
    MergekitOption("gpu-rich", "flag", "not needed: `--device cuda`, one rank per GPU with torchrun or srun"),
    MergekitOption("async-write", "bool", "not needed: writing always overlaps merging"),
    MergekitOption("write-threads", "int", "not needed: each rank writes on one background thread"),
    MergekitOption("num-threads", "int", "not needed: torch's intra-op threads are used (set OMP_NUM_THREADS to change them)"),
    MergekitOption("clone-tensors", "bool", "not needed: a layer used twice is written twice"),
    MergekitOption("safe-serialization", "bool", "not needed: the output is always safetensors"),
    MergekitOption("write-model-card", "bool", "not needed: a model card (README.md) is always written"),
    MergekitOption("unsafe-truncate-embeddings", "bool", "not supported: set `tokenizer_source` (or a `tokenizer:` block) to re-index the embeddings"),
    MergekitOption("trust-remote-code", "bool", "not needed: distmerge reads configs as JSON and never runs model code"),
    MergekitOption("transformers-cache", "text", "not needed: hub models go to the Hugging Face cache (set HF_HUB_CACHE to move it)"),
    MergekitOption("lora-merge-cache", "text", "not needed: LoRA adapters are applied while reading, no merged copy is written"),
    MergekitOption("lora-merge-dtype", "text", "not needed: an adapted weight is rounded to the weight's own dtype"),
    MergekitOption("v", "count", "not needed: progress and the run report are printed by default (`--quiet` silences them)"),
)
SHORT = {"num-threads": "-j"}
"""mergekit-yaml's one-letter aliases."""

FOREIGN = {o.flag: o for o in OPTIONS if o.kind != "native"}
"""The options ``distmerge run`` accepts only for mergekit's sake."""


def keyword(flag: str) -> str:
    """The keyword argument click passes a foreign option as."""
    return "mergekit_" + flag.replace("-", "_")


def warnings(given: dict[str, object]) -> list[str]:
    """One warning per foreign option given on the command line (values not None), saying
    what distmerge does instead. ``--cuda`` is translated by the caller, not warned about."""
    out = []
    for flag, option in FOREIGN.items():
        value = given.get(keyword(flag))
        if value is None or (option.kind in ("flag", "count") and not value) or flag == "cuda":
            continue
        spelled = "-v" if option.kind == "count" else f"--no-{flag}" if value is False else f"--{flag}"
        out.append(f"warning: {spelled} is a mergekit-yaml option; {option.distmerge.replace('`', '')}; ignored")
    return out


def markdown_table() -> str:
    """The README's table: every mergekit-yaml option and what distmerge does with it."""
    lines = ["| mergekit-yaml | distmerge |", "|---|---|"]
    for o in OPTIONS:
        spelled = "`-v`" if o.kind == "count" else f"`--{o.flag}`" + (f" / `--no-{o.flag}`" if o.kind == "bool" else "")
        spelled += f", `{SHORT[o.flag]}`" if o.flag in SHORT else ""
        lines.append(f"| {spelled} | {o.distmerge} |")
    return "\n".join(lines) + "\n"
