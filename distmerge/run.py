"""Execute a plan: merge this rank's output files tensor by tensor, streaming.

Memory stays bounded by one tensor's inputs and result: inputs are memory-mapped, merged
in float32, cast, appended to the output file, and dropped before the next tensor.
Each finished file is recorded in the output's manifest (bytes, sha256, tensors), so a
rerun skips it; a file that was being written when the job died is discarded and redone.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

from distmerge import methods
from distmerge.errors import MergeError
from distmerge.io.header import DTYPES
from distmerge.io.reader import TensorReader
from distmerge.io.writer import PARTIAL, ShardWriter, write_atomic
from distmerge.plan import FILE_METADATA, InputRef, OutputFile, OutputTensor, Plan, assign_files

STATE_DIR = ".distmerge"
"""Bookkeeping inside the output directory: the plan and one record per finished file."""


@dataclass(slots=True)
class RunOptions:
    device: str = "cpu"
    """Where the math runs: "cpu" or "cuda[:N]"."""
    allow_nonfinite: bool = False
    """Keep going when a merged tensor has NaN or Inf (default: stop and name the tensor)."""
    progress: bool = True


def merge_tensor(plan: Plan, t: OutputTensor, reader: TensorReader, device: str = "cpu") -> torch.Tensor:
    """The merged value of one output tensor, in its output dtype."""
    method = methods.get(plan.method)
    work = DTYPES[_work_dtype(plan, t)]

    def load(ref: InputRef) -> torch.Tensor:
        x = reader.read(os.path.join(plan.models[ref.model].path, ref.file), ref.dtype, tuple(t.shape), ref.begin, ref.end)
        x = x.to(device)
        if not x.is_floating_point():
            return x
        # Like mergekit: round inputs to the recipe's dtype first, then compute in float32.
        return x.to(work).to(torch.float32)

    inputs = [load(r) for r in t.inputs]
    base = load(t.base) if t.base else None
    if not inputs[0].is_floating_point():
        return (base if base is not None else inputs[0]).to(DTYPES[t.dtype])  # integer buffers are copied
    kwargs = {method.param_index[k].arg: v for k, v in {**t.params, **t.input_params}.items()}
    if t.seeds is not None:
        kwargs["seeds"] = t.seeds
    out = method.merge(base, inputs, **kwargs)
    # Round to the compute dtype first, as mergekit returns it, then to the output dtype.
    return out.to(work).to(DTYPES[t.dtype])


def _work_dtype(plan: Plan, t: OutputTensor) -> str:
    from distmerge.plan import TORCH_DTYPE_NAMES

    if plan.dtype:
        return TORCH_DTYPE_NAMES[plan.dtype]
    dtypes = {r.dtype for r in t.all_inputs}
    return dtypes.pop() if len(dtypes) == 1 else "F32"


def state_dir(out_dir: str) -> str:
    return os.path.join(out_dir, STATE_DIR)


def record_path(out_dir: str, file: OutputFile) -> str:
    return os.path.join(state_dir(out_dir), "files", file.name + ".json")


def is_done(out_dir: str, file: OutputFile) -> bool:
    """A file counts as done when its record exists and the file on disk has the recorded size."""
    try:
        with open(record_path(out_dir, file)) as f:
            record = json.load(f)
        return record["bytes"] == file.nbytes == os.path.getsize(os.path.join(out_dir, file.name))
    except (OSError, ValueError, KeyError):
        return False


def run_rank(
    plan: Plan,
    out_dir: str,
    rank: int = 0,
    world_size: int = 1,
    options: RunOptions | None = None,
    between: Callable[[], None] | None = None,
) -> list[str]:
    """Write this rank's files into ``out_dir`` (which must exist). Returns the names written now.

    ``between`` is called before every tensor (the job uses it to stop when another rank failed).
    """
    options = options or RunOptions()
    mine = [plan.files[i] for i in assign_files(plan, world_size)[rank]]
    todo = [f for f in mine if not is_done(out_dir, f)]
    os.makedirs(os.path.dirname(record_path(out_dir, plan.files[0])), exist_ok=True)
    bar = _progress(sum(len(f.tensors) for f in todo), rank, options.progress)
    written = []
    with TensorReader() as reader:
        for file in todo:
            _write_file(plan, file, out_dir, reader, options, bar, between)
            written.append(file.name)
    if bar is not None:
        bar.close()
    return written


def _write_file(plan: Plan, file: OutputFile, out_dir: str, reader: TensorReader, options: RunOptions, bar, between) -> None:
    by_name = {t.name: t for t in plan.tensors}
    tensors = [by_name[name] for name in file.tensors]
    path = os.path.join(out_dir, file.name)
    try:
        writer = ShardWriter(path, [(t.name, t.dtype, tuple(t.shape)) for t in tensors], FILE_METADATA)
    except OSError as e:
        raise MergeError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        for t in tensors:
            if between is not None:
                between()
            value = merge_tensor(plan, t, reader, options.device)
            if value.is_floating_point() and not options.allow_nonfinite and not torch.isfinite(value).all():
                bad = int((~torch.isfinite(value)).sum())
                raise MergeError(
                    f"tensor {t.name!r}: the merge produced {bad} NaN/Inf values; check the recipe's "
                    "parameters for this tensor, or pass --allow-nonfinite to keep them"
                )
            writer.write(t.name, value)
            del value
            reader.release()
            if bar is not None:
                bar.update(1)
        sha256 = writer.finish()
    except OSError as e:
        writer.abort()
        raise MergeError(
            f"writing {path} failed: {e.strerror or e}; nothing half-written is kept: "
            "fix the cause (free disk space?) and rerun the same command to resume"
        ) from None
    except BaseException:
        writer.abort()
        raise
    record = {"file": file.name, "bytes": file.nbytes, "sha256": sha256, "tensors": file.tensors, "time": time.time()}
    write_atomic(record_path(out_dir, file), json.dumps(record, indent=1))


def _progress(total: int, rank: int, enabled: bool):
    if not enabled or rank != 0 or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="merging", unit="tensor", mininterval=1.0)


def discard_partials(out_dir: str) -> None:
    """Remove files left half-written by an interrupted run."""
    for name in os.listdir(out_dir):
        if name.endswith(PARTIAL):
            os.remove(os.path.join(out_dir, name))
