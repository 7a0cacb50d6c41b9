"""Check a finished output directory against its manifest, its index, and its config.

Cheap mode reads headers and sizes only; full mode also re-hashes every tensor's bytes
and compares them with the sha256 each rank recorded when it wrote them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

from distmerge.errors import MergeError
from distmerge.io.header import read_header
from distmerge.io.writer import PARTIAL

INDEX_FILE = "model.safetensors.index.json"
RECORDS = os.path.join(".distmerge", "files")
LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def verify(out_dir: str, full: bool = False) -> list[str]:
    """Every problem found in ``out_dir``; an empty list means it checks out."""
    try:
        with open(os.path.join(out_dir, INDEX_FILE)) as f:
            index = json.load(f)
        weight_map: dict[str, str] = index["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{INDEX_FILE}: missing or unreadable ({e})"]
    problems: list[str] = []
    headers = {}
    by_file: dict[str, set[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, set()).add(name)
    for file, names in sorted(by_file.items()):
        path = os.path.join(out_dir, file)
        try:
            entries, _ = read_header(path)
        except MergeError as e:
            problems.append(str(e))
            continue
        headers[file] = entries
        if set(entries) != names:
            extra, missing = sorted(set(entries) - names), sorted(names - set(entries))
            problems.append(f"{file}: holds {extra[:3]} not in the index, lacks {missing[:3]} the index puts there")
        problems += _check_record(out_dir, file, path, entries, full)
    total = sum(e.nbytes for entries in headers.values() for e in entries.values())
    if headers and len(headers) == len(by_file) and index.get("metadata", {}).get("total_size") != total:
        problems.append(f"{INDEX_FILE}: metadata.total_size is {index.get('metadata', {}).get('total_size')}, tensors hold {total} bytes")
    leftovers = sorted(n for n in os.listdir(out_dir) if n.endswith(PARTIAL))
    if leftovers:
        problems.append(f"unfinished files left: {', '.join(leftovers[:3])}")
    problems += _check_config(out_dir, {n: e.shape for entries in headers.values() for n, e in entries.items()})
    return problems


def _check_record(out_dir: str, file: str, path: str, entries, full: bool) -> list[str]:
    try:
        with open(os.path.join(out_dir, RECORDS, file + ".json")) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return [f"{file}: no manifest record in {RECORDS} (was the run finished?)"]
    problems = []
    size = os.path.getsize(path)
    if record.get("bytes") != size:
        problems.append(f"{file}: {size} bytes on disk, the manifest says {record.get('bytes')}")
    if full:
        with open(path, "rb") as f:
            for t in record.get("tensors", []):
                e = entries.get(t["name"])
                if e is None:
                    continue
                f.seek(e.begin)
                h = hashlib.sha256()
                left = e.nbytes
                while left:
                    chunk = f.read(min(left, 1 << 24))
                    if not chunk:
                        break
                    h.update(chunk)
                    left -= len(chunk)
                if h.hexdigest() != t["sha256"]:
                    problems.append(f"{file}: tensor {t['name']} does not match its recorded sha256 (corrupted on disk?)")
    return problems


def _check_config(out_dir: str, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    try:
        with open(os.path.join(out_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return ["config.json: missing or unreadable"]
    problems = []
    layers = {int(m[1]) for n in shapes if (m := LAYER.search(n))}
    if "num_hidden_layers" in config and layers and config["num_hidden_layers"] != len(layers):
        problems.append(f"config.json: num_hidden_layers is {config['num_hidden_layers']}, the weights have {len(layers)} layers")
    if layers and layers != set(range(len(layers))):
        problems.append(f"layers are not numbered 0..{len(layers) - 1}")
    embed = next((s for n, s in shapes.items() if n.endswith("embed_tokens.weight")), None)
    if embed is not None and len(embed) == 2:
        for key, value in (("vocab_size", embed[0]), ("hidden_size", embed[1])):
            if key in config and config[key] != value:
                problems.append(f"config.json: {key} is {config[key]}, the embeddings imply {value}")
    return problems
