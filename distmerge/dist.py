"""Ranks and the process group: torchrun, deepspeed, srun, or a single process.

Collectives carry only small things (plan fingerprints, errors, file manifests); tensor
data never leaves its rank. Failures are shared through the rendezvous store so that
every rank stops within one tensor's work of the first failure, and a rank that dies
without a word is noticed by its stale heartbeat.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from distmerge.errors import MergeError

_JOBS = itertools.count()
"""Numbers the groups this process opens: each job's barrier keys are its own (see ``init``)."""
HEARTBEAT_SECONDS = 5.0
WATCH_SECONDS = 30.0
"""How often a working rank looks at the others' heartbeats (between tensors)."""


@dataclass(frozen=True, slots=True)
class Env:
    """Where this process sits in the job, as the launcher told it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    """Ranks on this node (they share its memory and its downloads)."""
    launcher: str = "none"
    """"torchrun" (also deepspeed and anything else setting RANK/WORLD_SIZE), "slurm", or "none"."""
    master_addr: str | None = None
    master_port: int | None = None


def detect(environ=os.environ) -> Env:
    """Read rank, world size and rendezvous address from the launcher's variables."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return Env(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            local_world_size=int(environ.get("LOCAL_WORLD_SIZE", environ.get("WORLD_SIZE", 1))),
            launcher="torchrun",
            master_addr=environ.get("MASTER_ADDR"),
            master_port=int(environ["MASTER_PORT"]) if "MASTER_PORT" in environ else None,
        )
    ntasks = environ.get("SLURM_STEP_NUM_TASKS") or (environ.get("SLURM_NTASKS") if "SLURM_STEP_ID" in environ else None)
    # Only inside an srun step: the batch script's own shell also has SLURM_PROCID and
    # SLURM_NTASKS, and taking it for rank 0 of N would wait for N-1 ranks that never come.
    if "SLURM_PROCID" in environ and ntasks and int(ntasks) > 1:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "")
        job = int(environ.get("SLURM_JOB_ID", "0") or 0)
        per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE") or "1"
        return Env(
            rank=int(environ["SLURM_PROCID"]),
            world_size=int(ntasks),
            local_rank=int(environ.get("SLURM_LOCALID", 0)),
            local_world_size=tasks_on_node(per_node, int(environ.get("SLURM_NODEID", 0))),
            launcher="slurm",
            master_addr=environ.get("MASTER_ADDR") or first_host(nodelist),
            # A port per job, so two jobs sharing a first node don't collide.
            master_port=int(environ.get("MASTER_PORT") or 20000 + job % 20000),
        )
    return Env()


def tasks_on_node(spec: str, node: int) -> int:
    """Tasks on node ``node`` from Slurm's compressed list: "2(x3),1" -> 2, 2, 2, 1."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            return 1
        counts += [int(m[1])] * int(m[2] or 1)
    return counts[node] if 0 <= node < len(counts) else counts[-1]


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: "gpu[07-09,12],cpu1" -> "gpu07"."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", first)
    if not m:
        if not first:
            raise MergeError("Slurm launch: SLURM_JOB_NODELIST is empty; set MASTER_ADDR to the first node's address")
        return first
    start = re.split(r"[-,]", m[2])[0]
    return m[1] + start + m[3]


@dataclass
class Group:
    """This process's view of the job: rank, device, and the few collectives distmerge needs."""

    env: Env
    device: str
    timeout: timedelta
    _store: object = None
    _beat: threading.Thread | None = field(default=None, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _beats: dict = field(default_factory=dict, repr=False)
    """rank -> (last heartbeat value seen, monotonic time it was first seen)."""
    _last_watch: float = field(default_factory=time.monotonic, repr=False)
    _owner: bool = field(default=False, repr=False)
    """This group started the process group (and ``close`` ends it)."""
    _scope: str = field(default="distmerge", repr=False)
    """Prefix of this job's barrier and abort keys in the store."""

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def store(self):
        """The rendezvous key-value store (None for a single process)."""
        return self._store

    @property
    def distributed(self) -> bool:
        return self.env.world_size > 1

    def agree(self, error: str | None) -> None:
        """Collective: raise MergeError on every rank if any rank reports an error."""
        if not self.distributed:
            if error:
                raise MergeError(error)
            return
        errors = self.gather(error)
        failed = [(r, e) for r, e in enumerate(errors) if e]
        if failed:
            rank, message = failed[0]
            others = f" (and {len(failed) - 1} other ranks)" if len(failed) > 1 else ""
            raise MergeError(f"rank {rank}{others}: {message}")

    def gather(self, obj) -> list:
        """Collective: every rank's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Collective: rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_rank0(self, step: str, fn):
        """``fn()`` on rank 0; every rank gets its result, or its MergeError. The other ranks
        wait on the store watching rank 0's heartbeat (:meth:`wait_all`), not in a collective,
        so ``fn`` may take hours (preparing with --hash-inputs, evaluating a soup's candidate)
        without reaching the process group's timeout. Anything else ``fn`` raises stops the
        other ranks at once (:meth:`abort`) and is raised on rank 0."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except MergeError as e:
                error = str(e)
            except BaseException as e:
                self.abort(f"{type(e).__name__}: {e}")
                raise
        self.wait_all(step)
        self.agree(error)
        return self.broadcast(result)

    def abort(self, message: str) -> None:
        """Tell every rank to stop (not collective: any rank may call it at any time)."""
        if self._store is not None:
            try:
                self._store.set(f"{self._scope}/abort", f"rank {self.rank}: {message}")
            except Exception:  # the store is gone with rank 0: the others find out by themselves
                pass

    def check_abort(self) -> None:
        """Raise if another rank has failed or gone silent. Cheap: one store lookup per call,
        and a look at every rank's heartbeat every ``WATCH_SECONDS``."""
        if self._store is None:
            return
        with self._store_errors():
            if self._store.check([f"{self._scope}/abort"]):
                raise MergeError(f"stopping: {self._store.get(f'{self._scope}/abort').decode()}")
            if time.monotonic() - self._last_watch >= WATCH_SECONDS:
                self._watch(range(self.world_size))

    def wait_all(self, what: str) -> None:
        """Wait until every rank has reached this point, however long their work takes,
        while watching for aborts and for ranks whose heartbeat has stopped."""
        if not self.distributed:
            return
        store = self._store
        with self._store_errors():
            store.set(f"{self._scope}/{what}/{self.rank}", "1")
            keys = [f"{self._scope}/{what}/{r}" for r in range(self.world_size)]
            while not store.check(keys):
                self.check_abort()
                self._watch(r for r in range(self.world_size) if not store.check([f"{self._scope}/{what}/{r}"]))
                time.sleep(0.2)

    def _watch(self, ranks) -> None:
        """Raise if one of ``ranks`` has not beaten its heartbeat for longer than the timeout.
        Heartbeats are counters, timed here on this rank's monotonic clock: clock skew
        between nodes does not matter."""
        now = self._last_watch = time.monotonic()
        for r in ranks:
            beat = self._store.get(f"distmerge/alive/{r}")
            seen, since = self._beats.get(r, (None, now))
            if beat != seen:
                self._beats[r] = (beat, now)
            elif now - since > self.timeout.total_seconds():
                raise MergeError(f"rank {r} stopped responding {now - since:.0f}s ago (killed or hung); stopping")

    @contextlib.contextmanager
    def _store_errors(self):
        try:
            yield
        except MergeError:
            raise
        except Exception as e:  # torch.distributed's network errors: the store's host is gone
            raise MergeError(f"lost contact with the job's rendezvous store (did rank 0 die?): {e}") from None

    def close(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=2 * HEARTBEAT_SECONDS)
        if self._owner and dist.is_initialized():
            dist.destroy_process_group()


def init(device: str = "auto", timeout_s: float = 600.0, environ=os.environ) -> Group:
    """Join the job's process group (gloo on CPU, nccl with one GPU per rank on CUDA).

    Returns immediately for a single process, and reuses a process group that exists.
    ``timeout_s`` bounds collectives and how long a silent rank is tolerated.
    """
    env = detect(environ)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise MergeError("--device cuda: no CUDA device is available; use --device cpu")
        device = f"cuda:{env.local_rank % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s)
    group = Group(env=env, device=device, timeout=timeout)
    if env.world_size == 1:
        return group
    # A process may run several jobs in one process group (distmerge soup holds one across
    # its merges): only the group that started it ends it. Each job gets its own store keys:
    # torchrun's store outlives the process group, and a barrier key left by an earlier job
    # let the next job's barrier pass early (rank 0 finished a merge rank 1 had not written).
    group._owner = not dist.is_initialized()
    group._scope = f"distmerge/{next(_JOBS)}"
    if group._owner:
        if env.master_addr is None or env.master_port is None:
            raise MergeError("distributed launch without MASTER_ADDR/MASTER_PORT; use torchrun or srun")
        # env:// so that under torchrun the workers join the agent's store rather than
        # starting a second one on the same port; srun's values are handed over the same way.
        os.environ.update(MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(
            backend=backend, init_method="env://", rank=env.rank, world_size=env.world_size, timeout=timeout
        )
    group._store = dist.distributed_c10d._get_default_store()
    _heartbeat(group)
    group._beat = threading.Thread(target=_beat_loop, args=(group,), daemon=True)
    group._beat.start()
    return group


def _heartbeat(group: Group, count: int = 0) -> None:
    group._store.set(f"distmerge/alive/{group.rank}", str(count))


def _beat_loop(group: Group) -> None:
    count = 0
    while not group._stop.wait(HEARTBEAT_SECONDS):
        count += 1
        try:
            _heartbeat(group, count)
        except Exception:  # the store is gone: the job is ending
            return
