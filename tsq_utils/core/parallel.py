"""Every core, deterministically: a stage's work in fixed shards, run by as many one-thread processes as cores.

The profile fixes the shards (`shards`): each is computed the same way, with one torch thread, whichever process
runs it. The machine only decides how many run at once (`workers`, 0 = every core this process may use). So a
2-core box and a 16-core laptop write the same bytes, and `workers` is no resume key.

Processes are forked: a child starts with the parent's memory (the model, the tokenizer, the tables) without
pickling it, so `shared` reaches it for free, and only each shard's task and result cross a pipe. Forking is safe
here because the parent runs torch with one thread (no OpenMP pool to inherit half-alive); a parent with more
threads gets its shards run in-process instead, where they are just as deterministic but not parallel.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

# what the forked children read: set just before the pool forks, cleared after (one pool at a time per process)
_SHARED: Any = None


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, else os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def n_workers(requested: int) -> int:
    """The number of worker processes for a `workers` setting: 0 means every available core."""
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise ValueError(f"workers must be an integer >= 0 (0: every core), got {requested!r}")
    return requested or available_cores()


def shard_bounds(n_items: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) ranges splitting n_items into n_shards parts whose sizes differ by at most one."""
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    base, extra = divmod(n_items, n_shards)
    bounds, lo = [], 0
    for i in range(n_shards):
        hi = lo + base + (i < extra)
        bounds.append((lo, hi))
        lo = hi
    return bounds


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with one torch thread (as every worker process does), restoring the count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _child_init() -> None:
    torch.set_num_threads(1)


def _call(job: tuple[Callable[[Any, Any], Any], Any]) -> Any:
    fn, task = job
    return fn(_SHARED, task)


def map_shards(fn: Callable[[Any, Any], Any], tasks: Sequence[Any], workers: int = 0, shared: Any = None,
               progress: bool = False, desc: str = "shards") -> list[Any]:
    """fn(shared, task) for every task, in task order, on up to `workers` one-thread processes (0: every core).

    fn must be a module-level function (it is sent to the workers by name); `shared` is inherited, not sent.
    The results are the same whatever `workers` is: each task runs with one torch thread wherever it runs.
    """
    global _SHARED
    tasks = list(tasks)
    w = min(n_workers(workers), len(tasks))
    forkable = "fork" in mp.get_all_start_methods() and torch.get_num_threads() == 1
    bar = tqdm(total=len(tasks), desc=desc, disable=not progress)
    try:
        if w <= 1 or not forkable:
            out = []
            with one_thread():
                for t in tasks:
                    out.append(fn(shared, t))
                    bar.update(1)
            return out
        _SHARED = shared
        try:
            # ProcessPoolExecutor's workers are not daemonic (Python >= 3.9), so a shard may start processes of
            # its own (a grading worker, a data-parallel training)
            with ProcessPoolExecutor(w, mp_context=mp.get_context("fork"), initializer=_child_init) as pool:
                out = []
                for r in pool.map(_call, [(fn, t) for t in tasks]):
                    out.append(r)
                    bar.update(1)
            return out
        finally:
            _SHARED = None
    finally:
        bar.close()
