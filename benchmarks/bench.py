#!/usr/bin/env python
"""Benchmark distmerge against mergekit 0.1.5 and against the I/O floor, on CPU (or GPU).

    python benchmarks/bench.py [--size-gb 2.5] [--deltas noise|lowrank-sparse] [--methods linear,ties,...]
                               [--skip-mergekit] [--ranks 1,2] [--json] [--device cpu|cuda] [--workdir DIR] [--keep]

For each merge method it runs, on the same checkpoints and with the inputs in the page cache:

* ``io-floor``     one Python process (torch and safetensors imported) that reads exactly the
                   input bytes the merge plan reads and writes as many bytes as the merge's
                   output files hold, fsynced, like distmerge, and exits as distmerge does
                   (``gc.freeze()`` first: no last collections of torch's objects);
* ``mergekit``     ``mergekit-yaml RECIPE OUT`` (skipped with --skip-mergekit);
* ``distmerge×N``  ``distmerge run`` for N = 1, torchrun with N processes otherwise.

and prints wall time, CPU time, peak RSS per rank, GB/s and ratios, then PASS/MISS lines for
the targets. See benchmarks/README.md for what exactly is measured and how.

The benchmarking process itself never imports torch: it stays small, so that the ru_maxrss of
its children is theirs (see README.md). Checkpoint generation, the I/O floor and the GPU kernel
measurement run in child processes of this same file (``bench.py _make|_floor|_kernel|_cuda``).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

HERE = Path(__file__).resolve()

ALL_METHODS = [
    "linear", "slerp", "task_arithmetic", "ties", "dare_ties", "breadcrumbs",
    "della", "model_stock", "sce", "passthrough",
]  # fmt: skip
IO_BOUND = {"linear", "task_arithmetic", "passthrough"}
COMPUTE_BOUND = {"ties", "della", "breadcrumbs", "sce", "model_stock", "dare_ties", "slerp"}
FLOOR_TARGET_IO, FLOOR_TARGET_OTHER = 1.2, 2.0  # issue 20 (issue 6 had 1.3 and 3.0)
MERGEKIT_TARGET = 1.5  # at least 1.5x faster than mergekit on one rank (issue 20)
RSS_TARGET = 0.25
SCALING_TARGET = 1.7

VOCAB = 32000
NOISE = 0.002  # fine-tune delta std; base matrices have std 0.02 (task vectors ~10% of the weights)
SHARDS_PER_MODEL = 5
MODELS = ("base", "ft1", "ft2")
GENERATOR_VERSION = 1  # bump when the checkpoints' content changes: they are regenerated
DELTAS = ("noise", "lowrank-sparse")
"""How a fine-tune differs from the base: ``noise``, NOISE x N(0, 1) on every element (the
default set); ``lowrank-sparse``, as real fine-tunes do, for each matrix a rank-LOWRANK_RANK
update plus a SPARSE_DENSITY fraction of larger changes, each half of the delta's energy (the
same total as ``noise``); vectors (norms) get ``noise``."""
LOWRANK_RANK = 16
SPARSE_DENSITY = 0.01


# =========================================================================== shapes


def choose_shape(model_bytes: float) -> dict:
    """A Llama shape (bf16) of about ``model_bytes``: the widest of TinyLlama-like shapes
    (hidden 2048, intermediate 5632, 32 heads of 64, 4 KV heads, vocab 32000) and its halvings
    that still gets at least 8 layers; the layer count sets the size."""
    for hidden in (2048, 1024, 512, 256, 128, 64):
        inter = hidden * 11 // 4
        heads = max(1, hidden // 64)
        kv = max(1, heads // 8)
        fixed = 2 * (2 * VOCAB * hidden + hidden)  # embed_tokens, lm_head, final norm
        layer = 2 * (2 * hidden * hidden + 2 * hidden * kv * 64 + 3 * hidden * inter + 2 * hidden)
        layers = round((model_bytes - fixed) / layer)
        if layers >= 8 or hidden == 64:
            layers = max(layers, 2)
            return {
                "num_layers": layers, "hidden": hidden, "intermediate": inter, "heads": heads,
                "kv_heads": kv, "vocab": VOCAB, "bytes": fixed + layers * layer,
            }  # fmt: skip
    raise AssertionError("unreachable")


def size_key(size_gb: float) -> str:
    return f"{size_gb:g}GB"


# =========================================================================== child: _make


def lowrank_sparse_delta(shape: tuple[int, int], gen):
    """A [m, n] fine-tune delta of about NOISE per element in RMS: U V^T of rank LOWRANK_RANK
    (half the energy) plus SPARSE_DENSITY of the elements drawn from N(0, s^2) with s chosen so
    that they carry the other half."""
    import torch

    m, n = shape
    r = min(LOWRANK_RANK, m, n)
    # U, V ~ N(0, 1): (U V^T)_ij has variance r; scaled to NOISE^2 / 2
    low = torch.randn(m, r, generator=gen) @ torch.randn(r, n, generator=gen)
    low.mul_(NOISE / math.sqrt(2 * r))
    k = max(1, round(SPARSE_DENSITY * m * n))
    idx = torch.randint(m * n, (k,), generator=gen)  # with replacement: a repeat adds up
    vals = torch.randn(k, generator=gen) * (NOISE * math.sqrt(m * n / (2 * k)))
    low.view(-1).index_add_(0, idx, vals)
    return low


def cmd_make(argv: list[str]) -> int:
    """bench.py _make ROOT SIZE_BYTES [DELTAS]: write ROOT/base, ROOT/ft1, ROOT/ft2 (bf16,
    sharded), the fine-tunes' deltas of the kind DELTAS names (default noise)."""
    import torch

    from distmerge.demo import llama_config, llama_tensor_shapes, save_safetensors, write_tokenizer

    root, size = Path(argv[0]), float(argv[1])
    deltas = argv[2] if len(argv) > 2 else "noise"
    shape = choose_shape(size)
    config = llama_config(
        num_layers=shape["num_layers"], hidden=shape["hidden"], intermediate=shape["intermediate"],
        heads=shape["heads"], kv_heads=shape["kv_heads"], vocab=shape["vocab"], max_position_embeddings=2048,
    )  # fmt: skip
    shapes = llama_tensor_shapes(config)
    nbytes = [2 * math.prod(s) for _, s in shapes]
    # Pack tensors in order into shards of at most total / SHARDS_PER_MODEL (save_pretrained style).
    cap = math.ceil(sum(nbytes) / SHARDS_PER_MODEL)
    groups: list[list[int]] = [[]]
    acc = 0
    for i, b in enumerate(nbytes):
        if groups[-1] and acc + b > cap:
            groups.append([])
            acc = 0
        groups[-1].append(i)
        acc += b
    files = [f"model-{k:05d}-of-{len(groups):05d}.safetensors" for k in range(1, len(groups) + 1)]

    def weights(model: int, i: int) -> torch.Tensor:
        name, s = shapes[i]
        w = torch.randn(s, generator=torch.Generator().manual_seed(1_000_003 * 17 + i))
        if len(s) == 1:
            w.mul_(0.02).add_(1.0)
        else:
            w.mul_(0.02)
        if model:  # a fine-tune: base (float32) + its delta, rounded to bf16
            gen = torch.Generator().manual_seed(1_000_003 * (17 + 7919 * model) + i)
            if deltas == "lowrank-sparse" and len(s) == 2:
                w.add_(lowrank_sparse_delta(s, gen))
            else:
                w.add_(torch.randn(s, generator=gen), alpha=NOISE)
        return w.to(torch.bfloat16)

    root.mkdir(parents=True, exist_ok=True)
    for m, mname in enumerate(MODELS):
        tmp = root / f".{mname}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        weight_map = {}
        for fname, group in zip(files, groups):
            part = {shapes[i][0]: weights(m, i) for i in group}
            save_safetensors(part, tmp / fname, metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
            del part
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": sum(nbytes)}, "weight_map": weight_map}, indent=2)
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(
            json.dumps({"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2}, indent=2)
        )
        write_tokenizer(tmp, vocab=shape["vocab"], model_max_length=2048)
        shutil.rmtree(root / mname, ignore_errors=True)
        os.replace(tmp, root / mname)
        print(f"  wrote {root / mname}: {len(files)} shards, {sum(nbytes) / 1e9:.3f} GB", flush=True)
    os.sync()  # flush now, so that writeback does not run during the timed runs
    return 0


# =========================================================================== child: _floor


def cmd_floor(argv: list[str]) -> int:
    """bench.py _floor SPEC.json OUT_DIR [--buffered]: read the plan's input byte ranges, write
    as many bytes as its output files (NAME.partial, fsync, rename, fsync the directory), exit.

    The bytes are written around the page cache (``O_DIRECT``, from a page-aligned buffer; the
    last partial block through it), as distmerge writes them, where the file system allows:
    on this project's machines buffered writes cost the kernel several seconds of a core per
    2 GB. ``--buffered`` writes through the page cache (the floor before 2026-12-02)."""
    import mmap

    import safetensors  # noqa: F401  (the import cost every merge tool pays)
    import torch  # noqa: F401

    spec = json.loads(Path(argv[0]).read_text())
    out = Path(argv[1])
    direct = "--buffered" not in argv[2:] and hasattr(os, "O_DIRECT")
    chunk = 64 << 20
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    view = memoryview(buf)
    read = 0
    for path, begin, end in spec["reads"]:
        fd = os.open(path, os.O_RDONLY)
        try:
            pos = begin
            while pos < end:
                n = os.preadv(fd, [view[: min(chunk, end - pos)]], pos)
                if n <= 0:
                    raise OSError(f"{path}: short read at {pos}")
                pos += n
                read += n
        finally:
            os.close(fd)
    out.mkdir(parents=True, exist_ok=True)
    fds = []
    written = direct_bytes = 0
    for name, nbytes in spec["files"]:
        path = out / (name + ".partial")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        wfd = fd
        if direct:
            try:
                wfd = os.open(path, os.O_WRONLY | os.O_DIRECT)
            except OSError:  # no direct I/O on this file system
                pass
        pos, aligned = 0, nbytes // 4096 * 4096 if wfd != fd else 0
        while pos < aligned:
            pos += os.pwrite(wfd, view[: min(chunk, aligned - pos)], pos)
        while pos < nbytes:
            pos += os.pwrite(fd, view[: min(chunk, nbytes - pos)], pos)
        written += nbytes
        direct_bytes += aligned
        if wfd != fd:
            os.close(wfd)
        fds.append((fd, name))
    for fd, name in fds:
        os.fsync(fd)
        os.close(fd)
        os.replace(out / (name + ".partial"), out / name)
    dfd = os.open(out, os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)
    print(json.dumps({"read": read, "written": written, "written_direct": direct_bytes}))
    gc.freeze()  # the exit distmerge's command has (cli.entry): without torch's 0.4-0.6 s of last collections
    return 0


# =========================================================================== child: _cuda, _kernel


def cmd_cuda(argv: list[str]) -> int:
    """bench.py _cuda: is there a CUDA GPU? (JSON on stdout)"""
    import torch

    ok = torch.cuda.is_available()
    info = {"available": ok}
    if ok:
        p = torch.cuda.get_device_properties(0)
        info["name"] = p.name
        clock, width = getattr(p, "memory_clock_rate", None), getattr(p, "memory_bus_width", None)
        if clock and width:  # kHz, bits; double data rate
            info["theoretical_bw"] = 2 * clock * 1e3 * width / 8
        x = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
        y = torch.empty_like(x)
        y.copy_(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            y.copy_(x)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        info["copy_bw"] = 2 * x.numel() * 4 / min(times)  # read + write
    print(json.dumps(info))
    return 0


def cmd_kernel(argv: list[str]) -> int:
    """bench.py _kernel RECIPE DEVICE SHARD_BYTES: time distmerge's math for the plan's largest
    layer tensor with its inputs already on DEVICE (no file I/O); JSON on stdout."""
    import torch

    from distmerge.io.reader import TensorReader
    from distmerge.job import JobOptions, make_plan
    from distmerge.tensor_merge import MergeContext, merge_tensor

    recipe, device, shard = argv[0], argv[1], int(argv[2])
    plan = make_plan(recipe, JobOptions(out_shard_bytes=shard, seed=0))
    t = max(plan.tensors, key=lambda t: (t.layer is not None, t.read_bytes))

    class Preloaded:  # the reader interface merge_tensor uses, serving tensors already on device
        def __init__(self):
            self.cache, self.files = {}, TensorReader()

        def read(self, path, dtype, shape, begin, end):
            key = (path, begin, end)
            if key not in self.cache:
                self.cache[key] = self.files.read(path, dtype, shape, begin, end).to(device).clone()
            return self.cache[key]

        def drop(self, view):  # (nothing is mapped from a file here: the inputs stay for the next call)
            pass

    reader = Preloaded()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    merge_tensor(plan, t, MergeContext(reader, device))  # warm-up (and loads the inputs)
    sync()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        merge_tensor(plan, t, MergeContext(reader, device))
        sync()
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    nbytes = t.read_bytes + t.nbytes
    print(json.dumps({"tensor": t.name, "shape": list(t.shape), "bytes": nbytes, "seconds": sec, "gbps": nbytes / sec / 1e9}))
    return 0


# =========================================================================== measuring


@dataclass
class Run:
    method: str
    runner: str
    cmd: list[str]
    repeat: int = 0
    """Which of ``--repeat`` rounds (the runners alternate within a round)."""
    rc: int | None = None
    error: str | None = None
    wall: float | None = None
    cpu_user: float | None = None
    cpu_sys: float | None = None
    ru_maxrss: int | None = None
    """Bytes: ru_maxrss of the direct child from wait4 (max over it and its reaped descendants)."""
    vmhwm: dict = field(default_factory=dict)
    """Polled VmHWM, bytes: {"rank N" or "main": peak} for the child or each torchrun worker."""
    rank_rss: list = field(default_factory=list)
    """Peak RSS per rank, bytes (what the table shows)."""
    self_reported: dict = field(default_factory=dict)
    """distmerge's own line: seconds (after start-up) and rank 0's peak RSS."""
    in_bytes: int = 0
    out_bytes: int = 0
    out_on_disk: int | None = None
    log: str = ""

    @property
    def cpu(self) -> float | None:
        return None if self.cpu_user is None else self.cpu_user + self.cpu_sys

    @property
    def gbps(self) -> float | None:
        return (self.in_bytes + self.out_bytes) / self.wall / 1e9 if self.ok else None

    @property
    def ok(self) -> bool:
        return self.rc == 0 and self.error is None and self.wall is not None

    @property
    def peak(self) -> int | None:
        return max(self.rank_rss) if self.rank_rss else None


def representatives(results: list[Run]) -> dict[tuple[str, str], Run]:
    """Per (method, runner), in the order first run: the round with the median wall time (the
    lower of the two middle ones for an even count) carrying the highest peak RSS per rank of
    all its rounds; a failed round makes the runner's figure that failure."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in results:
        groups.setdefault((r.method, r.runner), []).append(r)
    chosen = {}
    for key, runs in groups.items():
        failed = [r for r in runs if not r.ok]
        if failed:
            chosen[key] = failed[0]
            continue
        median = sorted(runs, key=lambda r: r.wall)[(len(runs) - 1) // 2]
        peaks = [max(ranks) for ranks in zip(*(r.rank_rss for r in runs))] if all(len(r.rank_rss) == len(median.rank_rss) for r in runs) else median.rank_rss
        chosen[key] = replace(median, rank_rss=peaks)
    return chosen


def _status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def _rank_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(b"RANK="):
                    return int(item[5:])
    except (OSError, ValueError):
        pass
    return None


RUN_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
"""The runners' environment: this one, but Python writes byte code, as on a user's machine. With
PYTHONDONTWRITEBYTECODE set (this project's machines set it), every run of every tool compiled
the source of everything it imports again, seconds of each run (mergekit's slerp row: 31.7 s
with it set, 17.9 s without, 2026-12-02)."""


def measure(run: Run, log_path: Path, timeout: float, env: dict | None = None, per_rank: bool = False) -> None:
    """Run ``run.cmd``; fill wall, CPU, ru_maxrss, polled VmHWM (of the child, or with
    ``per_rank`` of every descendant that has RANK in its environment)."""
    run.log = str(log_path)
    hwm: dict[int, int] = {}
    ranks: dict[int, int | None] = {}
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        p = subprocess.Popen(run.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = t0 + timeout
    killed = False
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        todo, seen = [p.pid], []
        while todo:  # the child and all its descendants
            q = todo.pop()
            seen.append(q)
            todo += _children(q)
        for q in seen:
            if per_rank and ranks.get(q) is None:
                # A worker counts once it has exec'd (RANK is in its new environment): before
                # that, a forked child still holds torchrun's pages and environment.
                ranks[q] = _rank_of(q)
                if ranks[q] is None:
                    continue
            kb = _status_kb(q, "VmHWM:")
            if kb is not None:
                hwm[q] = max(hwm.get(q, 0), kb * 1024)
        if not killed and time.perf_counter() > deadline:
            os.killpg(p.pid, signal.SIGKILL)  # the session this run started (start_new_session)
            killed = True
        time.sleep(0.05)
    run.wall = time.perf_counter() - t0
    p.returncode = run.rc = os.waitstatus_to_exitcode(status)
    run.cpu_user, run.cpu_sys = ru.ru_utime, ru.ru_stime
    run.ru_maxrss = ru.ru_maxrss * 1024
    if killed:
        run.error = f"timed out after {timeout:.0f}s"
    elif run.rc != 0:
        tail = Path(log_path).read_text(errors="replace").strip().splitlines()[-5:]
        run.error = f"exit code {run.rc}: " + " | ".join(tail)
    if per_rank:
        by_rank: dict[int, int] = {}
        for q, r in ranks.items():
            if r is not None and q in hwm:
                by_rank[r] = max(by_rank.get(r, 0), hwm[q])
        run.vmhwm = {f"rank {r}": b for r, b in sorted(by_rank.items())}
        run.rank_rss = [b for _, b in sorted(by_rank.items())]
    else:
        run.vmhwm = {"main": hwm.get(p.pid, 0)}
        # ru_maxrss is exact here: the launcher (this process) is far smaller than any child,
        # so its pages counted at fork/exec do not matter; the polled VmHWM is the cross-check.
        run.rank_rss = [max(run.ru_maxrss, hwm.get(p.pid, 0))]


# =========================================================================== recipes and plans


def recipe_text(method: str, models: dict[str, Path], layers: int) -> str:
    b, f1, f2 = (str(models[m]) for m in MODELS)
    tail = "dtype: bfloat16\n"
    two = lambda params: (  # noqa: E731  base + the two fine-tunes with per-model parameters
        f"base_model: {b}\nmodels:\n"
        f"  - model: {f1}\n    parameters: {params}\n"
        f"  - model: {f2}\n    parameters: {params}\n"
    )
    if method == "linear":
        return (
            f"merge_method: linear\nmodels:\n  - model: {b}\n    parameters: {{weight: 0.4}}\n"
            f"  - model: {f1}\n    parameters: {{weight: 0.3}}\n  - model: {f2}\n    parameters: {{weight: 0.3}}\n" + tail
        )
    if method == "slerp":
        return f"merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {b}\n  - model: {f1}\nparameters:\n  t: 0.5\n" + tail
    if method == "task_arithmetic":
        return "merge_method: task_arithmetic\n" + two("{weight: 0.5}") + tail
    if method == "ties":
        return "merge_method: ties\n" + two("{weight: 0.5, density: 0.5}") + tail
    if method == "dare_ties":
        return "merge_method: dare_ties\n" + two("{weight: 0.5, density: 0.5}") + tail
    if method == "breadcrumbs":
        return "merge_method: breadcrumbs\n" + two("{weight: 0.5, density: 0.9, gamma: 0.01}") + tail
    if method == "della":
        return "merge_method: della\n" + two("{weight: 0.5, density: 0.5, epsilon: 0.1}") + "parameters:\n  lambda: 1.0\n" + tail
    if method == "model_stock":
        return f"merge_method: model_stock\nbase_model: {b}\nmodels:\n  - model: {f1}\n  - model: {f2}\n" + tail
    if method == "sce":
        return f"merge_method: sce\nbase_model: {b}\nmodels:\n  - model: {f1}\n  - model: {f2}\nparameters:\n  select_topk: 0.5\n" + tail
    if method == "passthrough":
        half = layers // 2
        return (
            "merge_method: passthrough\nslices:\n"
            f"  - sources:\n      - model: {b}\n        layer_range: [0, {half}]\n"
            f"  - sources:\n      - model: {f1}\n        layer_range: [{half}, {layers}]\n" + tail
        )
    raise ValueError(method)


def load_plan(distmerge: list[str], recipe: Path, shard: int) -> dict:
    out = subprocess.run(
        [*distmerge, "plan", str(recipe), "--json", "--out-shard-size", str(shard), "--random-seed", "0"],
        capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode:
        raise SystemExit(f"distmerge plan {recipe} failed:\n{out.stderr or out.stdout}")
    return json.loads(out.stdout)


def floor_spec(plan: dict) -> dict:
    """The union of the plan's input byte ranges (merged per file) and its output file sizes."""
    paths = [m["path"] for m in plan["models"]]
    ranges: dict[str, list[tuple[int, int]]] = {}
    for t in plan["tensors"]:
        for r in ([t["base"]] if t.get("base") else []) + t["inputs"]:
            ranges.setdefault(os.path.join(paths[r["model"]], r["file"]), []).append((r["begin"], r["end"]))
    reads = []
    for path, rs in sorted(ranges.items()):
        rs.sort()
        cur = list(rs[0])
        for b, e in rs[1:]:
            if b <= cur[1]:
                cur[1] = max(cur[1], e)
            else:
                reads.append([path, *cur])
                cur = [b, e]
        reads.append([path, *cur])
    return {"reads": reads, "files": [[f["name"], f["nbytes"]] for f in plan["files"]]}


def plan_bytes(plan: dict) -> tuple[int, int]:
    """(input bytes read, output bytes written, headers included) of a plan."""
    read = sum(r["end"] - r["begin"] for t in plan["tensors"] for r in ([t["base"]] if t.get("base") else []) + t["inputs"])
    return read, sum(f["nbytes"] for f in plan["files"])


# =========================================================================== helpers


def tool(name: str, module: str) -> list[str]:
    """The console script next to this Python (the venv's), else ``python -m module``."""
    exe = Path(sys.executable).parent / name
    return [str(exe)] if exe.exists() else [sys.executable, "-m", module]


def meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) if path.exists() else 0


def warm(files: list[Path]) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def run_args(recipe: Path, dest: Path, shard: int, dev: list[str]) -> list[str]:
    """``distmerge run``'s arguments, the same on every rank count and for the untimed first run."""
    return ["run", str(recipe), str(dest), "--out-shard-size", str(shard), "--random-seed", "0", *dev]


def compile_loops(cmd: list[str], dest: Path, timeout: float) -> float:
    """One untimed ``distmerge run`` of a method before its timed ones: a process's first call
    of each of numba's loops (``distmerge.kernels.loops``) compiles it and caches it on disk
    (4.6–8.7 s a method on this machine, see the README's quick start), which only a fresh
    install's first run pays. Without it, a benchmark from a new checkout or environment
    measured compiling: task_arithmetic 10.7 s and 0.81 GB against 5.9 s and 0.63 GB with the
    cache filled (2026-12-04)."""
    t0 = time.perf_counter()
    subprocess.run(cmd, env=RUN_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout, check=False)
    shutil.rmtree(dest, ignore_errors=True)
    return time.perf_counter() - t0


def self_reported(log: str) -> dict:
    m = re.search(r"in ([\d.]+)s, peak RSS ([\d.]+) (B|KB|MB|GB|TB) \(rank 0\)", log)
    if not m:
        return {}
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[m[3]]
    return {"seconds": float(m[1]), "peak_rss_rank0": int(float(m[2]) * scale)}


# =========================================================================== main


def parse_args(argv):
    ap = argparse.ArgumentParser(description="distmerge vs mergekit vs the I/O floor (see benchmarks/README.md)")
    ap.add_argument("--size-gb", type=float, default=2.5, help="size of each of the 3 checkpoints, GB (default 2.5)")
    ap.add_argument("--deltas", choices=DELTAS, default="noise",
                    help="the fine-tunes' deltas: noise on every element (default), or lowrank-sparse (low-rank plus sparse, as real fine-tunes)")
    ap.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated (default: all ten)")
    ap.add_argument("--skip-mergekit", action="store_true", help="do not run mergekit-yaml")
    ap.add_argument("--no-compile-run", action="store_true",
                    help="skip the untimed distmerge run before each method's timed ones (which fills numba's cache)")  # fmt: skip
    ap.add_argument("--ranks", default="1,2", help="distmerge rank counts to run (default 1,2)")
    ap.add_argument("--json", action="store_true", help="JSON dump on stdout (the table goes to stderr)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "distmerge-bench"),
                    help="checkpoints, recipes, logs, outputs (default /tmp/distmerge-bench)")  # fmt: skip
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints this run made (reused by later runs)")
    ap.add_argument("--out-shard-size", type=int, default=0,
                    help="largest output file, bytes, for both tools (default: a third of a checkpoint)")  # fmt: skip
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run before it is killed (default 1800)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of every runner per method, alternating (default 1); the table and targets take "
                         "each runner's median wall time and its highest peak RSS")  # fmt: skip
    args = ap.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in ALL_METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {ALL_METHODS}")
    try:
        args.ranks = sorted({int(r) for r in args.ranks.split(",") if r.strip()})
    except ValueError:
        ap.error("--ranks takes numbers, e.g. 1,2")
    if not args.ranks or min(args.ranks) < 1:
        ap.error("--ranks takes positive numbers, e.g. 1,2")
    if not args.size_gb > 0:
        ap.error("--size-gb must be positive")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = sys.stderr if args.json else sys.stdout

    def say(*a):
        print(*a, file=out, flush=True)

    cuda = None
    if args.device == "cuda":
        probe = subprocess.run([sys.executable, str(HERE), "_cuda"], capture_output=True, text=True)
        cuda = json.loads(probe.stdout) if probe.returncode == 0 else {"available": False, "error": probe.stderr[-500:]}
        if not cuda.get("available"):
            say("--device cuda: no CUDA GPU is present (torch.cuda.is_available() is False): nothing to measure, skipping.")
            if args.json:
                print(json.dumps({"device": "cuda", "cuda": cuda, "skipped": True}, indent=1))
            return 0

    work = Path(args.workdir).resolve()
    key = size_key(args.size_gb) + ("" if args.deltas == "noise" else f"-{args.deltas}")
    model_root = work / f"models-{key}"
    shape = choose_shape(args.size_gb * 1e9)
    stamp = {"generator": GENERATOR_VERSION, "shape": shape, "noise": NOISE, "shards": SHARDS_PER_MODEL}
    if args.deltas != "noise":  # (the default set's stamp is unchanged: kept checkpoints stay valid)
        stamp |= {"deltas": args.deltas, "rank": LOWRANK_RANK, "density": SPARSE_DENSITY}
    models = {m: model_root / m for m in MODELS}
    made = False
    stamp_path = model_root / "bench-models.json"
    found = stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp and all(p.is_dir() for p in models.values())
    load_before = loadavg()
    say(
        f"machine: {os.cpu_count()} CPUs, {meminfo('MemTotal') / 2**30:.1f} GiB RAM, "
        f"{meminfo('MemAvailable') / 2**30:.1f} GiB available; load average {load_before}"
    )
    say(
        f"checkpoints: base + 2 fine-tunes ({args.deltas} deltas), bf16, {shape['num_layers']} layers, hidden {shape['hidden']}, "
        f"intermediate {shape['intermediate']}, heads {shape['heads']}/{shape['kv_heads']} KV, vocab {shape['vocab']}: "
        f"{shape['bytes'] / 1e9:.3f} GB each, in {model_root}"
    )
    if found:
        say("  (reusing the checkpoints already there)")
    else:
        t0 = time.perf_counter()
        shutil.rmtree(model_root, ignore_errors=True)
        subprocess.run([sys.executable, str(HERE), "_make", str(model_root), str(args.size_gb * 1e9), args.deltas], check=True, stdout=out)
        stamp_path.write_text(json.dumps(stamp, indent=1))
        made = True
        say(f"  made in {time.perf_counter() - t0:.0f}s")
    inputs = sorted(p for m in models.values() for p in m.glob("*.safetensors"))
    need = 3 * shape["bytes"] + 2 * shape["bytes"]
    if meminfo("MemAvailable") < need:
        say(f"WARNING: {meminfo('MemAvailable') / 1e9:.1f} GB available < {need / 1e9:.1f} GB (inputs + outputs): "
            "the inputs will not stay in the page cache and the figures will measure the disk")  # fmt: skip

    shard = args.out_shard_size or math.ceil(shape["bytes"] / 3)
    recipes_dir, logs, outs = work / f"recipes-{key}", work / f"logs-{key}", work / "out"
    for d in (recipes_dir, logs, outs):
        d.mkdir(parents=True, exist_ok=True)
    distmerge_cmd = tool("distmerge", "distmerge.cli")
    mergekit_cmd = tool("mergekit-yaml", "mergekit.scripts.run_yaml")
    dev = ["--device", args.device]
    runners = ["io-floor"] + ([] if args.skip_mergekit else ["mergekit"]) + [f"distmerge×{n}" for n in args.ranks]
    say(
        f"output shards of at most {shard / 1e9:.3f} GB for both tools; device {args.device}; runners: {', '.join(runners)}\n"
        "threads: mergekit uses torch's default intra-op threads; each distmerge rank merges on one "
        "(steps whose bits cannot depend on it on every thread: distmerge.threads); torchrun gives each "
        "of N>1 workers OMP_NUM_THREADS=1 unless it is set"
    )
    if cuda:
        bw = cuda.get("theoretical_bw")
        say(f"GPU: {cuda['name']}, memory bandwidth {fmt(bw and bw / 1e9, '.0f')} GB/s theoretical, "
            f"{cuda['copy_bw'] / 1e9:.0f} GB/s measured (device-to-device copy)")  # fmt: skip

    results: list[Run] = []
    kernels: dict[str, dict] = {}
    plans: dict[str, dict] = {}
    try:
        for method in args.methods:
            recipe = recipes_dir / f"{method}.yml"
            recipe.write_text(recipe_text(method, models, shape["num_layers"]))
            plan = load_plan(distmerge_cmd, recipe, shard)
            in_bytes, out_bytes = plan_bytes(plan)
            spec_path = recipes_dir / f"{method}.floor.json"
            spec_path.write_text(json.dumps(floor_spec(plan)))
            plans[method] = {"read_bytes": in_bytes, "write_bytes": out_bytes, "files": len(plan["files"]), "tensors": len(plan["tensors"])}
            warm_s = warm(inputs)
            say(f"\n{method}: reads {in_bytes / 1e9:.3f} GB, writes {out_bytes / 1e9:.3f} GB in {len(plan['files'])} files "
                f"(inputs re-read into the page cache in {warm_s:.1f}s)")  # fmt: skip
            if any(r.startswith("distmerge") for r in runners) and not args.no_compile_run:
                dest = outs / f"{method}-compile"
                first = [*distmerge_cmd, *run_args(recipe, dest, shard, dev)]
                say(f"  (one untimed distmerge run first, {compile_loops(first, dest, args.timeout):.1f}s: numba's loops compiled or loaded into its cache)")
            for repeat, runner in itertools.product(range(args.repeat), runners):  # the runners alternate
                dest = outs / f"{method}-{runner}"
                shutil.rmtree(dest, ignore_errors=True)
                os.sync()  # no dirty pages of earlier runs left to write back during this one
                env, per_rank = RUN_ENV, False
                if runner == "io-floor":
                    cmd = [sys.executable, str(HERE), "_floor", str(spec_path), str(dest)]
                elif runner == "mergekit":
                    cmd = [*mergekit_cmd, str(recipe), str(dest), "--out-shard-size", str(shard), "--random-seed", "0"]
                    if args.device == "cuda":
                        cmd.append("--cuda")
                else:
                    n = int(runner.split("×")[1])
                    common = run_args(recipe, dest, shard, dev)
                    if n == 1:
                        cmd = [*distmerge_cmd, *common]
                    else:
                        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                               "-m", "distmerge.cli", *common]  # fmt: skip
                        per_rank = True
                r = Run(method, runner, cmd, repeat=repeat, in_bytes=in_bytes, out_bytes=out_bytes)
                log_name = f"{method}-{runner}" + (f"-{repeat}" if args.repeat > 1 else "")
                measure(r, logs / f"{log_name}.log", args.timeout, env=env, per_rank=per_rank)
                if runner.startswith("distmerge"):
                    r.self_reported = self_reported(Path(r.log).read_text(errors="replace"))
                    if per_rank and len(r.rank_rss) != int(runner.split("×")[1]) and r.ok:
                        r.error = f"saw {len(r.rank_rss)} worker processes, expected {runner.split('×')[1]}"
                r.out_on_disk = dir_bytes(dest)
                results.append(r)
                say(f"  {runner:13s} " + (f"[{repeat + 1}/{args.repeat}] " if args.repeat > 1 else "") + (f"{r.wall:7.1f}s wall, {r.cpu:7.1f}s CPU, peak RSS/rank "
                    + "/".join(gb(b) for b in r.rank_rss) + " GB" if r.ok else f"FAILED: {r.error}"))  # fmt: skip
                shutil.rmtree(dest, ignore_errors=True)
            if cuda:
                k = subprocess.run([sys.executable, str(HERE), "_kernel", str(recipe), "cuda", str(shard)], capture_output=True, text=True)
                kernels[method] = json.loads(k.stdout) if k.returncode == 0 else {"error": k.stderr[-500:]}
    finally:
        os.sync()
        if made and not args.keep:
            shutil.rmtree(model_root, ignore_errors=True)
    load_after = loadavg()

    # ------------------------------------------------------------------ table
    by = representatives(results)
    rows = []
    header = ["method", "runner", "wall s", "(merge s)", "CPU s", "peak RSS/rank GB", "GB/s", "×floor", "×mergekit"]
    if args.repeat > 1:
        header.append("walls, in rounds")
    for r in by.values():
        fl, mk = by.get((r.method, "io-floor")), by.get((r.method, "mergekit"))
        r_floor = r.wall / fl.wall if r.ok and fl and fl.ok else None
        r_mk = r.wall / mk.wall if r.ok and mk and mk.ok else None
        rows.append([
            r.method, r.runner, fmt(r.wall, ".1f"), fmt(r.self_reported.get("seconds"), ".1f"), fmt(r.cpu, ".1f"),
            "/".join(gb(b) for b in r.rank_rss) if r.ok else "FAILED", fmt(r.gbps), fmt(r_floor), fmt(r_mk),
        ] + ([" ".join(fmt(x.wall, ".1f") for x in results if (x.method, x.runner) == (r.method, r.runner))] if args.repeat > 1 else []))  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    say("\n" + "  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    prev = None
    for row in rows:
        if prev is not None and row[0] != prev:
            say("")
        prev = row[0]
        say("  ".join(str(x).ljust(w) if i < 2 else str(x).rjust(w) for i, (x, w) in enumerate(zip(row, widths))))
    say("(merge s: distmerge's own time, without interpreter start-up and imports; GB/s = (input + output bytes "
        "of the plan) / wall;\n ×floor and ×mergekit = wall / their wall: < 1 is faster)")
    if args.repeat > 1:
        say(f"(each row: the median of {args.repeat} rounds by wall time, with the highest peak RSS of its rounds)")
    if cuda and kernels:
        say("\nGPU kernel (largest layer tensor, inputs already on the GPU, no I/O):")
        peak_bw = cuda.get("theoretical_bw") or cuda["copy_bw"]
        for m, k in kernels.items():
            if "error" in k:
                say(f"  {m:16s} failed: {k['error']}")
            else:
                say(f"  {m:16s} {k['tensor']} {k['shape']}: {k['seconds'] * 1e3:.2f} ms, {k['gbps']:.0f} GB/s "
                    f"= {k['gbps'] * 1e9 / peak_bw * 100:.0f}% of the memory bandwidth")  # fmt: skip

    # ------------------------------------------------------------------ targets
    targets = []

    def check(ok: bool | None, what: str, detail: str):
        verdict = "n/a " if ok is None else ("PASS" if ok else "MISS")
        targets.append({"verdict": verdict.strip(), "target": what, "detail": detail})
        say(f"{verdict} {what}: {detail}")

    say("\ntargets:")
    dm_runners = [x for x in runners if x.startswith("distmerge")]
    for method in args.methods:
        fl, mk = by.get((method, "io-floor")), by.get((method, "mergekit"))
        limit = FLOOR_TARGET_IO if method in IO_BOUND else FLOOR_TARGET_OTHER
        for runner in dm_runners:
            r = by.get((method, runner))
            if r is None:
                continue
            if not (r.ok and fl and fl.ok):
                check(False if not r.ok else None, f"{method} {runner} ≤ {limit}× the I/O floor", "run failed" if not r.ok else "no floor")
                continue
            ratio = r.wall / fl.wall
            check(ratio <= limit, f"{method} {runner} ≤ {limit}× the I/O floor", f"{r.wall:.1f}s = {ratio:.2f}× the floor's {fl.wall:.1f}s")
        one = by.get((method, "distmerge×1"))
        if one is not None and mk is not None:
            what = f"{method} distmerge×1 ≥ {MERGEKIT_TARGET}× faster than mergekit"
            if one.ok and mk.ok:
                check(mk.wall / one.wall >= MERGEKIT_TARGET, what, f"{mk.wall:.1f}s / {one.wall:.1f}s = {mk.wall / one.wall:.2f}×")
            else:
                check(None, what, "a run failed")
        for runner in dm_runners:
            r = by.get((method, runner))
            if r is None or mk is None:
                continue
            if not (r.ok and mk.ok):
                check(None, f"{method} {runner} peak RSS/rank ≤ ¼ mergekit's", "a run failed")
                continue
            ratio = r.peak / mk.peak
            check(ratio <= RSS_TARGET, f"{method} {runner} peak RSS/rank ≤ ¼ mergekit's",
                  f"{gb(r.peak)} GB = {ratio:.2f}× mergekit's {gb(mk.peak)} GB")  # fmt: skip
        one, two = by.get((method, "distmerge×1")), by.get((method, "distmerge×2"))
        if method in COMPUTE_BOUND and one and two:
            if one.ok and two.ok:
                speedup = one.wall / two.wall
                check(speedup >= SCALING_TARGET, f"{method} 2 ranks ≥ {SCALING_TARGET}× faster than 1",
                      f"{one.wall:.1f}s / {two.wall:.1f}s = {speedup:.2f}×")  # fmt: skip
            else:
                check(False, f"{method} 2 ranks ≥ {SCALING_TARGET}× faster than 1", "a run failed")
    n_miss = sum(t["verdict"] == "MISS" for t in targets)
    n_pass = sum(t["verdict"] == "PASS" for t in targets)
    say(f"\n{n_pass} PASS, {n_miss} MISS; load average before {load_before}, after {load_after} ({os.cpu_count()} CPUs)")

    if args.json:
        dump = {
            "size_gb": args.size_gb, "deltas": args.deltas, "shape": shape, "device": args.device, "out_shard_bytes": shard,
            "machine": {"cpus": os.cpu_count(), "mem_total": meminfo("MemTotal"), "loadavg_before": load_before, "loadavg_after": load_after},
            "launcher_vmhwm": (_status_kb(os.getpid(), "VmHWM:") or 0) * 1024,
            "cuda": cuda, "plans": plans, "kernels": kernels,
            "repeat": args.repeat,
            "runs": [
                {**asdict(r), "cpu": r.cpu, "gbps": r.gbps, "peak_rss": r.peak, "ok": r.ok,
                 "x_floor": (r.wall / by[(r.method, "io-floor")].wall) if r.ok and by.get((r.method, "io-floor")) and by[(r.method, "io-floor")].ok else None,
                 "x_mergekit": (r.wall / by[(r.method, "mergekit")].wall) if r.ok and by.get((r.method, "mergekit")) and by[(r.method, "mergekit")].ok else None}
                for r in by.values()
            ],
            "rounds": [{**asdict(r), "cpu": r.cpu, "peak_rss": r.peak, "ok": r.ok} for r in results] if args.repeat > 1 else None,
            "targets": targets,
        }  # fmt: skip
        print(json.dumps(dump, indent=1))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sub = {"_make": cmd_make, "_floor": cmd_floor, "_kernel": cmd_kernel, "_cuda": cmd_cuda}
    if len(sys.argv) > 1 and sys.argv[1] in sub:
        sys.exit(sub[sys.argv[1]](sys.argv[2:]))
    sys.exit(main())
