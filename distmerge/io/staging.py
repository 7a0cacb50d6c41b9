"""Host↔GPU transfers off the merge's critical path: a CUDA stream per stage.

On CUDA a tensor's merge has three stages, each on a stream of its own so that they overlap:

- upload (``Uploader``): on a background thread, the next tensor's inputs are read (mmap
  page faults or pread) into pinned host memory and copied to the GPU with non-blocking
  copies on the upload stream, while the current tensor is merged;
- merge: the default stream, which waits for the upload's event before it touches an input;
- download (``Downloader``): the merged tensor is copied into pinned host memory on the
  download stream; the writer thread waits for that copy's event, then writes the bytes,
  while the next tensor is merged.

Memory stays bounded: one tensor's inputs are staged ahead, one result is in flight.
Nothing here is used on CPU, where inputs are memory-mapped views and results are written
from where they are.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Hashable

import torch


class Uploader:
    """Inputs of the next tensor, read and copied to ``device`` on a thread and a stream of
    their own. ``prefetch(key, read)`` starts one input; ``take(key)`` returns it on the GPU,
    ordered before any work the merge stream queues afterwards, or None if it was never
    prefetched (the caller then reads it itself)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distmerge-upload")
        self._pending: dict[Hashable, Future] = {}

    def prefetch(self, key: Hashable, read: Callable[[], torch.Tensor]) -> None:
        if key not in self._pending:
            self._pending[key] = self._pool.submit(self._upload, read)

    def _upload(self, read: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.cuda.Event]:
        host = read()
        if not host.is_pinned():
            host = host.pin_memory()  # one memcpy on this thread; an async copy needs pinned memory
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            x = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        # The caching host allocator keeps ``host`` alive until the copy has run.
        return x, done

    def take(self, key: Hashable) -> torch.Tensor | None:
        future = self._pending.pop(key, None)
        if future is None:
            return None
        x, done = future.result()
        merge_stream = torch.cuda.current_stream(self.device)
        merge_stream.wait_event(done)
        x.record_stream(merge_stream)  # allocated on the upload stream, used on the merge stream
        return x

    def close(self) -> None:
        """Drop what was staged and not taken (after an error), and stop the thread."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()


class Downloader:
    """Results copied to pinned host memory on a stream of their own."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)

    def start(self, value: torch.Tensor) -> tuple[torch.Tensor, Callable[[], None]]:
        """(host tensor, wait): the copy is queued after the merge's work; ``wait()`` blocks
        until the host tensor holds the result (the writer thread calls it)."""
        if not value.is_cuda:
            return value, lambda: None
        merge_stream = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(merge_stream)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            host.copy_(value, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        value.record_stream(self.stream)
        return host, done.synchronize
