"""Data parallelism over the processes a standard launcher starts: ``torchrun
--nproc-per-node N -m flr_engine.cli ...`` or ``accelerate launch -m flr_engine.cli ...``
(multi-node through their own rendezvous). Both set ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` for each process; without them the job is one
process, exactly as before.

A job cuts its rows into fixed chunks by input position (``chunks``: the batches of one
process) and rank ``r`` of ``W`` takes chunks ``r, r + W, r + 2W, ...`` (``Ranks.take``), so
every row is scored in the same batch as in a one-process run and the numbers agree bit for
bit. Each rank writes its own resumable shard, ``OUTPUT.shard-R`` (:class:`ShardedOutput`);
a row done by any shard, or already in ``OUTPUT``, is not redone, so a killed rank (or a
rerun with another ``N``) resumes without losing or duplicating rows. When every rank is
done, rank 0 merges ``OUTPUT`` and the shards into ``OUTPUT`` in input order (temporary
file and rename) and removes the shards. Ranks meet through ``torch.distributed`` (gloo,
which runs on any device) only to agree on the output's check and to wait for each other.
"""

from __future__ import annotations

import datetime
import glob
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from flr_engine.io import OutputWriteError, ResumableWriter, read_output_rows

T = TypeVar("T")

log = logging.getLogger("flr_engine")

WAIT = datetime.timedelta(hours=24)  # ranks wait this long for the slowest one


@dataclass(frozen=True)
class Ranks:
    """This process's place among the launcher's: ``rank`` of ``world``, ``local_rank`` of
    ``local_world`` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_env(cls, env: dict | None = None) -> Ranks:
        env = os.environ if env is None else env
        world = int(env.get("WORLD_SIZE", 1))
        rank = int(env.get("RANK", 0))
        local_rank = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        if not (0 <= rank < world and 0 <= local_rank < local_world):
            raise ValueError(f"inconsistent launcher environment: RANK={rank} WORLD_SIZE={world} "
                             f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_world}")  # fmt: skip
        return cls(rank, world, local_rank, local_world)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tag(self) -> str:
        """``"[rank 1/2] "`` under a launcher, ``""`` alone (for logs and progress bars)."""
        return f"[rank {self.rank}/{self.world}] " if self.world > 1 else ""

    def take(self, chunks: Sequence) -> list:
        """This rank's chunks: every ``world``-th, starting at ``rank``."""
        return list(chunks[self.rank :: self.world])

    def device(self, device: str) -> str:
        """``auto`` under a launcher: this node's GPU number ``local_rank`` when CUDA is
        usable, else cpu; anything else as given."""
        if device != "auto" or self.world == 1:
            return device
        import torch

        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"

    def _group(self):
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=WAIT)
        return dist

    def barrier(self) -> None:
        if self.world > 1:
            self._group().barrier()

    def broadcast(self, obj: object) -> object:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        self._group().broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """``fn()`` on rank 0 only: its result there, None on the other ranks, which wait for
        it. An exception on rank 0 is raised on every rank, so all stop with its message (an
        output check done by every rank at once would race with rank 0's first writes)."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                error = exc
        error = self.broadcast(error)
        if error is not None:
            raise error
        return result


def chunks(items: Sequence, size: int) -> list[list]:
    """``items`` cut into consecutive chunks of ``size`` (the last may be shorter)."""
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def shard_paths(path: str) -> list[str]:
    """The rank shards of ``path`` on disk (any world size)."""
    found = glob.glob(glob.escape(path) + ".shard-*")
    return sorted(p for p in found if p.rpartition(".shard-")[2].isdigit())


class ShardedOutput:
    """A :class:`~flr_engine.io.ResumableWriter` for one process, or one shard per rank.

    ``done`` holds the input lines already written by anyone (``path`` itself and every
    shard); ``write(rows)`` appends this rank's rows durably; ``close()`` waits for all
    ranks and rank 0 merges everything into ``path`` in line order. Rank 0 checks ``path``
    (settings, inputs, lock, foreign files) before any rank starts; an error there stops
    every rank with the same message.
    """

    def __init__(self, path: str, settings: dict, ranks: Ranks, resume: bool = True,
                 out_flag: str = "--output", inputs: Iterable[str] = ()):  # fmt: skip
        self.path, self.ranks = path, ranks
        inputs = list(inputs)
        kw = dict(resume=resume, out_flag=out_flag, inputs=inputs)
        if ranks.world == 1:
            self.main = ResumableWriter(path, settings, **kw)
            self.own, self.done = self.main, self.main.done
            return

        def open_main() -> ResumableWriter:
            try:
                return ResumableWriter(path, settings, **kw)
            finally:
                if not resume:  # --overwrite: earlier shards are stale
                    for old in shard_paths(path):
                        _remove_shard(old)

        self.main = ranks.on_main(open_main)
        self.own = ResumableWriter(f"{path}.shard-{ranks.rank}", settings, **kw)
        ranks.barrier()  # every shard is open (torn tails cut): now read what is done
        self.done = set(read_output_rows(path))
        for shard in shard_paths(path):
            self.done |= set(read_output_rows(shard))

    def write(self, rows: list[dict]) -> None:
        self.own.write(rows)
        self.done.update(int(r["line"]) for r in rows)

    def close(self) -> None:
        if self.ranks.world == 1:
            self.main.close()
            return
        self.own.close()
        self.ranks.barrier()
        if self.ranks.is_main:
            try:
                self._merge()
            finally:
                self.main.close()
        self.ranks.barrier()

    def _merge(self) -> None:
        rows = read_output_rows(self.path)
        shards = shard_paths(self.path)
        for shard in shards:
            rows.update(read_output_rows(shard))
        tmp = self.path + ".merging"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                for line in sorted(rows):
                    fh.write(json.dumps(rows[line], ensure_ascii=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, os.path.realpath(self.path))
        except OSError as exc:
            raise OutputWriteError(
                f"merging the shards of {self.path} failed ({exc.strerror or exc}); the shards "
                "are kept: rerun the same command to merge them"
            ) from exc
        for shard in shards:
            _remove_shard(shard)
        log.info("merged %d shards into %s (%d rows)", len(shards), self.path, len(rows))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:  # keep every shard as it is: the rerun resumes from them
            (self.main if self.ranks.world == 1 else self.own).close()
            if self.main is not None and self.ranks.world > 1:
                self.main.close()


def _remove_shard(path: str) -> None:
    real = os.path.realpath(path)
    for p in (path, real + ".meta.json", real + ".lock"):
        try:
            os.remove(p)
        except FileNotFoundError:
            pass
