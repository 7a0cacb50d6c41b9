"""LoRA extraction: a PEFT adapter that turns a base model B into a fine-tune M, from
truncated SVDs of the task vector Δ = M − B of every 2-D linear weight.

    Δ = U Σ Vᵀ (thin SVD, float32)        keep the top r singular triplets
    B_lora = U_r √Σ_r    [out, r]          A_lora = √Σ_r V_rᵀ    [r, in]
    W_B + B_lora A_lora = W_B + Δ_r,  ‖Δ − Δ_r‖_F = sqrt(Σ_{i>r} σᵢ²)  (Eckart–Young)

The √Σ split gives both factors the same scale. ``lora_alpha`` = r for every module, so
PEFT's scaling alpha / r is 1 and the adapter adds exactly B_lora A_lora.

What is decomposed, what is saved whole, what is left out (each with its reason):
  * 2-D ``*.weight`` tensors but the vocabulary ones: LoRA factors (``target_modules``).
  * embeddings, LM head, norms, any other tensor: saved whole as PEFT ``modules_to_save``
    when they differ from the base (mergekit-extract-lora's default), or left out with
    ``skip_full``; a bit-identical tensor is left out (the base already holds it).
  * the bias of a decomposed linear layer: left out (PEFT LoRA does not carry it here).
  * tensors in only one of the two models: left out.

Ranks: every rank plans the same work and takes its share (largest SVD cost m·n·min(m, n)
first, each to the least loaded rank); each tensor's result is a part file in
``OUT/.lora-parts`` (written then renamed: whole or absent), so a rerun of the same command
computes only the missing ones. Rank 0 then streams the parts into ``adapter_model.safetensors``
(written as ``.partial`` and renamed). SVDs on the CPU run on one thread: LAPACK's float32
bits depend on the thread count, and then the bytes do not depend on the number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import time
from dataclasses import asdict, dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distmerge import dist
from distmerge.architecture import is_vocab_tensor
from distmerge.errors import MergeError
from distmerge.faults import fault_point
from distmerge.io.header import DTYPE_NAMES, DTYPES
from distmerge.io.reader import TensorReader
from distmerge.io.writer import PARTIAL, fsync_dir, publish, raw_bytes, write_atomic
from distmerge.sources import Checkpoint, load_checkpoint

PARTS = ".lora-parts"
PLAN = "plan.json"
ADAPTER, CONFIG = "adapter_model.safetensors", "adapter_config.json"
PREFIX = "base_model.model."


# ---------------------------------------------------------------- the math


def svd(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``delta`` in float32, on one CPU thread (see the module docstring)."""
    delta = delta.float()
    threads = torch.get_num_threads()
    if delta.device.type != "cpu" or threads == 1:
        return torch.linalg.svd(delta, full_matrices=False)
    torch.set_num_threads(1)
    try:
        return torch.linalg.svd(delta, full_matrices=False)
    finally:
        torch.set_num_threads(threads)


def factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (√Σ_r V_rᵀ, U_r √Σ_r) of the first ``rank`` singular triplets."""
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


def lora_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, in] and B [out, r] with B A the best rank-r approximation of ``delta`` [out, in]
    (r = min(rank, out, in)), in float32."""
    u, s, vh = svd(delta)
    return factors(u, s, vh, min(rank, s.numel()))


def energy_rank(s: torch.Tensor, fraction: float) -> int:
    """The smallest r with Σ_{i<r} σᵢ² ≥ fraction · Σ σᵢ² (``s`` descending); 1 when Δ = 0."""
    energy = s.double() ** 2
    total = float(energy.sum())
    if total == 0:
        return 1
    kept = torch.cumsum(energy, 0)
    # The tolerance absorbs the float64 sum's rounding at fraction = 1.
    return min(int((kept < fraction * total * (1 - 1e-12)).sum()) + 1, s.numel())


# ---------------------------------------------------------------- what to do


@dataclass(kw_only=True, slots=True)
class ExtractOptions:
    rank: int = 16
    """Rank of every decomposed weight (unless ``module_ranks`` or ``energy`` says otherwise)."""
    module_ranks: list[tuple[str, int]] = field(default_factory=list)
    """(pattern, rank): a pattern names a module or a run of its dotted components
    ("mlp", "self_attn.q_proj", "layers.0.mlp"); the longest matching pattern wins."""
    energy: float | None = None
    """Instead of a fixed rank: the smallest r keeping this fraction of Σσ², per tensor."""
    dtype: str | None = None
    """dtype of the factors and whole tensors; None: the model's."""
    skip_full: bool = False
    """Leave out the tensors that are not decomposed instead of saving them whole."""
    device: str = "cpu"
    timeout_s: float = 600.0


@dataclass(slots=True)
class Item:
    """One tensor of M to handle: ``lora`` (its factors) or ``full`` (saved whole)."""

    name: str
    kind: str
    shape: list[int]
    rank: int | None = None

    @property
    def cost(self) -> float:
        if self.kind == "lora":
            m, n = self.shape
            return float(m) * n * min(m, n)
        return float(torch.Size(self.shape).numel())


def module_of(name: str) -> str:
    return name.rsplit(".", 1)[0]


def matches(pattern: str, module: str) -> bool:
    """Whether ``pattern`` is a run of whole dotted components of ``module``."""
    return f".{pattern}." in f".{module}."


def rank_for(module: str, options: ExtractOptions) -> int:
    best = None
    for pattern, r in options.module_ranks:
        if matches(pattern, module) and (best is None or len(pattern) >= len(best[0])):
            best = (pattern, r)
    return best[1] if best else options.rank


def check_options(options: ExtractOptions) -> None:
    if options.rank < 1:
        raise MergeError(f"--rank {options.rank}: a rank is at least 1")
    for pattern, r in options.module_ranks:
        if r < 1:
            raise MergeError(f"--module-rank {pattern}={r}: a rank is at least 1")
    if options.energy is not None and not 0 < options.energy <= 1:
        raise MergeError(f"--rank-by-energy {options.energy}: give a fraction in (0, 1], e.g. 0.9")
    if options.energy is not None and options.module_ranks:
        raise MergeError("--rank-by-energy chooses every tensor's rank itself: give it or --module-rank, not both")
    if options.dtype is not None and options.dtype not in ("float32", "bfloat16", "float16"):
        raise MergeError(f"--dtype {options.dtype}: give float32, bfloat16 or float16")


def plan(base: Checkpoint, model: Checkpoint, options: ExtractOptions) -> tuple[list[Item], list[tuple[str, str]]]:
    """The tensors of ``model`` to decompose or save, in its order, and those left out with why."""
    for ck in (base, model):
        if ck.quant or ck.adapter_path or any(t.lora or t.quant or t.file.endswith((".bin", ".pt", ".pth", "/")) for t in ck.tensors.values()):
            raise MergeError(f"model {ck.ref!r}: extract-lora reads plain safetensors checkpoints; merge or dequantize it first with `distmerge run`")
    items, left_out = [], []
    lora_modules = {module_of(n) for n, t in model.tensors.items()
                    if len(t.shape) == 2 and n.endswith(".weight") and not is_vocab_tensor(n) and n in base.tensors}  # fmt: skip
    for name, t in model.tensors.items():
        b = base.tensors.get(name)
        if b is None:
            left_out.append((name, f"not in the base {base.ref!r}"))
            continue
        if tuple(b.shape) != tuple(t.shape):
            raise MergeError(
                f"{name}: shape {list(t.shape)} in {model.ref!r} but {list(b.shape)} in the base {base.ref!r}; "
                "extract a LoRA between a model and its own base"
            )
        if name.endswith(".weight") and module_of(name) in lora_modules:
            items.append(Item(name=name, kind="lora", shape=list(t.shape), rank=rank_for(module_of(name), options)))
        elif module_of(name) in lora_modules:
            left_out.append((name, "a decomposed layer's bias: a PEFT LoRA adapter does not carry it; the base's stays"))
        elif options.skip_full:
            left_out.append((name, "not a decomposed linear weight (embedding, LM head, norm, ...), and --skip-full leaves those out"))
        else:
            items.append(Item(name=name, kind="full", shape=list(t.shape)))
    left_out += [(n, f"not in the model {model.ref!r}") for n in base.tensors if n not in model.tensors]
    if not any(i.kind == "lora" for i in items):
        raise MergeError(f"{model.ref!r} and {base.ref!r} share no 2-D linear weight to decompose; are they one family?")
    return items, left_out


def assign(items: list[Item], world_size: int) -> list[list[int]]:
    """Indices of ``items`` per rank: largest cost first, each to the least loaded rank."""
    shares: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0.0] * world_size
    for i in sorted(range(len(items)), key=lambda i: (-items[i].cost, i)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        shares[r].append(i)
        loads[r] += items[i].cost
    return shares


# ---------------------------------------------------------------- one tensor


def part_path(out: str, index: int) -> str:
    return os.path.join(out, PARTS, f"{index:06d}.safetensors")


def compute(item: Item, base: Checkpoint, model: Checkpoint, reader: TensorReader, options: ExtractOptions, device: str) -> tuple[dict, dict]:
    """One item's tensors (the part file's) and metadata."""

    def read(ck: Checkpoint) -> torch.Tensor:
        t = ck.tensors[item.name]
        return reader.read(os.path.join(ck.path, t.file), t.dtype, tuple(t.shape), t.begin, t.end)

    b, m = read(base), read(model)
    out_dtype = DTYPES[options.dtype] if options.dtype else DTYPES[model.tensors[item.name].dtype]
    if item.kind == "full":
        if torch.equal(b, m):
            return {}, {"unchanged": "1"}
        return {"w": m.to(out_dtype).contiguous()}, {}
    delta = m.to(device=device, dtype=torch.float32) - b.to(device=device, dtype=torch.float32)
    u, s, vh = svd(delta)
    r = energy_rank(s, options.energy) if options.energy is not None else min(item.rank, s.numel())
    a, bb = factors(u, s, vh, r)
    dropped = float((s[r:].double() ** 2).sum().sqrt())
    return {"a": a.to("cpu", out_dtype).contiguous(), "b": bb.to("cpu", out_dtype).contiguous()}, {"rank": str(r), "dropped": repr(dropped)}


def save_part(path: str, tensors: dict, meta: dict) -> None:
    """Whole or absent: written as ``.partial``, then published (fsynced, renamed)."""
    save_file(tensors, path + PARTIAL, metadata=meta)
    publish(path)


# ---------------------------------------------------------------- assembling


def assemble(out: str, items: list[Item], base_ref: str) -> tuple[dict, list[str]]:
    """Stream the parts into ``adapter_model.safetensors`` and write ``adapter_config.json``;
    returns the config and the tensors left out as equal to the base's."""
    header, order, offset, ranks, full, unchanged = {}, [], 0, {}, [], []
    for i, item in enumerate(items):
        with safe_open(part_path(out, i), "pt") as f:
            meta = f.metadata() or {}
            keys = sorted(f.keys())
            if item.kind == "lora":
                ranks[module_of(item.name)] = int(meta["rank"])
                names = {"a": f"{PREFIX}{module_of(item.name)}.lora_A.weight", "b": f"{PREFIX}{module_of(item.name)}.lora_B.weight"}
            else:
                if meta.get("unchanged"):
                    unchanged.append(item.name)
                    continue
                full.append(module_of(item.name))
                names = {"w": PREFIX + item.name}
            for k in keys:
                sl = f.get_slice(k)
                dtype, shape = DTYPES_BY_SAFETENSORS[sl.get_dtype()], sl.get_shape()
                nbytes = torch.Size(shape).numel() * dtype.itemsize
                header[names[k]] = {"dtype": DTYPE_NAMES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
                order.append((i, k))
                offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path = os.path.join(out, ADAPTER)
    with open(path + PARTIAL, "wb") as dst:
        dst.write(struct.pack("<Q", len(text)) + text)
        for i, k in order:
            with safe_open(part_path(out, i), "pt") as f:
                dst.write(raw_bytes(f.get_tensor(k).contiguous()))
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(path + PARTIAL, path)
    r = max(ranks.values())
    pattern = {m: k for m, k in ranks.items() if k != r}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_ref,
        "r": r,
        "lora_alpha": r,  # alpha = r for every module: PEFT's scaling alpha / r is 1
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
        "modules_to_save": sorted(set(full)) or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    write_atomic(os.path.join(out, CONFIG), json.dumps(config, indent=1))
    fsync_dir(out)
    return config, unchanged


DTYPES_BY_SAFETENSORS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


# ---------------------------------------------------------------- the job


@dataclass(slots=True)
class Result:
    items: list[Item]
    left_out: list[tuple[str, str]]
    computed: int
    """Tensors this rank computed in this run (the others were on disk from an earlier run or are another rank's)."""
    kept: int
    """Tensors of this rank's share found done by an earlier run."""
    seconds: float
    config: dict | None = None


def fingerprint(base: Checkpoint, model: Checkpoint, items: list[Item], options: ExtractOptions) -> str:
    """What a rerun must repeat to resume: the inputs' files (size, mtime), the work, the options."""
    files = {}
    for ck in (base, model):
        for f in sorted({t.file for t in ck.tensors.values()}):
            st = os.stat(os.path.join(ck.path, f))
            files[os.path.join(ck.path, f)] = [st.st_size, st.st_mtime_ns]
    opts = {k: v for k, v in asdict(options).items() if k not in ("timeout_s",)}
    text = json.dumps({"files": files, "items": [asdict(i) for i in items], "options": opts}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def prepare(out: str, print_: str) -> None:
    """On rank 0: OUT with its parts directory, fresh or resumed; refuse another run's OUT."""
    parts = os.path.join(out, PARTS)
    if os.path.exists(out) and not os.path.isdir(out):
        raise MergeError(f"{out} is a file; give a directory for the adapter")
    os.makedirs(out, exist_ok=True)
    if os.path.isdir(parts):
        try:
            with open(os.path.join(parts, PLAN)) as f:
                held = json.load(f).get("fingerprint")
        except (OSError, ValueError):
            held = None
        if held != print_:
            raise MergeError(f"{out} holds the parts of a different extraction (other inputs or options); rerun that command to resume it, or give a new OUT")
        return
    if any(n for n in os.listdir(out) if n != PARTS + ".tmp"):
        raise MergeError(f"{out} is not empty and holds no extraction in progress; give a new or empty OUT")
    tmp = parts + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp)
    write_atomic(os.path.join(tmp, PLAN), json.dumps({"fingerprint": print_}))
    os.rename(tmp, parts)
    fsync_dir(out)


def extract(base_ref: str, model_ref: str, out: str, options: ExtractOptions, say=lambda line: None) -> Result:
    """Write the adapter into ``out`` as this rank of the job (every rank calls it)."""
    start = time.monotonic()
    check_options(options)
    base, model = load_checkpoint(base_ref), load_checkpoint(model_ref)
    items, left_out = plan(base, model, options)
    print_ = fingerprint(base, model, items, options)
    out = os.path.abspath(out)
    group = dist.init(options.device, options.timeout_s)
    try:
        if os.path.isfile(os.path.join(out, ADAPTER)) and not os.path.isdir(os.path.join(out, PARTS)):
            raise MergeError(f"{out} already holds an adapter; give a new OUT")
        group.on_rank0("lora-prepare", lambda: prepare(out, print_))
        share = assign(items, group.world_size)[group.rank]
        computed = kept = 0
        with TensorReader() as reader:
            for n, i in enumerate(share):
                group.check_abort()
                path = part_path(out, i)
                if os.path.isfile(path):
                    kept += 1
                    continue
                try:
                    tensors, meta = compute(items[i], base, model, reader, options, group.device)
                    save_part(path, tensors, meta)
                except BaseException as e:
                    group.abort(f"{items[i].name}: {type(e).__name__}: {e}")
                    raise
                finally:
                    reader.release()
                computed += 1
                fault_point(group.rank, computed)
        group.wait_all("lora-parts")

        def finish():
            done = assemble(out, items, base_ref)
            shutil.rmtree(os.path.join(out, PARTS))
            fsync_dir(out)
            return done

        config, unchanged = group.on_rank0("lora-finish", finish)
        left_out += [(n, "equal to the base's (bit for bit): nothing to save") for n in unchanged]
    finally:
        group.close()
    return Result(items=items, left_out=left_out, computed=computed, kept=kept, seconds=time.monotonic() - start, config=config)


def modules_pattern(text: str) -> tuple[str, int]:
    """``--module-rank mlp=32`` -> ("mlp", 32)."""
    m = re.fullmatch(r"\s*([\w.]+)\s*=\s*(-?\d+)\s*", text)
    if not m:
        raise MergeError(f"--module-rank {text!r}: give MODULE=RANK, e.g. mlp=32 or self_attn.q_proj=8")
    return m[1], int(m[2])
