"""What identifies the input files a merge reads, so that a resumed run never mixes tensors
merged from different inputs.

Every file whose bytes reach the output is identified: each model's weight files, adapters,
config.json, and the donor's and tokenizer source's files that finishing copies.
``output.prepare`` records ``input_identity`` in the output's state (``inputs.json``) and
``output.changed_inputs`` compares it on every resume and at finish.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time

from distmerge.errors import MergeError
from distmerge.io.header import MAX_HEADER_BYTES
from distmerge.plan import Plan, stage_plans
from distmerge.sources import is_pickle, is_zero
from distmerge.vocab import TOKENIZER_FILES

VERSION = 1
"""Of the record's layout."""
SAFETENSORS, PICKLE, SMALL = "safetensors", "pickle", "small"
"""How an input file is identified: size, mtime and header sha256; size and mtime; size
and content sha256 (configs and tokenizer files, a few MB at most)."""


def input_identity(plan: Plan, full: bool = False) -> dict:
    """What identifies every file whose bytes reach the output: each model's weight files,
    adapters, config.json, and the donor's and tokenizer source's files that finish copies.

    Recorded at setup (inputs.json) and compared on every resume and at finish, so that a
    rerun never mixes tensors merged from different inputs. Local paths are recorded too:
    unlike the plan's fingerprint, this record is about this machine's files. ``full``
    adds a sha256 of every file's content (reads all inputs: 1-2 s per GB on one core).
    """
    files, seen = [], set()
    for p in [plan, *stage_plans(plan)]:
        for i, m in enumerate(p.models):
            if m.stage:  # computed in the same pass from its own inputs, which are listed
                continue
            for where, name, kind, adapter in _input_files(p, i):
                if (m.ref, where, name) in seen:  # a model read by several stages: identified once
                    continue
                seen.add((m.ref, where, name))
                entry = {"model": m.ref, "dir": where, "file": name, **identify(os.path.join(where, name), kind, full)}
                files.append({**entry, "adapter": True} if adapter else entry)
    return {"version": VERSION, "full": full, "files": files}


def _input_files(plan: Plan, i: int) -> list[tuple[str, str, str, bool]]:
    """(directory, file name, kind, from the adapter) of model ``i``'s files the output depends on."""
    m = plan.models[i]
    refs = [r for t in plan.tensors for r in t.all_inputs if r.model == i]
    out = []
    scales = {r.quant["scale"][0] for r in refs if r.quant}  # a quantized tensor's scales may lie in another shard
    for file in sorted({r.file for r in refs} | scales):
        if is_zero(file):  # a DeepSpeed tag directory, and the file naming it
            out += [(m.path, name, PICKLE, False) for name in _files_under(m.path, file)]
            out.append((m.path, "latest", SMALL, False))
        else:
            out.append((m.path, file, PICKLE if is_pickle(file) else SAFETENSORS, False))
    small = ["config.json"]
    if i == plan.donor:
        small.append("generation_config.json")
    if i == plan.tokenizer_source:
        small += TOKENIZER_FILES
    out += [(m.path, name, SMALL, False) for name in dict.fromkeys(small)]
    if m.adapter_path:
        lora = sorted({r.lora[k][0] for r in refs if r.lora for k in ("a", "b")})
        out += [(m.adapter_path, name, SAFETENSORS, True) for name in lora]
        out.append((m.adapter_path, "adapter_config.json", SMALL, True))
    return out


def _files_under(root: str, folder: str) -> list[str]:
    found = []
    for here, _, names in os.walk(os.path.join(root, folder)):
        found += [os.path.relpath(os.path.join(here, n), root) for n in names]
    return sorted(found)


def identify(path: str, kind: str, full: bool) -> dict:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return {"bytes": None}  # absent (an optional file): its appearing later counts as a change
    except OSError as e:
        raise MergeError(f"cannot read {path}: {e.strerror or e}") from None
    ident = {"bytes": st.st_size}
    if kind != SMALL:
        ident["mtime_ns"] = st.st_mtime_ns
    if kind == SAFETENSORS:
        ident["header_sha256"] = _header_sha256(path)
    if kind == SMALL or full:
        ident["sha256"] = file_sha256(path)
    return ident


def what_changed(e: dict, content: bool) -> str | None:
    path = os.path.join(e["dir"], e["file"])
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if e["bytes"] is None:
        return None if st is None else "appeared since this run started"
    if st is None:
        return "was deleted since this run started"
    if st.st_size != e["bytes"]:
        return f"changed since this run started (size {e['bytes']} -> {st.st_size})"
    if "mtime_ns" in e and st.st_mtime_ns != e["mtime_ns"]:
        return f"changed since this run started (modified {_when(e['mtime_ns'])} -> {_when(st.st_mtime_ns)})"
    if "header_sha256" in e and _header_sha256(path) != e["header_sha256"]:
        return "changed since this run started (its safetensors header differs)"
    if "sha256" in e and (content or "mtime_ns" not in e) and file_sha256(path) != e["sha256"]:
        return "changed since this run started (its content sha256 differs)"
    return None


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns // 10**9)) + f".{ns % 10**9:09d}"


def _header_sha256(path: str) -> str:
    """sha256 of a safetensors file's header: the 8-byte length and the JSON it counts."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        return hashlib.sha256(prefix + f.read(min(n, MAX_HEADER_BYTES))).hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()
