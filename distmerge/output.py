"""The output directory: prepare it (fresh, resumed or refused), and finish it on rank 0.

This module owns what distmerge keeps in the directory besides the checkpoint (run.py
writes the journal and the per-file records while merging):

    .distmerge.lock             host and pid of the run writing here
    .distmerge/plan.json        the plan: a rerun of the same plan resumes
    .distmerge/inputs.json      what identifies each input file (see ``distmerge.inputs``):
                                a rerun refuses inputs that changed since the run started
    .distmerge/journal/         run.py: tensors on disk, one JSON line each
    .distmerge/files/           run.py: one record per published shard (tensor sha256s)
    .distmerge/finishing.json   the names ``finish`` writes, recorded before it writes them
    .distmerge/manifest.json    every file distmerge wrote, with its size and sha256,
                                written last: ``distmerge verify`` checks against it

Setup builds plan.json and inputs.json in ``.distmerge.tmp-<pid>`` and renames that to
``.distmerge`` as its last step, so a kill at any point leaves either a whole state or
leftovers a rerun recognizes as its own. ``--overwrite`` deletes only the files these
records name (and the ones the new plan will write), never a user's file.

Finishing writes what turns a set of shards into a Hugging Face checkpoint: the shard
index, config.json, generation config, tokenizer files, and a model card. Each is
written atomically, after every rank's files are done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time

import psutil
import yaml

from distmerge.errors import MergeError
from distmerge.io.writer import PARTIAL, fsync_dir, write_atomic
from distmerge.plan import Plan, file_layout
from distmerge.run import STATE_DIR, fault_point, forget_lost_files, publish_files, record_path, state_dir
from distmerge.inputs import VERSION as INPUTS_VERSION
from distmerge.inputs import input_identity, what_changed
from distmerge.vocab import tokenizer_files

INDEX_FILE = "model.safetensors.index.json"
RECIPE_FILE = "distmerge_config.yml"
PLAN_FILE, INPUTS_FILE, FINISHING_FILE, MANIFEST_FILE = "plan.json", "inputs.json", "finishing.json", "manifest.json"
STATE_VERSION = 1

LOCK_FILE = ".distmerge.lock"
TMP = ".tmp-"
"""Suffix (+ pid) of what setup builds before renaming it into place."""
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
    if os.path.isdir(out_dir) and not _only_leftovers(out_dir) and not overwrite:
        previous = _fingerprint(out_dir)
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
    take_lock(out_dir)
    fault_point(0, "setup-lock")
    try:
        if overwrite:
            _clear(out_dir, plan)
            fault_point(0, "setup-clear")
        for name in _leftovers(out_dir):
            _remove(os.path.join(out_dir, name))
        if resume:
            forget_lost_files(out_dir, plan)
        check_space(out_dir, plan)
        if not resume:
            _create_state(out_dir, plan, inputs)
    except BaseException:
        release_lock(out_dir)
        raise
    return resume


def _create_state(out_dir: str, plan: Plan, inputs: dict) -> None:
    """Build the state in a temporary directory, then rename it into place: a rerun finds
    a whole state, or a temporary directory it knows to remove."""
    tmp = state_dir(out_dir) + TMP + str(os.getpid())
    os.mkdir(tmp)
    fault_point(0, "setup-state")
    write_atomic(os.path.join(tmp, PLAN_FILE), plan.to_json())
    fault_point(0, "setup-plan")
    write_atomic(os.path.join(tmp, INPUTS_FILE), json.dumps(inputs, indent=1))
    fault_point(0, "setup-inputs")
    os.rename(tmp, state_dir(out_dir))
    fsync_dir(out_dir)
    fault_point(0, "setup-done")


def _leftovers(out_dir: str) -> list[str]:
    """What an interrupted setup leaves in ``out_dir``: temporary state directories, a
    state directory without a whole plan and with nothing a run writes later, and lock
    files being created by processes that are gone."""
    found = []
    for name in os.listdir(out_dir):
        if name.startswith(STATE_DIR + TMP):
            found.append(name)
        elif name.startswith(LOCK_FILE + TMP) and not _alive(name.rpartition(TMP)[2]):
            found.append(name)
        elif name == STATE_DIR and _fingerprint(out_dir) is None:
            held = set(os.listdir(state_dir(out_dir))) if os.path.isdir(state_dir(out_dir)) else {""}
            if held <= {PLAN_FILE, PLAN_FILE + PARTIAL, INPUTS_FILE, INPUTS_FILE + PARTIAL}:
                found.append(name)
    return found


def _only_leftovers(out_dir: str) -> bool:
    return set(os.listdir(out_dir)) - {LOCK_FILE} <= set(_leftovers(out_dir))


def _alive(pid: str) -> bool:
    return pid.isdigit() and psutil.pid_exists(int(pid))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def take_lock(out_dir: str) -> None:
    """Claim ``out_dir`` for this run: a lock file naming host and pid, created exclusively
    and whole (hard-linked from a temporary file, so a kill never leaves it empty).
    A lock left by a dead process on this host is taken over; any other lock is refused."""
    path = os.path.join(out_dir, LOCK_FILE)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    tmp = path + TMP + str(os.getpid())
    with open(tmp, "w") as f:
        json.dump(me, f)
    try:
        for _ in range(2):
            try:
                _create_exclusive(tmp, path)
            except FileExistsError:
                holder = read_json(path) or {}
                if holder.get("host") == me["host"] and not psutil.pid_exists(holder.get("pid", -1)):
                    os.remove(path)  # stale: its process is gone (killed or crashed)
                    continue
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
                raise MergeError(
                    f"another distmerge run (pid {holder.get('pid')} on {holder.get('host')}, since {since}) "
                    f"is writing to {out_dir}; wait for it to finish, or delete {path} if that run is dead"
                ) from None
            return
        raise MergeError(f"cannot lock {out_dir}: {path} keeps coming back; is another run starting?")
    finally:
        os.remove(tmp)


def _create_exclusive(tmp: str, path: str) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links: create exclusively, then fill
        with open(tmp, "rb") as src, open(path, "xb") as dst:
            dst.write(src.read())


def release_lock(out_dir: str) -> None:
    path = os.path.join(out_dir, LOCK_FILE)
    holder = read_json(path) or {}
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        os.remove(path)


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


def _state(out_dir: str, name: str) -> str:
    return os.path.join(state_dir(out_dir), name)


def _fingerprint(out_dir: str) -> str | None:
    return (read_json(_state(out_dir, PLAN_FILE)) or {}).get("fingerprint")


def read_json(path: str) -> dict | None:
    """The JSON object in ``path``; None when it is missing, unreadable or not an object."""
    try:
        with open(path, "rb") as f:
            value = json.load(f)
        return value if isinstance(value, dict) else None
    except (OSError, ValueError, RecursionError):
        return None


def _clear(out_dir: str, plan: Plan) -> None:
    """Remove what distmerge wrote here, as its own records name it (the earlier plan's
    files, what finish wrote or was about to write), and what ``plan`` will write, each
    with its ``.partial``; then the state. Anything else stays."""
    names = {f.name for f in plan.files} | written_names(out_dir)
    for name in sorted(names):
        for path in (os.path.join(out_dir, name), os.path.join(out_dir, name + PARTIAL)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    shutil.rmtree(state_dir(out_dir), ignore_errors=True)  # last: a kill before this clears again


def written_names(out_dir: str) -> set[str]:
    """Every file name the state of ``out_dir`` says distmerge wrote (or meant to write) there."""
    planned = (read_json(_state(out_dir, PLAN_FILE)) or {}).get("files")
    finishing = (read_json(_state(out_dir, FINISHING_FILE)) or {}).get("files")
    names = [f.get("name") for f in planned if isinstance(f, dict)] if isinstance(planned, list) else []
    names += finishing if isinstance(finishing, list) else []
    names += [e["name"] for e in read_manifest(out_dir) or []]
    return {n for n in names if isinstance(n, str) and n not in ("", ".", "..") and os.path.basename(n) == n}


# ---------------------------------------------------------------- the inputs recorded at setup


def changed_inputs(out_dir: str, plan: Plan | None = None, content: bool = True) -> str | None:
    """How the inputs differ from those recorded when the run in ``out_dir`` started (None:
    they do not). With ``plan`` (the same plan resuming), also that each model is still
    read from the directory it started from (a hub model updated since has a new snapshot).
    Without ``plan`` (another plan), only changes to recorded files count, and a missing
    record is no reason to refuse. ``content=False`` skips re-hashing whole weight files
    recorded with ``--hash-inputs``."""
    record = read_json(_state(out_dir, INPUTS_FILE))
    if record is None or record.get("version") != INPUTS_VERSION or not isinstance(record.get("files"), list):
        return None if plan is None else (
            f"{_state(out_dir, INPUTS_FILE)} is missing or unreadable (a run started by an older distmerge?), "
            "so it cannot tell whether the input models changed since the run started"
        )
    dirs = {}
    for m in plan.models if plan is not None else []:
        dirs.setdefault(m.ref, set()).update({m.path, m.adapter_path})
    for e in record["files"]:
        try:
            if e["model"] in dirs and e["dir"] not in dirs[e["model"]]:
                return f"model {e['model']!r} is now read from {sorted(d for d in dirs[e['model']] if d)[0]}, this run started with {e['dir']}"
            what = what_changed(e, content)
        except (KeyError, TypeError):
            return f"{_state(out_dir, INPUTS_FILE)} is corrupt, so it cannot tell whether the input models changed"
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
    write_atomic(_state(out_dir, FINISHING_FILE), json.dumps({"files": sorted(files)}, indent=1))
    publish_files(plan, out_dir)
    fault_point(0, "index")
    for name, data in files.items():
        write_atomic(os.path.join(out_dir, name), data)
    fault_point(0, "manifest")
    write_manifest(out_dir, plan, files)


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


def write_manifest(out_dir: str, plan: Plan, files: dict[str, bytes]) -> None:
    """Record every file written: name, bytes, and its sha256; for a shard, the sha256 of
    its header and the record's sha256_tree over that and its tensors' sha256s (what each
    rank hashed as it wrote them: no shard is read again here)."""
    entries = []
    for f in plan.files:
        header, _ = file_layout(plan, f)
        record = read_json(record_path(out_dir, f.name)) or {}
        entries.append({
            "name": f.name, "bytes": f.nbytes, "header_bytes": len(header),
            "header_sha256": hashlib.sha256(header).hexdigest(), "sha256_tree": record.get("sha256_tree"),
        })  # fmt: skip
    entries += [{"name": n, "bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in sorted(files.items())]
    write_atomic(_state(out_dir, MANIFEST_FILE), json.dumps({"version": STATE_VERSION, "files": entries}, indent=1))


def read_manifest(out_dir: str) -> list[dict] | None:
    """The manifest's entries (None: missing, unreadable or malformed)."""
    manifest = read_json(_state(out_dir, MANIFEST_FILE)) or {}
    entries = manifest.get("files")
    if manifest.get("version") != STATE_VERSION or not isinstance(entries, list):
        return None
    shard = {"name": str, "bytes": int, "header_bytes": int, "header_sha256": str, "sha256_tree": str}
    other = {"name": str, "bytes": int, "sha256": str}
    for e in entries:
        keys = shard if isinstance(e, dict) and "header_sha256" in e else other
        if not isinstance(e, dict) or set(e) != set(keys) or not all(isinstance(e[k], t) for k, t in keys.items()):
            return None
    return entries


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
