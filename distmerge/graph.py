"""The job's graph: every checkpoint a recipe file asks for, and the stages each is computed from.

A recipe file of one document is one output. Several documents are a multi-stage recipe in
mergekit-multi's format: a document's ``name`` is a model for the documents after it, and the
unnamed document (else the last) is the final output. Unlike mergekit-multi, which writes each
stage to disk and reads it back, distmerge plans a stage as a virtual model: the final plan's
inputs from a stage are that stage's output tensors, computed in the same pass from the
stage's own inputs and rounded to its output dtype exactly as its checkpoint would hold them
(``distmerge.tensor_merge``). ``keep_intermediates`` also writes every named stage as an
ordinary checkpoint, from the same pass. A ``sweep:`` makes one document several outputs.

Each output (a ``Target``) has an ordinary, self-contained ``Plan`` (with the plans of the
stages it reads in ``Plan.stages``), so resume and verify work per output as they do for
one. ``work_units`` groups the outputs' tensors so that the tensors that share inputs are
merged together, reading each input once.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass

from distmerge.errors import MergeError
from distmerge import methods
from distmerge.plan import DEFAULT_SHARD_BYTES, Plan, assign, build_plan, estimated_seconds, stage_plans, tensor_flops, work_key
from distmerge.recipe import Recipe, sweep_variants
from distmerge.sources import Checkpoint, TensorInfo, load_checkpoint

FINAL, INTERMEDIATE, VARIANT = "final", "intermediate", "variant"
"""Where a target goes: the output directory; ``--keep-intermediates DIR``/name; the output directory/name."""


@dataclass(slots=True)
class Target:
    """One checkpoint the job writes."""

    name: str
    """The document's name, a sweep variant's name, or "" for an unnamed final document."""
    role: str
    """FINAL, INTERMEDIATE or VARIANT: where it is written (``out_dir``)."""
    plan: Plan

    def out_dir(self, out: str, keep_dir: str | None = None) -> str:
        if self.role == INTERMEDIATE:
            return os.path.join(keep_dir or "", self.name)
        return os.path.join(out, self.name) if self.role == VARIANT else out


@dataclass(slots=True)
class Graph:
    targets: list[Target]
    stages: list[str]
    """Every stage the targets are computed from, in the order they are planned."""

    @property
    def fingerprint(self) -> str:
        """What every rank must agree on: each target's role, name and plan."""
        parts = [(t.role, t.name, t.plan.fingerprint) for t in self.targets]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    @property
    def single(self) -> bool:
        """One output, no stages: a plain recipe."""
        return len(self.targets) == 1 and not self.targets[0].plan.stages

    def to_dict(self) -> dict:
        return {"targets": [{"name": t.name, "role": t.role, "plan": t.plan.to_dict()} for t in self.targets], "stages": self.stages}

    @classmethod
    def from_dict(cls, d: dict) -> "Graph":
        return cls([Target(t["name"], t["role"], Plan.from_dict(t["plan"])) for t in d["targets"]], d["stages"])

    @property
    def peak_memory(self) -> int:
        """Working memory per rank: the largest tensor's merge, plus, held until a unit of
        work is written, one tensor of every output and of every stage (the largest each)."""
        plans = [t.plan for t in self.targets]
        every = {p.fingerprint: p for p in plans + [s for p in plans for s in stage_plans(p)]}
        if len(every) == 1:
            return plans[0].peak_memory
        held = sum(max((t.nbytes for t in p.tensors), default=0) for p in every.values())
        return max(p.peak_memory for p in every.values()) + held


def build_graph(
    recipes: list[Recipe],
    text: str = "",
    *,
    keep_intermediates: bool = False,
    out_shard_bytes: int = DEFAULT_SHARD_BYTES,
    seed: int = 0,
    allow_pickle: bool = False,
    local_only: bool = False,
    source: str = "recipe",
) -> Graph:
    """Plan every output of a recipe file (``recipe.parse_recipes``) from headers alone.

    MergeError, before anything is read, for: a stage no output needs (without
    ``keep_intermediates``), a cycle of stages, a stage named with a revision or adapter, a
    model that is neither a stage nor found (naming the stages when a name is close), and,
    prefixed with the stage's name, anything its own plan refuses.
    """
    kw = dict(out_shard_bytes=out_shard_bytes, seed=seed)
    if len(recipes) == 1 and not recipes[0].name:
        return _single(recipes[0], text, kw, allow_pickle, local_only)
    by_name = {r.name: r for r in recipes if r.name}
    final = next((r for r in recipes if not r.name), recipes[-1])
    for r in recipes:
        if r.sweep and r is not final:
            raise MergeError(f"{source}: stage {r.name!r} has a sweep; only the final document may sweep parameters")
        for ref in r.model_refs():
            stem = ref.split("+")[0].split("@")[0]
            if stem in by_name and stem != ref:
                raise MergeError(f"{source}: {_label(r)} names the stage {stem!r} as {ref!r}; a stage is named by its name alone")
    order = _order(final, by_name, source)
    unused = [r.name for r in recipes if r is not final and r.name not in order]
    if keep_intermediates:
        for name in unused:  # each after the stages it reads
            order += [n for n in [*_order(by_name[name], by_name, source), name] if n not in order]
    plans: dict[str, Plan] = {}
    cache: dict[str, Checkpoint] = {}
    for name in order:
        plans[name] = _plan_stage(by_name[name], plans, cache, kw, allow_pickle, local_only, source, by_name)
    # (the final document is never also an intermediate, even when another stage reads it)
    targets = [Target(name, INTERMEDIATE, plans[name]) for name in order if keep_intermediates and name != final.name]
    variants = sweep_variants(final) if final.sweep else [(final.name or "", final)]
    for name, recipe in variants:
        plan = plans.get(final.name) if not final.sweep and final.name in plans else None
        plan = plan or _plan_stage(recipe, plans, cache, kw, allow_pickle, local_only, source, by_name, text if not final.sweep else recipe.text)
        targets.append(Target(name, VARIANT if final.sweep else FINAL, plan))
    if unused and not keep_intermediates:  # (after planning: a misspelt stage name is reported as such)
        raise MergeError(
            f"{source}: the final document does not use the stage(s) {', '.join(map(repr, unused))}, so they would not be "
            "written: pass --keep-intermediates DIR to write every named stage, or remove them"
        )
    return Graph(targets, order)


def _single(recipe: Recipe, text: str, kw: dict, allow_pickle: bool, local_only: bool) -> Graph:
    if not recipe.sweep:
        return Graph([Target("", FINAL, build_plan(recipe, text, allow_pickle=allow_pickle, local_only=local_only, **kw))], [])
    cache = {ref: load_checkpoint(ref, recipe.base_dir, allow_pickle, local_only) for ref in recipe.model_refs()}
    return Graph(
        [Target(name, VARIANT, build_plan(r, r.text, checkpoints=cache, **kw)) for name, r in sweep_variants(recipe)], []
    )


def _label(r: Recipe) -> str:
    return f"stage {r.name!r}" if r.name else "the final document"


def _order(final: Recipe, by_name: dict[str, Recipe], source: str) -> list[str]:
    """The stages ``final`` needs, each after the stages it reads (depth first, document
    order among siblings); MergeError naming a cycle."""
    order: list[str] = []
    path: list[str] = []

    def visit(r: Recipe) -> None:
        for ref in r.model_refs():
            if ref not in by_name or ref in order:
                continue
            if ref in path or ref == r.name:
                cycle = path[path.index(ref) :] + [ref] if ref in path else [ref, ref]
                raise MergeError(f"{source}: the stages {' -> '.join(map(repr, cycle))} form a cycle: each needs the other's output first")
            path.append(ref)
            visit(by_name[ref])
            path.pop()
            order.append(ref)

    if final.name:
        path.append(final.name)
    visit(final)
    return order


def _plan_stage(
    recipe: Recipe, plans: dict[str, Plan], cache: dict, kw: dict, allow_pickle: bool, local_only: bool,
    source: str, by_name: dict[str, Recipe], text: str | None = None,
) -> Plan:  # fmt: skip
    """One document's plan, its stage models described by their plans."""
    checkpoints = {}
    for ref in recipe.model_refs():
        if ref in plans:
            checkpoints[ref] = stage_checkpoint(ref, plans[ref])
        elif ref not in cache:
            try:
                cache[ref] = load_checkpoint(ref, recipe.base_dir, allow_pickle, local_only)
            except MergeError as e:
                close = difflib.get_close_matches(ref, list(by_name), n=1, cutoff=0.6)
                hint = f" (did you mean the stage {close[0]!r}? the stages are {', '.join(map(repr, by_name))})" if close else ""
                raise MergeError(f"{source}: {_label(recipe)}: {e}{hint}") from None
        if ref not in plans:
            checkpoints[ref] = cache[ref]
    stages = {ref: plans[ref] for ref in checkpoints if ref in plans}
    try:
        return build_plan(recipe, recipe.text if text is None else text, checkpoints=checkpoints, stages=stages, **kw)
    except MergeError as e:
        raise MergeError(f"{source}: {_label(recipe)}: {e}") from None


STAGE_FILE = "<stage>"
"""The ``file`` of a stage's tensors: computed, never read."""


def stage_checkpoint(name: str, plan: Plan) -> Checkpoint:
    """A stage as the planner sees a model: its output tensors (names, dtypes, shapes) and
    config, and a directory holding the small files its checkpoint would have (config,
    generation config, tokenizer: what a later stage's tokenizer merge and finish read).

    The tensors come in the order ``load_checkpoint`` finds them in the written checkpoint
    (its index's names sorted, grouped by file), so that the plan reading the stage is the
    plan a staged run makes, tensor for tensor."""
    by_name = {t.name: t for t in plan.tensors}
    file_of = {name: f.name for f in plan.files for name in f.tensors}
    files: dict[str, list[str]] = {}
    for name in sorted(by_name):
        files.setdefault(file_of[name], []).append(name)
    tensors = {}
    for name in (n for names in files.values() for n in names):
        t = by_name[name]
        tensors[name] = TensorInfo(STAGE_FILE, t.dtype, tuple(t.shape), 0, t.nbytes)
    return Checkpoint(ref=name, path=stage_dir(plan), config=plan.config, tensors=tensors)


def stage_dir(plan: Plan) -> str:
    """A directory of the stage's small files, named by its plan's fingerprint (made once
    per machine: every rank and every later run finds the same files there)."""
    from distmerge.output import finish_files
    from distmerge.state import INDEX_FILE

    root = os.path.join(tempfile.gettempdir(), f"distmerge-stages-{os.getuid()}")
    path = os.path.join(root, plan.fingerprint[:32])
    if os.path.isdir(path):
        return path
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=".tmp-")
    for name, data in finish_files(plan).items():
        if name not in (INDEX_FILE, "README.md"):
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
    try:
        os.rename(tmp, path)
    except OSError:  # another rank made it first: the same files
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path


# ---------------------------------------------------------------- work units


@dataclass(slots=True)
class Unit:
    """Output tensors merged together because they read the same inputs: one tensor name
    across the targets (a sweep's variants, a stage and the final output that reads it), an
    fp8 output's values and scales counting as the one tensor they come from (``plan.work_key``)."""

    name: str
    members: list[tuple[int, int]]
    """(target index, tensor index) pairs."""
    cost: int
    """Estimated nanoseconds (as ``plan.tensor_cost``): its bytes and its merges' operations."""


def work_units(plans: list[Plan]) -> list[Unit]:
    """The targets' tensors grouped by name (``plan.work_key``), in the first target's order (then the others'),
    each costed by the estimated time (``plan.estimated_seconds``) of its outputs' bytes, the
    bytes of its distinct inputs, and the operations of each distinct merge in it (the targets'
    and those of the stages they read, each once)."""
    units: dict[str, Unit] = {}
    for k, plan in enumerate(plans):
        for i, t in enumerate(plan.tensors):
            unit = units.setdefault(work_key(t), Unit(work_key(t), [], 0))
            unit.members.append((k, i))
    stages = {s.fingerprint: {t.name: t for t in s.tensors} for p in plans for s in stage_plans(p)}
    for unit in units.values():
        tensors = [plans[k].tensors[i] for k, i in unit.members]
        reads = {(plans[k].models[r.model].ref, r.name): r.nbytes for (k, _), t in zip(unit.members, tensors) for r in t.all_inputs}
        nbytes = sum(t.nbytes for t in tensors) + sum(reads.values())
        flops = _unit_flops([(plans[k], t) for (k, _), t in zip(unit.members, tensors)], stages)
        unit.cost = round(1e9 * estimated_seconds(nbytes, flops))
    return list(units.values())


def _unit_flops(merges: list, stages: dict) -> int:
    """Operations of the distinct merges of (plan, tensor) pairs and of the stage tensors they
    read (``stages``: stage fingerprint -> {tensor name: tensor})."""
    seen: dict[tuple[str, str], int] = {}

    def visit(plan: Plan, t) -> None:
        if (plan.fingerprint, work_key(t)) in seen:
            return
        seen[plan.fingerprint, work_key(t)] = tensor_flops(methods.get(plan.method), t)
        for r in t.all_inputs:
            if plan.models[r.model].stage:
                stage = plan.stages[plan.models[r.model].ref]
                visit(stage, stages[stage.fingerprint][r.name])

    for plan, t in merges:
        visit(plan, t)
    return sum(seen.values())


def assign_units(units: list[Unit], world_size: int) -> list[list[int]]:
    """Each rank's units (indices into ``units``), balanced as ``plan.assign_tensors`` balances
    tensors: for one target, the same shares."""
    return assign([u.cost for u in units], world_size)


def read_bytes(graph: Graph) -> int:
    """Bytes of input files the job reads: each input tensor once, however many outputs and
    stages use it, and a stage's inputs only where an output reads that stage's tensor."""
    seen: dict[tuple, int] = {}
    done: set[tuple[str, str]] = set()
    by_name = {p.fingerprint: {t.name: t for t in p.tensors} for target in graph.targets for p in stage_plans(target.plan)}

    def visit(plan: Plan, t) -> None:
        for r in t.all_inputs:
            model = plan.models[r.model]
            if not model.stage:
                seen[(model.path, model.adapter_path, r.file, r.begin, r.name)] = r.nbytes
                continue
            stage = plan.stages[model.ref]
            if (stage.fingerprint, r.name) not in done:
                done.add((stage.fingerprint, r.name))
                visit(stage, by_name[stage.fingerprint][r.name])

    for target in graph.targets:
        for t in target.plan.tensors:
            visit(target.plan, t)
    return sum(seen.values())


def bytes_saved(graph: Graph) -> int:
    """Bytes of intermediate checkpoints a staged run (mergekit-multi) writes and reads back that
    this one does not (intermediates kept with --keep-intermediates are written either way)."""
    kept = {t.plan.fingerprint for t in graph.targets}
    stages = {s.fingerprint: s for t in graph.targets for s in stage_plans(t.plan)}
    return sum(2 * s.write_bytes for f, s in stages.items() if f not in kept)
