"""The output directory: prepare it (fresh, resumed or refused), and finish it on rank 0.

Finishing writes what turns a set of shards into a Hugging Face checkpoint: the shard
index, config.json, generation config, tokenizer files, and a model card. Each is
written atomically, after every rank's files are done.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time

import psutil
import yaml

from distmerge.errors import MergeError
from distmerge.io.writer import PARTIAL, write_atomic
from distmerge.plan import Plan
from distmerge.run import fault_point, forget_lost_files, publish_files, state_dir

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
RECIPE_FILE = "distmerge_config.yml"


LOCK_FILE = ".distmerge.lock"
SPACE_MARGIN = 64 * 2**20
"""Free space kept in reserve beyond the planned output (index, card, journals)."""


def prepare(out_dir: str, plan: Plan, overwrite: bool = False) -> bool:
    """Make ``out_dir`` ready for ``plan`` and lock it. Returns True when resuming.

    An existing directory is reused only if it holds a distmerge run of the same plan
    (same fingerprint); anything else is refused unless ``overwrite``. Refuses, before
    anything is written, a directory that is not writable, locked by another run, or on
    a filesystem without room for the planned output.
    """
    plan_path = os.path.join(state_dir(out_dir), "plan.json")
    resume = False
    if os.path.isdir(out_dir) and set(os.listdir(out_dir)) - {LOCK_FILE}:
        previous = _fingerprint(plan_path)
        if previous is None and not overwrite:
            raise MergeError(
                f"output directory {out_dir} is not empty and is not a distmerge output; "
                "choose an empty or new directory, or pass --overwrite"
            )
        if previous not in (None, plan.fingerprint) and not overwrite:
            raise MergeError(
                f"output directory {out_dir} holds a run of a different recipe or options "
                f"(plan {previous[:12]}, now {plan.fingerprint[:12]}); pass --overwrite to replace it"
            )
        resume = previous == plan.fingerprint and not overwrite
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise MergeError(f"cannot create output directory {out_dir}: {e.strerror or e}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise MergeError(f"output directory {out_dir} is not writable by this user")
    take_lock(out_dir)
    try:
        if overwrite:
            _clear(out_dir)
        if resume:
            forget_lost_files(out_dir, plan)
        check_space(out_dir, plan)
        os.makedirs(state_dir(out_dir), exist_ok=True)
        if not resume:
            write_atomic(plan_path, plan.to_json())
    except BaseException:
        release_lock(out_dir)
        raise
    return resume


def take_lock(out_dir: str) -> None:
    """Claim ``out_dir`` for this run: a lock file naming host and pid, created exclusively.
    A lock left by a dead process on this host is taken over; any other lock is refused."""
    path = os.path.join(out_dir, LOCK_FILE)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_json(path) or {}
            if holder.get("host") == me["host"] and not psutil.pid_exists(holder.get("pid", -1)):
                os.remove(path)  # stale: its process is gone (killed or crashed)
                continue
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
            raise MergeError(
                f"another distmerge run (pid {holder.get('pid')} on {holder.get('host')}, since {since}) "
                f"is writing to {out_dir}; wait for it to finish, or delete {path} if that run is dead"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return
    raise MergeError(f"cannot lock {out_dir}: {path} keeps coming back; is another run starting?")


def release_lock(out_dir: str) -> None:
    path = os.path.join(out_dir, LOCK_FILE)
    holder = _read_json(path) or {}
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


def _fingerprint(plan_path: str) -> str | None:
    return (_read_json(plan_path) or {}).get("fingerprint")


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            value = json.load(f)
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


def _clear(out_dir: str) -> None:
    """Remove what distmerge writes; leave anything else alone."""
    shutil.rmtree(state_dir(out_dir), ignore_errors=True)
    for name in os.listdir(out_dir):
        if (name.startswith("model-") and ".safetensors" in name) or name == INDEX_FILE:
            os.remove(os.path.join(out_dir, name))


def finish(plan: Plan, out_dir: str) -> None:
    """Rank 0, once every rank has written its tensors: publish the files, then write the
    index, config, tokenizer and card."""
    publish_files(plan, out_dir)
    fault_point(0, "index")
    weight_map = {name: f.name for f in plan.files for name in f.tensors}
    index = {"metadata": {"total_size": sum(t.nbytes for t in plan.tensors)}, "weight_map": weight_map}
    write_atomic(os.path.join(out_dir, INDEX_FILE), json.dumps(index, indent=2))
    write_atomic(os.path.join(out_dir, "config.json"), json.dumps(plan.config, indent=2) + "\n")
    donor = plan.models[plan.donor].path
    _copy(donor, out_dir, ["generation_config.json"])
    if plan.tokenizer_source is not None:
        _copy(plan.models[plan.tokenizer_source].path, out_dir, TOKENIZER_FILES)
    _add_tokens(plan, out_dir)
    _set_chat_template(plan, out_dir)
    write_atomic(os.path.join(out_dir, RECIPE_FILE), plan.recipe_text)
    write_atomic(os.path.join(out_dir, "README.md"), model_card(plan))


def _copy(src_dir: str, out_dir: str, names) -> None:
    for name in names:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            with open(src, "rb") as f:
                write_atomic(os.path.join(out_dir, name), f.read())


def _add_tokens(plan: Plan, out_dir: str) -> None:
    """Append the plan's added tokens (``tokenizer_source: union``, ``tokenizer.tokens``) to
    tokenizer.json and to tokenizer_config.json's added_tokens_decoder."""
    if not plan.added_tokens:
        return
    path = os.path.join(out_dir, "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        tok = json.load(f)
    tok["added_tokens"] = [*(tok.get("added_tokens") or []), *plan.added_tokens]
    write_atomic(path, json.dumps(tok, indent=2, ensure_ascii=False))
    path = os.path.join(out_dir, "tokenizer_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        decoder = config.setdefault("added_tokens_decoder", {})
        for entry in plan.added_tokens:
            decoder[str(entry["id"])] = {k: v for k, v in entry.items() if k != "id"}
        write_atomic(path, json.dumps(config, indent=2, ensure_ascii=False))


def _set_chat_template(plan: Plan, out_dir: str) -> None:
    """Write the recipe's chat template where transformers looks for it: chat_template.jinja
    (which takes precedence when present) and tokenizer_config.json."""
    template = plan.chat_template
    if not template:
        return
    write_atomic(os.path.join(out_dir, "chat_template.jinja"), template)
    path = os.path.join(out_dir, "tokenizer_config.json")
    config = {}
    if os.path.isfile(path):
        with open(path) as f:
            config = json.load(f)
    config["chat_template"] = template
    write_atomic(path, json.dumps(config, indent=2))


def model_card(plan: Plan) -> str:
    """A README.md the hub renders: front matter with base models and tags, then the recipe."""
    refs = [m.ref for m in plan.models]
    front = {"base_model": refs, "library_name": "transformers", "tags": ["merge", "distmerge", "mergekit"]}
    models = "\n".join(f"- {r}" for r in refs)
    return (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n"
        f"# {os.path.basename(os.path.normpath(plan.models[plan.donor].ref))} merge\n\n"
        f"This model was merged with [distmerge](https://github.com/distmerge/distmerge) {plan.distmerge_version} "
        f"using the `{plan.method}` method.\n\n## Models\n\n{models}\n\n"
        f"## Recipe\n\n```yaml\n{plan.recipe_text.rstrip()}\n```\n\n"
        f"Random seed: {plan.seed}. Plan fingerprint: `{plan.fingerprint}`.\n"
    )
