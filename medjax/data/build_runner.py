"""Long data builds (an index over every manifest row, the slice cache's shards) run in worker processes,
say how far they are, and keep what they finished so an interrupted build resumes where it stopped.

``run_items(work, items, workers=...)`` calls ``work(item)`` for every item, in this process when
``workers`` is 0 or 1 (tests, debugging, a debugger's breakpoints) and otherwise in that many
spawned processes (spawned, not forked: the parent may hold JAX's threads), yielding
``(item, result)`` as each finishes and saying ``done/total, rate, ETA`` every few seconds.
``RowJournal`` is an append-only JSON-lines file of finished rows, named by a fingerprint of the
settings that made them; a row is taken from it again only while its file is unchanged.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence

from medjax import console

PROGRESS_S = 10.0  # seconds between progress lines of a long build

_WORK: Callable | None = None  # the function a worker process runs, set once when the process starts


def _start_worker(work: Callable) -> None:
    global _WORK
    _WORK = work


def _call(item):
    return item, _WORK(item)


def resolve_workers(workers: int) -> int:
    """``workers`` as a process count: -1 = one per CPU core of this machine, 0 and 1 = this process."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < -1:
        raise ValueError(f"workers={workers!r} must be -1 (one per CPU core), 0 (in this process) or a process count.")
    return (os.cpu_count() or 1) if workers == -1 else workers


class Progress:
    """Says ``name: done/total unit (p%), rate unit/s, ETA m:ss`` at most every ``every`` seconds."""

    def __init__(self, name: str, unit: str, total: int, *, done: int = 0, say=console.say, every: float = PROGRESS_S):
        self.name, self.unit, self.total, self.done, self.say, self.every = name, unit, total, done, say, every
        self._first = done  # finished before this run: not part of its rate
        self._start = self._last = time.monotonic()

    def tick(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if now - self._last < self.every or self.done >= self.total:
            return
        self._last = now
        rate = (self.done - self._first) / max(now - self._start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = f"{int(eta // 60)}:{int(eta % 60):02d}" if eta != float("inf") else "unknown"
        self.say(f"{self.name}: {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%), "
                 f"{rate:.1f} {self.unit}/s, ETA {eta_text}")


def run_items(work: Callable, items: Sequence, *, workers: int, progress: Progress | None = None,
              min_per_worker: int = 1) -> Iterator[tuple]:
    """``(item, work(item))`` for every item as it finishes (see module), ticking ``progress`` once per item;
    a worker's exception is raised here.

    A process is started only for every ``min_per_worker`` items: starting one (a fresh interpreter
    importing numpy, pydicom, JAX) costs seconds, more than a few small items take to read."""
    workers = min(resolve_workers(workers), len(items) // max(min_per_worker, 1))
    if workers <= 1 or len(items) <= 1:
        for item in items:
            result = work(item)
            if progress is not None:
                progress.tick()
            yield item, result
        return
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, len(items)),
                                                  mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_start_worker, initargs=(work,))
    try:
        futures = [pool.submit(_call, item) for item in items]
        for future in concurrent.futures.as_completed(futures):
            item, result = future.result()
            if progress is not None:
                progress.tick()
            yield item, result
    finally:  # an error or an interruption: queued items are dropped, running ones finish
        pool.shutdown(wait=True, cancel_futures=True)


def fingerprint(settings: dict) -> str:
    """A short stable hash of JSON-able settings (callables by their qualified name)."""
    text = json.dumps(settings, sort_keys=True, default=lambda v: getattr(v, "__qualname__", repr(v)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_stamp(path: str | None) -> list | None:
    """What says a file (or a series folder's listing) changed: modification time and size; None if absent."""
    if not path:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_mtime_ns, stat.st_size]


class RowJournal:
    """Finished rows of one build, appended one JSON line each as they finish (see module)."""

    def __init__(self, directory: str, name: str, settings: dict, *, write: bool = True):
        self.path = os.path.join(directory, f"{name.lower()}-{fingerprint(settings)}.jsonl")
        self.write = write  # several processes of one run read it, one writes it
        if write:
            os.makedirs(directory, exist_ok=True)
        self._file = None

    def load(self, keys: Sequence) -> dict[int, dict]:
        """Row number -> result of the rows whose key (row and file stamps) is as recorded."""
        where = {json.dumps(key): k for k, key in enumerate(keys)}
        found = {}
        if not os.path.exists(self.path):
            return found
        with open(self.path) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # the last line of an interrupted write
                    continue
                k = where.get(json.dumps(entry["key"]))
                if k is not None:
                    found[k] = entry["result"]
        return found

    def append(self, key, result: dict) -> None:
        if not self.write:
            return
        if self._file is None:
            self._file = open(self.path, "a")
        self._file.write(json.dumps({"key": key, "result": result}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
