"""Check a finished output directory: every file distmerge wrote against its manifest, then
the index, the shards' headers and the config.

Cheap mode: every file in the manifest exists with its recorded size, each shard's header
is byte for byte the one written, and index, headers and config agree. Full mode also reads
every byte: each other file's sha256, and each shard's tensors against the sha256 the rank
that wrote them recorded, and header plus tensors against the manifest's sha256_tree. So a
changed byte anywhere in any file is found.
"""

from __future__ import annotations

import hashlib
import json
import os

from distmerge.architecture import layer_count, layer_count_key, layer_index
from distmerge.errors import MergeError
from distmerge.io.header import read_header
from distmerge.io.writer import PARTIAL
from distmerge.inputs import file_sha256
from distmerge.state import INDEX_FILE, MANIFEST_FILE, RECORDS_DIR, STATE_DIR, read_json, read_manifest, record_path


def verify(out_dir: str, full: bool = False) -> list[str]:
    """Every problem found in ``out_dir``; an empty list means it checks out."""
    problems: list[str] = []
    manifest = read_manifest(out_dir)
    if manifest is None:
        problems.append(
            f"{STATE_DIR}/{MANIFEST_FILE}: missing or unreadable (did the run finish? rerun the same command to finish it)"
        )
    for entry in manifest or []:
        problems += _check_file(out_dir, entry, full)
    try:
        with open(os.path.join(out_dir, INDEX_FILE)) as f:
            index = json.load(f)
        weight_map: dict[str, str] = index["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return problems + [f"{INDEX_FILE}: missing or unreadable ({e})"]
    headers = {}
    by_file: dict[str, set[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, set()).add(name)
    for file, names in sorted(by_file.items()):
        try:
            entries, _ = read_header(os.path.join(out_dir, file))
        except MergeError as e:
            problems.append(str(e))
            continue
        headers[file] = entries
        if set(entries) != names:
            extra, missing = sorted(set(entries) - names), sorted(names - set(entries))
            problems.append(f"{file}: holds {extra[:3]} not in the index, lacks {missing[:3]} the index puts there")
    total = sum(e.nbytes for entries in headers.values() for e in entries.values())
    if headers and len(headers) == len(by_file) and index.get("metadata", {}).get("total_size") != total:
        problems.append(f"{INDEX_FILE}: metadata.total_size is {index.get('metadata', {}).get('total_size')}, tensors hold {total} bytes")
    leftovers = sorted(n for n in os.listdir(out_dir) if n.endswith(PARTIAL))
    if leftovers:
        problems.append(f"unfinished files left: {', '.join(leftovers[:3])}")
    problems += _check_config(out_dir, {n: e.shape for entries in headers.values() for n, e in entries.items()})
    return problems


def _check_file(out_dir: str, entry: dict, full: bool) -> list[str]:
    """One file of the manifest: its size; a shard's header; with ``full``, every byte."""
    name = entry["name"]
    path = os.path.join(out_dir, name)
    try:
        size = os.path.getsize(path)
    except OSError:
        return [f"{name}: missing (distmerge wrote it; rerun the same command to write it again)"]
    if size != entry["bytes"]:
        return [f"{name}: {size} bytes on disk, distmerge wrote {entry['bytes']} (truncated or changed)"]
    if "header_sha256" in entry:
        return _check_shard(out_dir, entry, path, full)
    if full and file_sha256(path) != entry["sha256"]:
        return [f"{name}: its bytes differ from those distmerge wrote (sha256 mismatch: changed or corrupted)"]
    return []


def _check_shard(out_dir: str, entry: dict, path: str, full: bool) -> list[str]:
    name = entry["name"]
    with open(path, "rb") as f:
        header = f.read(entry["header_bytes"])
        if hashlib.sha256(header).hexdigest() != entry["header_sha256"]:
            return [f"{name}: its safetensors header differs from the one distmerge wrote (changed or corrupted)"]
        if not full:
            return []
        record = read_json(record_path(out_dir, name))
        if record is None or not isinstance(record.get("tensors"), list):
            return [f"{name}: no readable record in {STATE_DIR}/{RECORDS_DIR} (was the run finished?)"]
        entries, _ = read_header(path)  # the header is the one written: it parses
        problems, digests = [], []
        for t in record["tensors"]:
            e = entries.get(t.get("name"))
            if e is None:
                return [f"{name}: its record names tensor {t.get('name')!r}, which its header lacks (record corrupted?)"]
            digests.append(_sha256_range(f, e.begin, e.end))
            if digests[-1] != t.get("sha256"):
                problems.append(f"{name}: tensor {t['name']} does not match its recorded sha256 (corrupted on disk?)")
    tree = hashlib.sha256(hashlib.sha256(header).digest() + b"".join(bytes.fromhex(d) for d in digests)).hexdigest()
    covered = len(header) + sum(e.nbytes for e in entries.values())
    if not problems and (tree != entry["sha256_tree"] or covered != entry["bytes"] or len(digests) != len(entries)):
        problems.append(f"{name}: its header and tensors do not add up to the manifest's sha256_tree (record or manifest changed?)")
    return problems


def _sha256_range(f, begin: int, end: int) -> str:
    f.seek(begin)
    h = hashlib.sha256()
    left = end - begin
    while left:
        chunk = f.read(min(left, 1 << 24))
        if not chunk:
            break
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


def _check_config(out_dir: str, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    try:
        with open(os.path.join(out_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return ["config.json: missing or unreadable"]
    problems = []
    layers = {i for n in shapes if (i := layer_index(n)) is not None}
    stated = layer_count(config)
    if stated is not None and layers and stated != len(layers):
        key = layer_count_key(config)
        problems.append(f"config.json: {key} is {stated}, the weights have {len(layers)} layers")
    if layers and layers != set(range(len(layers))):
        problems.append(f"layers are not numbered 0..{len(layers) - 1}")
    embed = next((s for n, s in shapes.items() if n.endswith("embed_tokens.weight")), None)
    if embed is not None and len(embed) == 2:
        for key, value in (("vocab_size", embed[0]), ("hidden_size", embed[1])):
            if key in config and config[key] != value:
                problems.append(f"config.json: {key} is {config[key]}, the embeddings imply {value}")
    return problems
