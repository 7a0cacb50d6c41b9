"""Progress of the whole job and the figures of the run report.

Every rank counts what it has done (tensors, bytes, seconds per phase). Ranks publish
their counts in the rendezvous store at most once a second; rank 0 shows one bar for the
whole job (or, when stderr is not a terminal, e.g. a Slurm log, a line when the merge
starts and a plain line every ``log_seconds``, 30 s by default).
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import asdict, dataclass, field


@dataclass(slots=True)
class RankStats:
    """What one rank did; gathered to rank 0 for the report."""

    rank: int = 0
    tensors: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "merge": 0.0, "write": 0.0, "sync": 0.0})
    """Wall time per phase: read (inputs to float32), merge (the method), write (cast,
    hash and write), sync (fsync and journal)."""
    wall: float = 0.0
    peak_rss: int = 0
    peak_gpu: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class Progress:
    """Counts this rank's work; on rank 0 also renders the job's progress."""

    PUSH_SECONDS = 1.0

    def __init__(
        self, *, rank: int, world_size: int, store, total_tensors: int, total_bytes: int, enabled: bool,
        log_seconds: float = 30.0, kept_tensors: int = 0, kept_bytes: int = 0,
    ):  # fmt: skip
        self.stats = RankStats(rank=rank)
        self.kept_tensors, self.kept_bytes = kept_tensors, kept_bytes
        """What an earlier run already merged: counted as done from the start (not in the rate)."""
        self.log_seconds = log_seconds
        self.rank, self.world_size, self.store = rank, world_size, store
        self.total_tensors, self.total_bytes = total_tensors, total_bytes
        self._pushed = 0.0
        self._stop = threading.Event()
        self._thread = None
        if enabled and rank == 0 and total_tensors > kept_tensors:
            self._thread = threading.Thread(target=self._render, daemon=True)
            self._thread.start()

    def timed(self, phase: str):
        """Context manager adding the time spent inside it to ``phase``."""
        return _Timer(self.stats.seconds, phase)

    def done(self, read_bytes: int, write_bytes: int) -> None:
        s = self.stats
        s.tensors, s.read_bytes, s.write_bytes = s.tensors + 1, s.read_bytes + read_bytes, s.write_bytes + write_bytes
        if self.store is not None and time.monotonic() - self._pushed >= self.PUSH_SECONDS:
            self._push()

    def _push(self) -> None:
        self.store.set(f"distmerge/progress/{self.rank}", f"{self.stats.tensors},{self.stats.read_bytes + self.stats.write_bytes}")
        self._pushed = time.monotonic()

    def _job_totals(self) -> tuple[int, int]:
        """Tensors done and bytes moved by the whole job, what earlier runs kept included."""
        if self.store is None:
            return self.kept_tensors + self.stats.tensors, self.kept_bytes + self.stats.read_bytes + self.stats.write_bytes
        tensors, moved = self.kept_tensors, self.kept_bytes
        for r in range(self.world_size):
            key = f"distmerge/progress/{r}"
            if r == self.rank:
                tensors, moved = tensors + self.stats.tensors, moved + self.stats.read_bytes + self.stats.write_bytes
            elif self.store.check([key]):
                t, b = map(int, self.store.get(key).decode().split(","))
                tensors, moved = tensors + t, moved + b
        return tensors, moved

    def _render(self) -> None:
        start = time.monotonic()
        if sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=self.total_bytes, initial=self.kept_bytes, unit="B", unit_scale=True, desc="merging", mininterval=1.0)
            while not self._stop.wait(1.0):
                tensors, moved = self._job_totals()
                bar.n = moved
                bar.set_postfix_str(f"{tensors}/{self.total_tensors} tensors", refresh=True)
            tensors, moved = self._job_totals()
            bar.n = moved
            bar.set_postfix_str(f"{tensors}/{self.total_tensors} tensors")
            bar.close()
            return
        # A log (Slurm's %x-%j.out) shows at once that the merge began, and how often to expect news.
        kept = f" ({self.kept_tensors} kept from the earlier run: resuming)" if self.kept_tensors else ""
        print(
            f"distmerge: merging {self.total_tensors} tensors{kept}, {self.total_bytes / 1e9:.2f} GB to read and write, "
            f"on {self.world_size} rank(s); progress every {self.log_seconds:g}s",
            file=sys.stderr,
            flush=True,
        )
        while not self._stop.wait(self.log_seconds):
            tensors, moved = self._job_totals()
            elapsed = time.monotonic() - start
            rate = (moved - self.kept_bytes) / elapsed if elapsed else 0.0
            eta = (self.total_bytes - moved) / rate if rate else float("inf")
            print(
                f"distmerge: {tensors}/{self.total_tensors} tensors, {moved / 1e9:.2f}/{self.total_bytes / 1e9:.2f} GB, "
                f"{rate / 1e9:.2f} GB/s, ETA {eta:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.store is not None:
            self._push()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class _Timer:
    def __init__(self, seconds: dict[str, float], phase: str):
        self.seconds, self.phase = seconds, phase

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.seconds[self.phase] += time.perf_counter() - self.start
