"""One merge job, on one rank or many: plan, agree, prepare, write, finish (``run_job``).

Every rank runs this same function. Each phase that can fail for a user-visible reason
ends in an agreement, so that one rank's problem stops every rank with the same message
naming the rank and the cause.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import signal
import threading
import time
from dataclasses import dataclass

import psutil

from distmerge import dist, output, state, threads
from distmerge.errors import MergeError, Stopped
from distmerge.faults import fault_point
from distmerge.graph import FINAL, Graph, build_graph
from distmerge.plan import DEFAULT_SHARD_BYTES, Plan
from distmerge.progress import Progress
from distmerge.recipe import load_recipes
from distmerge.run import RunOptions, run_rank
from distmerge.sources import is_hub_ref, resolve
from distmerge.verify import verify


@dataclass(kw_only=True, slots=True)
class JobOptions:
    out_shard_bytes: int = DEFAULT_SHARD_BYTES
    """Largest output file, in bytes of tensor data."""
    seed: int = 0
    """Recipe seed of the randomized methods."""
    device: str = "auto"
    """"cpu", "cuda" or "auto"."""
    overwrite: bool = False
    hash_inputs: bool = False
    """Also record (and check on resume) a sha256 of every input file's content: reads
    every input at setup and at each resume (1-2 s per GB on one core, measured)."""
    allow_nonfinite: bool = False
    quiet: bool = False
    timeout_s: float = 600.0
    """How long a silent rank is tolerated, and the bound on collectives."""
    allow_pickle: bool = False
    """Read .bin/.pt checkpoints (with torch.load(weights_only=True)); refused otherwise."""
    io: str = "mmap"
    """How inputs are read: "mmap", or "pread" for network file systems where mmap is slow."""
    direct_writes: bool = True
    """Write output tensors around the page cache (``O_DIRECT``) where the file system allows."""
    log_seconds: float = 30.0
    """Interval of the progress lines printed when stderr is not a terminal (Slurm logs)."""
    report_json: str | None = None
    """Write the run report (phases, bytes, GB/s, memory, per rank) to this path (rank 0)."""
    keep_intermediates: str | None = None
    """Also write every named stage of a multi-stage recipe, as a checkpoint in this directory's
    subdirectory of its name (from the same pass: nothing is read twice)."""


@dataclass(slots=True)
class JobResult:
    plan: Plan
    """The final output's plan (a sweep's first variant's)."""
    rank: int
    world_size: int
    written: list[str]
    """Files this rank wrote in this run (resumed runs skip finished ones)."""
    resumed: bool
    kept: int
    """Tensors an earlier run had already merged (0 for a fresh run)."""
    complete: bool
    """An earlier run had already finished the output (this one only checked it)."""
    seconds: float
    peak_rss: int
    """This process's peak resident memory, in bytes."""
    report: dict | None = None
    """The run report (rank 0 only): see ``make_report``."""
    graph: Graph | None = None
    """Every output of the job, with where each was written (``Target.out_dir``)."""


def peak_rss() -> int:
    """Peak resident set size of this process (VmHWM: it starts afresh at exec, unlike
    getrusage's ru_maxrss, which also counts the pages of the process that forked us)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_graph(recipe_path: str, options: JobOptions, local_only: bool = False) -> Graph:
    """Every output of the recipe file, planned (one for a plain recipe)."""
    recipes = load_recipes(recipe_path)
    with open(recipe_path) as f:
        text = f.read()
    return build_graph(
        recipes, text, keep_intermediates=options.keep_intermediates is not None, out_shard_bytes=options.out_shard_bytes,
        seed=options.seed, allow_pickle=options.allow_pickle, local_only=local_only, source=recipe_path,
    )  # fmt: skip


def make_plan(recipe_path: str, options: JobOptions, local_only: bool = False) -> Plan:
    """The plan of a recipe file with one output (the final one of a multi-stage recipe)."""
    graph = make_graph(recipe_path, options, local_only)
    if len(graph.targets) > 1:
        raise MergeError(f"{recipe_path} has {len(graph.targets)} outputs; this takes a recipe with one")
    return graph.targets[0].plan


def fetch_models(recipe_path: str) -> None:
    """Download the recipe's hub models into the local cache (only the files a merge needs)."""
    recipes = load_recipes(recipe_path)
    stages = {r.name for r in recipes if r.name}
    for recipe in recipes:
        for ref in recipe.model_refs():
            if ref not in stages and is_hub_ref(ref, recipe.base_dir):
                resolve(ref, recipe.base_dir)


def check_memory(peak_memory: int, env: dist.Env, device: str) -> str | None:
    """A message when the ranks on this node would need more memory than it has free."""
    need = peak_memory * env.local_world_size
    free = psutil.virtual_memory().available
    if need > free:
        return (
            f"this merge needs about {need / 1e9:.1f} GB of host memory on this node ({peak_memory / 1e9:.1f} GB "
            f"per rank, for its largest tensor, x {env.local_world_size} ranks) but only {free / 1e9:.1f} GB is "
            "available; run fewer ranks per node (torchrun --nproc-per-node, srun --ntasks-per-node) or free memory"
        )
    if device.startswith("cuda"):
        import torch

        free_gpu, _ = torch.cuda.mem_get_info(device)
        if peak_memory > free_gpu:
            return (
                f"this merge needs about {peak_memory / 1e9:.1f} GB of GPU memory per rank (its largest tensor) "
                f"but {device} has {free_gpu / 1e9:.1f} GB free; use --device cpu or GPUs with more memory"
            )
    return None


class Terminated(BaseException):
    """SIGTERM, raised in the main thread as KeyboardInterrupt is for SIGINT (a BaseException,
    so that no ``except Exception`` swallows it)."""


@contextlib.contextmanager
def sigterm_raises():
    """While the job runs, SIGTERM (Slurm's time limit, torchrun stopping the other ranks)
    stops it the way Ctrl-C does: the other ranks are told, what is written is journaled,
    the lock is released. Outside the main thread signals cannot be handled: no change."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""glibc's ``mallopt`` parameters (malloc.h)."""


def keep_freed_memory() -> None:
    """Ask glibc to keep the memory a merge frees for its next allocation: blocks under 32 MiB
    come from the heap, not from a fresh mmap each time, and up to 128 MiB of free heap stays
    mapped. A chunked merge allocates and frees megabyte-sized temporaries thousands of times
    per tensor, and by default each one was a new mapping whose pages were faulted in again
    (dare_ties on the benchmark's second data set, one rank: 74–83 s → 66–74 s in alternating
    runs; peak RSS within 0.05 GB). Elsewhere than glibc, nothing."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 128 << 20)


def run_job(recipe_path: str, out_dir: str, options: JobOptions | None = None) -> JobResult:
    """Run the merge of ``recipe_path`` into ``out_dir`` as this rank of the job. Ctrl-C
    and SIGTERM raise ``Stopped``, saying how many merged tensors are kept for the rerun.

    Every output of the recipe file is written (``distmerge.graph``): the final one into
    ``out_dir``, a sweep's variants into its subdirectories, the named stages of a
    multi-stage recipe into ``options.keep_intermediates`` when it is set."""
    options = options or JobOptions()
    dirs = [out_dir]
    keep_freed_memory()
    with sigterm_raises():
        try:
            return _run_job(recipe_path, out_dir, options, dirs)
        except (KeyboardInterrupt, Terminated) as e:
            raise stopped(e, dirs) from None


def stopped(e: BaseException, out_dirs: list[str]) -> Stopped:
    """The Stopped error for an interrupted run: what stopped it, and what a rerun keeps."""
    if isinstance(e, KeyboardInterrupt):
        what, code = "interrupted (Ctrl-C)", 128 + signal.SIGINT
    else:
        what, code = "stopped by SIGTERM (a Slurm time limit or scancel?)", 128 + signal.SIGTERM
    kept = sum(len(state.read_journal(d)) for d in out_dirs if state.has_state(d))
    where = out_dirs[0] if len(out_dirs) == 1 else f"{len(out_dirs)} output directories"
    if kept:
        return Stopped(f"{what}: {kept} merged tensors are journaled in {where}; rerun the same command to resume from there", code)
    return Stopped(f"{what} before any merged tensor was kept; rerun the same command to start again", code)


def _run_job(recipe_path: str, out_dir: str, options: JobOptions, dirs: list[str]) -> JobResult:
    start = time.time()
    group = dist.init(options.device, options.timeout_s)
    locked: list[str] = []
    try:
        # One rank per node downloads hub models; then every rank reads the node's cache.
        _on_every_rank(group, lambda: fetch_models(recipe_path) if group.env.local_rank == 0 else None)
        graph = _on_every_rank(group, lambda: make_graph(recipe_path, options, local_only=True))
        prints = group.gather(graph.fingerprint)
        if len(set(prints)) > 1:
            odd = next(r for r, p in enumerate(prints) if p != prints[0])
            raise MergeError(
                f"rank {odd} computed a different plan than rank 0 (fingerprint {prints[odd][:12]} vs "
                f"{prints[0][:12]}): the nodes see different model files or distmerge versions"
            )
        group.agree(check_memory(graph.peak_memory, group.env, group.device))
        outputs = [(t.plan, t.out_dir(out_dir, options.keep_intermediates)) for t in graph.targets]
        dirs[:] = [d for _, d in outputs]
        resumed, kept = group.on_rank0("prepare", lambda: _prepare(outputs, options, locked))
        kept = [set(names) for names in kept]
        fault_point(group.rank, "prepared")
        phases = {"plan": time.time() - start}
        run_options = RunOptions(device=group.device, allow_nonfinite=options.allow_nonfinite, io=options.io,
                                 direct_writes=options.direct_writes)
        tensors = [t for plan, _ in outputs for t in plan.tensors]
        done = [t for (plan, _), names in zip(outputs, kept) for t in plan.tensors if t.name in names]
        complete = len(done) == len(tensors) and all(state.read_manifest(d) is not None for _, d in outputs)
        progress = Progress(
            rank=group.rank, world_size=group.world_size, store=group.store, total_tensors=len(tensors),
            total_bytes=sum(t.read_bytes + t.nbytes for t in tensors), enabled=not options.quiet,
            log_seconds=options.log_seconds, kept_tensors=len(done), kept_bytes=sum(t.read_bytes + t.nbytes for t in done),
        )  # fmt: skip
        work_start = time.time()
        try:
            with threads.one():  # the same bytes on any machine and rank count (distmerge.threads)
                ran = run_rank(outputs, group.rank, group.world_size, run_options, group.check_abort, progress, kept)
            written = ran.written
        except BaseException as e:
            group.abort(_describe(e))
            raise
        finally:
            progress.close()
        progress.stats.wall = time.time() - work_start
        progress.stats.peak_rss, progress.stats.peak_gpu = peak_rss(), peak_gpu(group.device)
        group.wait_all("written")
        phases["merge"] = time.time() - work_start
        stats = group.gather(progress.stats.to_dict())
        kernel_paths = group.gather(ran.kernels)
        report = None
        if group.rank == 0:
            finish_start = time.time()
            for plan, d in outputs:
                output.finish(plan, d)
                problems = verify(d)
                if problems:
                    raise MergeError(f"the output in {d} failed verification: " + "; ".join(problems[:5]))
            phases["finish"] = time.time() - finish_start
            report = make_report(len(tensors), stats, phases, time.time() - start, kernel_paths)
            if options.report_json:
                with open(options.report_json, "w") as f:
                    json.dump(report, f, indent=1)
        plan = graph.targets[-1].plan if graph.targets[-1].role == FINAL else graph.targets[0].plan
        return JobResult(
            plan, group.rank, group.world_size, written, resumed, len(done), complete, time.time() - start, peak_rss(), report, graph
        )  # fmt: skip
    finally:
        for d in locked:
            state.release_lock(d)
        group.close()


def _prepare(outputs: list[tuple[Plan, str]], options: JobOptions, locked: list[str]) -> tuple[bool, list[list[str]]]:
    """Prepare (and lock) every output directory. Returns whether this resumes, and the names
    of the tensors an earlier run left finished in each directory. Resuming is all or
    nothing: a job whose outputs are some new and some half-written starts the new ones and
    resumes the others, and reports it as a resume. The finished tensors are read here, once,
    before any rank writes: read by each rank as it starts, a slow rank would count the new
    tensors of a faster one as kept."""
    resumed, kept = False, []
    for plan, d in outputs:
        again = output.prepare(d, plan, options.overwrite, options.hash_inputs)
        locked.append(d)
        kept.append(sorted(state.finished_tensors(plan, d)) if again else [])
        resumed |= again
    return resumed, kept


def make_report(
    tensors: int, stats: list[dict], phases: dict[str, float], wall: float, kernels: list[dict[str, str]] | None = None
) -> dict:
    """The run report: wall time per phase, bytes and GB/s per rank and in total, peak
    memory per rank, the imbalance between ranks (busiest rank's time over the mean), and
    per method the path its fused steps took (``run.check_kernels``; ``kernels``: each
    rank's, in rank order)."""
    moved = [s["read_bytes"] + s["write_bytes"] for s in stats]
    walls = [s["wall"] for s in stats]
    mean_wall = sum(walls) / len(walls)
    return {
        "wall_seconds": wall,
        "phases": phases,
        "tensors": tensors,
        "read_bytes": sum(s["read_bytes"] for s in stats),
        "write_bytes": sum(s["write_bytes"] for s in stats),
        "gb_per_s": sum(moved) / phases["merge"] / 1e9 if phases.get("merge") else None,
        "imbalance": max(walls) / mean_wall - 1 if mean_wall else 0.0,
        "ranks": [
            {**s, "gb_per_s": (m / s["wall"] / 1e9) if s["wall"] else None} for s, m in zip(stats, moved)
        ],
        "kernels": kernel_report(kernels or []),
    }


def kernel_report(per_rank: list[dict[str, str]]) -> dict[str, str]:
    """Per method, the path its fused steps took: one value when every rank that merged took
    the same, else each rank's ("rank 0: triton; rank 1: torch (self-check failed: …)")."""
    methods = list(dict.fromkeys(m for paths in per_rank for m in paths))
    out = {}
    for m in methods:
        seen = [(r, paths[m]) for r, paths in enumerate(per_rank) if m in paths]
        out[m] = seen[0][1] if len({p for _, p in seen}) == 1 else "; ".join(f"rank {r}: {p}" for r, p in seen)
    return out


def peak_gpu(device: str) -> int:
    """Peak GPU memory allocated by this process on ``device`` (0 on CPU)."""
    if not device.startswith("cuda"):
        return 0
    import torch

    return torch.cuda.max_memory_allocated(device)


def _describe(e: BaseException) -> str:
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    if isinstance(e, Terminated):
        return "stopped by SIGTERM"
    return str(e) if isinstance(e, MergeError) else f"{type(e).__name__}: {e}"


def _on_every_rank(group: dist.Group, fn):
    result, error = None, None
    try:
        result = fn()
    except MergeError as e:
        error = str(e)
    group.agree(error)
    return result
