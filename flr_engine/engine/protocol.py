"""The scoring-backend protocol: raw per-sequence sums and counts (no reduction, no mode).

For sequences ``s`` with token ids ``ids`` (L,)::

    logprob_sums(seqs):  sums[s] = sum_{n in targets[s]} log p(ids[n] | ids[:n]),
                         counts[s] = len(targets[s])
    logit_sums(seqs):    sums[s] = sum_k z(ids[:logit_pos + 1])[logit_ids[k]]   raw logits,
                         counts[s] = len(logit_ids)       (the released scorer's "official" mode)

Implemented by :class:`~flr_engine.engine.backend.EngineBackend`,
:class:`~flr_engine.reference.ReferenceBackend` and
:class:`~flr_engine.baselines.PrefixCacheBackend`; reductions, modes and the Direct baseline
are :mod:`flr_engine.scorer`'s. Import-light on purpose (no model code).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

__all__ = ["LogitTargets", "ScoringBackend", "SpanSums", "TokenTargets"]


@dataclass(frozen=True)
class TokenTargets:
    """A token sequence and the positions ``n`` whose ``log p(ids[n] | ids[:n])`` to score."""

    ids: Sequence[int]
    targets: Sequence[int]


@dataclass(frozen=True)
class LogitTargets:
    """A token sequence, a position and the token ids whose raw logits there to sum."""

    ids: Sequence[int]
    logit_pos: int
    logit_ids: Sequence[int]


class SpanSums(NamedTuple):
    """Per sequence: ``sums`` (float, summed in fp64) and ``counts`` (int) of scored tokens."""

    sums: list[float]
    counts: list[int]


class ScoringBackend(Protocol):
    """What :class:`~flr_engine.scorer.FLRScorer` needs from a backend (module docstring)."""

    name: str

    def logprob_sums(self, seqs: Sequence[TokenTargets]) -> SpanSums: ...

    def logit_sums(self, seqs: Sequence[LogitTargets]) -> SpanSums: ...
