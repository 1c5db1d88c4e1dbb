"""Where the check and write phases run when not in the calling process: a local process pool
(``workers``) or a Ray cluster (``ray_address``); or in threads of the calling process.

Either way a task receives paths and metadata, reads its own images and returns only image
digests (check phase) or shard digests and sizes (write phase): the driver never holds image
bytes. At most ``window`` tasks are in flight, so the driver's memory does not grow with the
corpus beyond its per-sample metadata. Results come back in submission order; the progress bar
(stderr) advances as tasks complete, in any order.

Ray is imported only when a Ray executor is made. Remote clusters must be able to import this
package (install the project in the cluster image) and read the image paths (a shared file
system); the output may be ``s3://``.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import importlib
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator

__all__ = ["Executor", "process_pool", "thread_pool", "ray_executor", "progress_bar"]


def progress_bar(total: int | None, desc: str, enabled: bool, unit: str = "img"):
    """A tqdm bar on stderr (disabled: a no-op bar)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", disable=not enabled, file=sys.stderr,
                mininterval=0.5, dynamic_ncols=True)


class Executor:
    """Runs ``fn(batch)`` for each batch elsewhere (``submit`` returns a concurrent future)."""

    def __init__(self, submit: Callable[[Callable, object], cf.Future], window: int,
                 close: Callable[[], None], cancel: Callable[[cf.Future], None]):
        self._submit, self.window, self._close, self._cancel = submit, window, close, cancel

    def map(self, fn: Callable, batches: Iterable, weight: Callable[[object], int] | None = None,
            bar=None) -> Iterator:
        """``fn(batch)`` for every batch, in order; ``bar`` (if any) advances by ``weight(batch)`` as each ends."""
        pending: collections.deque[cf.Future] = collections.deque()
        try:
            for batch in batches:
                fut = self._submit(fn, batch)
                if bar is not None:
                    w = weight(batch)
                    fut.add_done_callback(lambda _f, w=w: bar.update(w))
                pending.append(fut)
                if len(pending) >= self.window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:  # after an error (or an abandoned iteration): stop what has not run
                self._cancel(fut)

    def close(self) -> None:
        self._close()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def process_pool(workers: int, preload: str) -> Executor:
    """``workers`` local processes (spawned: safe with threads, same result on every platform). They
    start at once, each importing module ``preload`` (what its tasks need, about 0.3 CPU-seconds),
    while the caller goes on: the writer reads the annotations meanwhile."""
    pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    for _ in range(workers):  # a spawned pool starts a process a submission
        pool.submit(_import, preload)
    return Executor(pool.submit, 2 * workers, lambda: pool.shutdown(cancel_futures=True),
                    lambda fut: fut.cancel())


def thread_pool(workers: int) -> Executor:
    """``workers`` threads of this process, for tasks whose time goes to work that releases the GIL
    (reading, hashing and writing large files)."""
    pool = cf.ThreadPoolExecutor(workers, thread_name_prefix="shard-task")
    return Executor(pool.submit, 2 * workers, lambda: pool.shutdown(cancel_futures=True), lambda fut: fut.cancel())


def ray_executor(address: str) -> Executor:
    """Tasks on the Ray cluster at ``address`` ("local": start one here; "auto": the running one; or
    host:port, ray://host:port). An already initialised Ray is used as it is; a cluster started
    here is shut down on close."""
    import ray

    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address=address, log_to_driver=False)  # tasks print nothing; keep the driver's stdout clean
    remote = ray.remote(_call)
    refs: dict[int, object] = {}

    def submit(fn: Callable, batch: object) -> cf.Future:
        ref = remote.remote(fn, batch)
        fut = ref.future()
        refs[id(fut)] = ref
        fut.add_done_callback(lambda f: refs.pop(id(f), None))
        return fut

    def cancel(fut: cf.Future) -> None:
        ref = refs.pop(id(fut), None)
        if ref is not None:
            ray.cancel(ref)

    def close() -> None:
        if started:
            ray.shutdown()

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return Executor(submit, 2 * max(1, cpus), close, cancel)


def _call(fn: Callable, batch: object) -> object:
    return fn(batch)


def _import(module: str) -> None:
    importlib.import_module(module)
