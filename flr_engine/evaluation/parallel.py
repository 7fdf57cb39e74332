"""Data-parallel scoring for ``flr eval --workers N``: N processes, each with its own scorer.

On a CPU a small model does not use many cores well within one process: on this project's
2-core machine, one process with 2 torch threads scored hh-rlhf-helpful-base pairs at about
2.9 s a pair, while two 1-thread processes side by side took about 4.4 s a pair each, i.e.
2.2 s a pair together (bf16, default model). ``ScoringPool`` starts ``workers`` spawned
processes, each building its scorer once (``factory``, a picklable zero-argument callable)
with ``threads`` torch threads, and scores whole batches in them; the caller writes each
batch's rows as it comes back (rows are keyed by line, so the order of the file does not
matter and an interrupted run resumes as usual).
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from types import SimpleNamespace

_scorer = None  # the scorer of this worker process


def _init_worker(factory: Callable[[], object], threads: int, quiet: bool) -> None:
    global _scorer
    import torch

    from flr_engine.logs import setup_logging

    torch.set_num_threads(threads)
    setup_logging(logging.WARNING, quiet)  # bad rows are logged; progress stays the parent's
    _scorer = factory()


def _score(batch: list, path: str, on_error: str) -> tuple[list[dict], float, str | None]:
    from flr_engine.evaluation.scoring import score_batch

    t0 = time.time()
    recs = score_batch(_scorer, batch, SimpleNamespace(path=path), on_error)
    return recs, time.time() - t0, getattr(_scorer, "engine_name", None)


class ScoringPool:
    """``workers`` processes scoring eval batches; started on first use, closed by ``close``."""

    def __init__(self, factory: Callable[[], object], workers: int, threads: int, quiet: bool):
        if workers < 2:
            raise ValueError(f"a scoring pool needs at least 2 workers, got {workers}")
        self.factory, self.workers, self.threads, self.quiet = factory, workers, threads, quiet
        self.engine_name: str | None = None
        self._pool: ProcessPoolExecutor | None = None

    def score(
        self, batches: list[list], path: str, on_error: str
    ) -> Iterator[tuple[list[dict], float]]:
        """Yield ``(records, seconds)`` per batch, in the order the batches finish; at most
        ``2 * workers`` batches are queued at a time. On an error the queued ones are
        cancelled and the error is raised (rows already yielded stay written)."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.factory, self.threads, self.quiet),
            )
        todo = iter(batches)
        running: set[Future] = set()
        try:
            while True:
                for b in todo:
                    running.add(self._pool.submit(_score, b, path, on_error))
                    if len(running) >= 2 * self.workers:
                        break
                if not running:
                    return
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    recs, seconds, self.engine_name = fut.result()
                    yield recs, seconds
        finally:
            for fut in running:
                fut.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
