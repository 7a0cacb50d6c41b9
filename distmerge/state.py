"""The output directory's bookkeeping: the one module that names and reads or writes it.

Besides the checkpoint, distmerge keeps in the output directory::

    .distmerge.lock                  host and pid of the run writing here
    .distmerge/plan.json             the plan: a rerun of the same plan resumes
    .distmerge/inputs.json           what identifies each input file (``distmerge.inputs``):
                                     a rerun refuses inputs that changed since the run started
    .distmerge/journal/rank-N.jsonl  tensors on disk, one JSON line each, per rank
    .distmerge/files/NAME.json       one record per published shard (tensor sha256s)
    .distmerge/finishing.json        the names ``output.finish`` writes, recorded before it writes them
    .distmerge/manifest.json         every file distmerge wrote, with its size and sha256,
                                     written last: ``distmerge verify`` checks against it

``output.prepare`` creates it (built in ``.distmerge.tmp-<pid>`` and renamed into place, so a
kill leaves either a whole state or leftovers a rerun recognizes as its own), each rank's
loop journals into it, rank 0 publishes files and records them here and ``output.finish``
writes the manifest; ``verify``, ``push`` and ``evaluate`` read it through these functions.
``--overwrite`` deletes only the files these records name (see ``clear``), never a user's file.
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

from distmerge import sources
from distmerge.errors import MergeError
from distmerge.faults import fault_point
from distmerge.io.writer import PARTIAL, fsync_dir, publish, write_atomic
from distmerge.plan import OutputFile, Plan, file_layout

STATE_DIR = ".distmerge"
LOCK_FILE = ".distmerge.lock"
PLAN_FILE, INPUTS_FILE, FINISHING_FILE, MANIFEST_FILE = "plan.json", "inputs.json", "finishing.json", "manifest.json"
JOURNAL_DIR, RECORDS_DIR = "journal", "files"
STATE_VERSION = 1
"""Of the manifest's layout."""
INDEX_FILE = sources.INDEX_FILE
"""The shard index's name (the same in the inputs: one spelling, in ``sources``)."""
TMP = ".tmp-"
"""Suffix (+ pid) of what setup builds before renaming it into place."""
BOOKKEEPING = [STATE_DIR + "/*", LOCK_FILE, "*" + PARTIAL]
"""Glob patterns of the bookkeeping, relative to the output directory: what ``push`` leaves
out, so that the hub gets a plain Hugging Face checkpoint."""


# ---------------------------------------------------------------- paths


def state_dir(out_dir: str) -> str:
    return os.path.join(out_dir, STATE_DIR)


def state_path(out_dir: str, name: str) -> str:
    """``name`` (PLAN_FILE, INPUTS_FILE, FINISHING_FILE, MANIFEST_FILE) in the state directory."""
    return os.path.join(state_dir(out_dir), name)


def record_path(out_dir: str, name: str) -> str:
    """The record of the published output file ``name``: its bytes and tensors' sha256s."""
    return os.path.join(state_dir(out_dir), RECORDS_DIR, name + ".json")


def journal_dir(out_dir: str) -> str:
    return os.path.join(state_dir(out_dir), JOURNAL_DIR)


def has_state(out_dir: str) -> bool:
    """Whether ``out_dir`` holds a whole state (setup renamed it into place with its plan)."""
    return os.path.isfile(state_path(out_dir, PLAN_FILE))


def read_json(path: str) -> dict | None:
    """The JSON object in ``path``; None when it is missing, unreadable or not an object."""
    try:
        with open(path, "rb") as f:
            value = json.load(f)
        return value if isinstance(value, dict) else None
    except (OSError, ValueError, RecursionError):
        return None


def fingerprint(out_dir: str) -> str | None:
    """The fingerprint of the plan whose run ``out_dir`` holds (None: no whole state)."""
    return (read_json(state_path(out_dir, PLAN_FILE)) or {}).get("fingerprint")


# ---------------------------------------------------------------- setup


def create_state(out_dir: str, plan: Plan, inputs: dict) -> None:
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


def leftovers(out_dir: str) -> list[str]:
    """What an interrupted setup leaves in ``out_dir``: temporary state directories, a
    state directory without a whole plan and with nothing a run writes later, and lock
    files being created by processes that are gone."""
    found = []
    for name in os.listdir(out_dir):
        if name.startswith(STATE_DIR + TMP):
            found.append(name)
        elif name.startswith(LOCK_FILE + TMP) and not _alive(name.rpartition(TMP)[2]):
            found.append(name)
        elif name == STATE_DIR and fingerprint(out_dir) is None:
            held = set(os.listdir(state_dir(out_dir))) if os.path.isdir(state_dir(out_dir)) else {""}
            if held <= {PLAN_FILE, PLAN_FILE + PARTIAL, INPUTS_FILE, INPUTS_FILE + PARTIAL}:
                found.append(name)
    return found


def only_leftovers(out_dir: str) -> bool:
    """Whether ``out_dir`` holds nothing but an interrupted setup's leftovers (and a lock)."""
    return set(os.listdir(out_dir)) - {LOCK_FILE} <= set(leftovers(out_dir))


def remove_leftovers(out_dir: str) -> None:
    for name in leftovers(out_dir):
        path = os.path.join(out_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def _alive(pid: str) -> bool:
    return pid.isdigit() and psutil.pid_exists(int(pid))


def written_names(out_dir: str) -> set[str]:
    """Every file name the state of ``out_dir`` says distmerge wrote (or meant to write) there."""
    planned = (read_json(state_path(out_dir, PLAN_FILE)) or {}).get("files")
    finishing = (read_json(state_path(out_dir, FINISHING_FILE)) or {}).get("files")
    names = [f.get("name") for f in planned if isinstance(f, dict)] if isinstance(planned, list) else []
    names += finishing if isinstance(finishing, list) else []
    names += [e["name"] for e in read_manifest(out_dir) or []]
    return {n for n in names if isinstance(n, str) and n not in ("", ".", "..") and os.path.basename(n) == n}


def record_finishing(out_dir: str, names) -> None:
    """Record the names ``output.finish`` is about to write, before it writes them: a kill
    in between leaves them named for ``--overwrite``."""
    write_atomic(state_path(out_dir, FINISHING_FILE), json.dumps({"files": sorted(names)}, indent=1))


def clear(out_dir: str, plan: Plan) -> None:
    """What ``--overwrite`` removes: what distmerge wrote here, as its own records name it
    (the earlier plan's files, what finish wrote or was about to write), and what ``plan``
    will write, each with its ``.partial``; then the state. Anything else stays."""
    names = {f.name for f in plan.files} | written_names(out_dir)
    for name in sorted(names):
        for path in (os.path.join(out_dir, name), os.path.join(out_dir, name + PARTIAL)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    shutil.rmtree(state_dir(out_dir), ignore_errors=True)  # last: a kill before this clears again


# ---------------------------------------------------------------- the lock


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


# ---------------------------------------------------------------- the journal


class Journal:
    """Which tensors are safely on disk: one JSON line per tensor, appended by the rank that
    wrote it, only after its bytes were fsynced. Lines from every rank of every earlier run
    of the same plan count, so a rerun, with any number of ranks, redoes only the rest."""

    COMMIT_BYTES = 1 << 30
    COMMIT_SECONDS = 10.0

    def __init__(self, out_dir: str, rank: int):
        self.dir = journal_dir(out_dir)
        os.makedirs(self.dir, exist_ok=True)
        self.rank, self.path = rank, os.path.join(self.dir, f"rank-{rank:05d}.jsonl")
        self.pending: list[dict] = []
        self.pending_bytes = 0
        self.last_commit = time.monotonic()

    def add(self, tensor: str, file: str, sha256: str, nbytes: int) -> None:
        self.pending.append({"tensor": tensor, "file": file, "sha256": sha256})
        self.pending_bytes += nbytes

    def due(self) -> bool:
        return self.pending_bytes >= self.COMMIT_BYTES or time.monotonic() - self.last_commit >= self.COMMIT_SECONDS

    def take(self) -> list[dict]:
        """The pending lines, no longer pending (to ``append`` once their data is synced).
        They leave ``pending`` before they are written: a Ctrl-C inside the write, and the
        commit that follows the stop, would otherwise write them twice."""
        lines, self.pending, self.pending_bytes = self.pending, [], 0
        self.last_commit = time.monotonic()
        return lines

    def append(self, lines: list[dict]) -> None:
        """Append ``lines`` (a line cut short by a kill is ignored when read)."""
        if lines:
            with open(self.path, "a") as f:
                f.write("".join(json.dumps(e) + "\n" for e in lines))
                f.flush()
                os.fsync(f.fileno())
            fault_point(self.rank, "journaled")


def read_journal(out_dir: str) -> dict[str, dict]:
    """tensor name -> its journal entry, from every rank's journal. A line cut short by a
    kill is ignored (its tensor is redone)."""
    done: dict[str, dict] = {}
    folder = journal_dir(out_dir)
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        with open(os.path.join(folder, name)) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    done[entry["tensor"]] = entry
                except (ValueError, KeyError, TypeError):
                    continue
    return done


def forget_lost_files(out_dir: str, plan: Plan) -> None:
    """Drop journal lines of files that are neither partial nor final any more (deleted by
    hand, or published already), so that their tensors are redone or not needed."""
    keep = {f.name for f in plan.files if os.path.exists(os.path.join(out_dir, f.name + PARTIAL))}
    folder = journal_dir(out_dir)
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        with open(path) as f:
            lines = [line for line in f if _file_of(line) in keep]
        write_atomic(path, "".join(lines))


def _file_of(line: str) -> str | None:
    try:
        return json.loads(line)["file"]
    except (ValueError, KeyError, TypeError):
        return None


def finished_tensors(plan: Plan, out_dir: str) -> set[str]:
    """The tensors an earlier run of this plan left on disk: journaled, or in a published file."""
    published = [f for f in plan.files if is_done(out_dir, f)]
    return set(read_journal(out_dir)) | {name for f in published for name in f.tensors}


# ---------------------------------------------------------------- published files and their records


def is_done(out_dir: str, file: OutputFile) -> bool:
    """A file counts as done when its record exists and the file on disk has the recorded size."""
    try:
        with open(record_path(out_dir, file.name)) as f:
            record = json.load(f)
        return record["bytes"] == file.nbytes == os.path.getsize(os.path.join(out_dir, file.name))
    except (OSError, ValueError, KeyError):
        return False


def publish_files(plan: Plan, out_dir: str) -> None:
    """Rank 0, once every rank is done: rename each complete file into place and record it
    (bytes, the sha256 of every tensor, and a sha256 over the header and those)."""
    done = read_journal(out_dir)
    os.makedirs(os.path.join(state_dir(out_dir), RECORDS_DIR), exist_ok=True)
    for file in plan.files:
        if is_done(out_dir, file):
            continue
        missing = [n for n in file.tensors if n not in done]
        if missing:
            raise MergeError(f"{file.name}: {len(missing)} tensors were never written (first: {missing[0]}); rerun to resume")
        path = os.path.join(out_dir, file.name)
        if os.path.exists(path + PARTIAL):
            fault_point(0, "publish")
            publish(path)
        header, _ = file_layout(plan, file)
        tensor_sha = [done[n]["sha256"] for n in file.tensors]
        tree = hashlib.sha256(hashlib.sha256(header).digest() + b"".join(bytes.fromhex(h) for h in tensor_sha))
        record = {
            "file": file.name,
            "bytes": file.nbytes,
            "sha256_tree": tree.hexdigest(),
            "tensors": [{"name": n, "sha256": h} for n, h in zip(file.tensors, tensor_sha)],
        }
        write_atomic(record_path(out_dir, file.name), json.dumps(record, indent=1))


# ---------------------------------------------------------------- the manifest


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
    write_atomic(state_path(out_dir, MANIFEST_FILE), json.dumps({"version": STATE_VERSION, "files": entries}, indent=1))


def read_manifest(out_dir: str) -> list[dict] | None:
    """The manifest's entries (None: missing, unreadable or malformed)."""
    manifest = read_json(state_path(out_dir, MANIFEST_FILE)) or {}
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
