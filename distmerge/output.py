"""The output directory: prepare it (fresh, resumed or refused), and finish it on rank 0.

What distmerge keeps there besides the checkpoint (lock, plan, input identities, journal,
records, manifest) is named, read and written by ``distmerge.state``; this module decides
what happens to it. Setup builds the state in ``.distmerge.tmp-<pid>`` and renames it into
place as its last step, so a kill at any point leaves either a whole state or leftovers a
rerun recognizes as its own. ``--overwrite`` deletes only the files the records name (and
the ones the new plan will write), never a user's file.

Finishing writes what turns a set of shards into a Hugging Face checkpoint: the shard
index, config.json, generation config, tokenizer files, and a model card. Each is
written atomically, after every rank's files are done; the manifest comes last.
"""

from __future__ import annotations

import json
import os

import psutil
import yaml

from distmerge import state
from distmerge.errors import MergeError
from distmerge.faults import fault_point
from distmerge.inputs import VERSION as INPUTS_VERSION
from distmerge.inputs import input_identity, what_changed
from distmerge.io.writer import PARTIAL, write_atomic
from distmerge.plan import Plan, stage_plans
from distmerge.state import INDEX_FILE, INPUTS_FILE, state_path
from distmerge.vocab import tokenizer_files

RECIPE_FILE = "distmerge_config.yml"
SPACE_MARGIN = 64 * 2**20
"""Free space kept in reserve beyond the planned output (index, card, journals)."""


def prepare(out_dir: str, plan: Plan, overwrite: bool = False, hash_inputs: bool = False) -> bool:
    """Make ``out_dir`` ready for ``plan`` and lock it. Returns True when resuming.

    An existing directory is reused only if it holds a distmerge run of the same plan
    (same fingerprint) whose inputs are unchanged; anything else is refused unless
    ``overwrite``. A directory holding only an interrupted setup's leftovers counts as
    new. Refuses, before anything is written, a directory that is not writable, locked by
    another run, or on a filesystem without room for the planned output. ``hash_inputs``
    records a sha256 of every input file's content too (reads every input once).
    """
    resume = False
    if os.path.isdir(out_dir) and not state.only_leftovers(out_dir) and not overwrite:
        previous = state.fingerprint(out_dir)
        if previous is None:
            raise MergeError(
                f"output directory {out_dir} is not empty and is not a distmerge output; "
                "choose an empty or new directory, or pass --overwrite"
            )
        changed = changed_inputs(out_dir, plan if previous == plan.fingerprint else None)
        if changed:
            raise MergeError(f"cannot resume {out_dir}: {changed}; rerun with --overwrite to start afresh")
        if previous != plan.fingerprint:
            raise MergeError(
                f"output directory {out_dir} holds a run of a different recipe or options "
                f"(plan {previous[:12]}, now {plan.fingerprint[:12]}); pass --overwrite to replace it"
            )
        resume = True
    inputs = None if resume else input_identity(plan, full=hash_inputs)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise MergeError(f"cannot create output directory {out_dir}: {e.strerror or e}") from None
    fault_point(0, "setup-mkdir")
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise MergeError(f"output directory {out_dir} is not writable by this user")
    state.take_lock(out_dir)
    fault_point(0, "setup-lock")
    try:
        if overwrite:
            state.clear(out_dir, plan)
            fault_point(0, "setup-clear")
        state.remove_leftovers(out_dir)
        if resume:
            state.forget_lost_files(out_dir, plan)
        check_space(out_dir, plan)
        if not resume:
            state.create_state(out_dir, plan, inputs)
    except BaseException:
        state.release_lock(out_dir)
        raise
    return resume


def check_space(out_dir: str, plan: Plan) -> None:
    """Refuse to start when the filesystem of ``out_dir`` cannot hold what is left to write."""
    allocated = 0  # blocks our partial and finished files already hold on disk
    for f in plan.files:
        for name in (f.name, f.name + PARTIAL):
            try:
                allocated += os.stat(os.path.join(out_dir, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    needed = max(0, plan.write_bytes - allocated) + SPACE_MARGIN
    free = psutil.disk_usage(out_dir).free
    if free < needed:
        raise MergeError(
            f"not enough disk space in {out_dir}: the merge still needs {needed / 1e9:.2f} GB and the "
            f"filesystem has {free / 1e9:.2f} GB free; free some space or choose another output directory"
        )


# ---------------------------------------------------------------- the inputs recorded at setup


def changed_inputs(out_dir: str, plan: Plan | None = None, content: bool = True) -> str | None:
    """How the inputs differ from those recorded when the run in ``out_dir`` started (None:
    they do not). With ``plan`` (the same plan resuming), also that each model is still
    read from the directory it started from (a hub model updated since has a new snapshot).
    Without ``plan`` (another plan), only changes to recorded files count, and a missing
    record is no reason to refuse. ``content=False`` skips re-hashing whole weight files
    recorded with ``--hash-inputs``."""
    record = state.read_json(state_path(out_dir, INPUTS_FILE))
    if record is None or record.get("version") != INPUTS_VERSION or not isinstance(record.get("files"), list):
        return None if plan is None else (
            f"{state_path(out_dir, INPUTS_FILE)} is missing or unreadable (a run started by an older distmerge?), "
            "so it cannot tell whether the input models changed since the run started"
        )
    dirs = {}
    for p in [plan, *stage_plans(plan)] if plan is not None else []:
        for m in p.models:
            dirs.setdefault(m.ref, set()).update({m.path, m.adapter_path})
    for e in record["files"]:
        try:
            if e["model"] in dirs and e["dir"] not in dirs[e["model"]]:
                return f"model {e['model']!r} is now read from {sorted(d for d in dirs[e['model']] if d)[0]}, this run started with {e['dir']}"
            what = what_changed(e, content)
        except (KeyError, TypeError):
            return f"{state_path(out_dir, INPUTS_FILE)} is corrupt, so it cannot tell whether the input models changed"
        if what:
            return f"model {e['model']!r}: {'adapter file ' if e.get('adapter') else ''}{e['file']} {what}"
    return None


# ---------------------------------------------------------------- finishing


def finish(plan: Plan, out_dir: str) -> None:
    """Rank 0, once every rank has written its tensors: check that no input changed during
    the run, publish the files, write the index, config, tokenizer and card, and last the
    manifest of everything written."""
    changed = changed_inputs(out_dir, plan, content=False)
    if changed:
        raise MergeError(
            f"{out_dir}: {changed}, so the merged tensors may mix old and new inputs; "
            "rerun with --overwrite to start afresh"
        )
    files = finish_files(plan)
    state.record_finishing(out_dir, files)
    state.publish_files(plan, out_dir)
    fault_point(0, "index")
    for name, data in files.items():
        write_atomic(os.path.join(out_dir, name), data)
    fault_point(0, "manifest")
    state.write_manifest(out_dir, plan, files)


def finish_files(plan: Plan) -> dict[str, bytes]:
    """The files besides the shards, by name: index, config, the donor's generation config,
    the tokenizer source's tokenizer files (with added tokens and chat template), recipe, card."""
    weight_map = {name: f.name for f in plan.files for name in f.tensors}
    index = {"metadata": {"total_size": sum(t.nbytes for t in plan.tensors)}, "weight_map": weight_map}
    files = {INDEX_FILE: json.dumps(index, indent=2).encode(), "config.json": (json.dumps(plan.config, indent=2) + "\n").encode()}
    # The same reads and edits build_plan ran: they cannot fail here on the files' shape.
    tokenizer_dir = plan.models[plan.tokenizer_source].path if plan.tokenizer_source is not None else None
    files.update(tokenizer_files(plan.models[plan.donor].path, tokenizer_dir, plan.added_tokens, plan.chat_template))
    files[RECIPE_FILE] = plan.recipe_text.encode()
    files["README.md"] = model_card(plan).encode()
    return files


def card_title(plan: Plan) -> str:
    """"A + B (ties merge)": the models by their last path or hub-id component, the base
    first (a frankenmerge of one model: "A (passthrough merge)")."""
    names = dict.fromkeys(os.path.basename(os.path.normpath(m.ref.split("+")[0])) for m in plan.models)
    return f"{' + '.join(names)} ({plan.method} merge)"


def model_card(plan: Plan) -> str:
    """A README.md the hub renders: front matter with base models and tags, then the recipe."""
    refs = [m.ref for m in plan.models]
    front = {"base_model": refs, "library_name": "transformers", "tags": ["merge", "distmerge", "mergekit"]}
    models = "\n".join(f"- {r}" for r in refs)
    return (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n"
        f"# {card_title(plan)}\n\n"
        f"This model was merged with [distmerge](https://github.com/distmerge/distmerge) {plan.distmerge_version} "
        f"using the `{plan.method}` method.\n\n## Models\n\n{models}\n\n"
        f"## Recipe\n\n```yaml\n{plan.recipe_text.rstrip()}\n```\n\n"
        f"Random seed: {plan.seed}. Plan fingerprint: `{plan.fingerprint}`.\n"
    )
