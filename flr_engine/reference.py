"""The reference scorer: one full forward pass per rendered sequence.

Obviously correct on purpose, it is the ground truth every faster path is tested
against::

    logits = model(ids).logits[0]                     # (L, V)
    logp   = log_softmax(logits.float(), -1)          # (L, V)
    lp[n]  = logp[n - 1, ids[n]]   for n in targets   # token n predicted from position n-1

    logprob_sums: sum_{n in targets} lp[n], len(targets)
    logit_sums:   sum_k logits[logit_pos, logit_ids[k]], len(logit_ids)     ("official")

(the :class:`~flr_engine.engine.backend.ScoringBackend` protocol: raw sums and counts; the
reduction is the scorer's). This is also what the paper's released scorer costs: one pass
per (reply, follow-up).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flr_engine.engine.protocol import LogitTargets, SpanSums, TokenTargets


class ReferenceBackend:
    name = "reference"

    def __init__(self, model):
        self.model = model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids], device=self.device)
        return self.model(input_ids=x).logits[0].float()  # (L, V)

    def token_logprobs(self, ids: list[int], targets: list[int]) -> torch.Tensor:
        """log p(ids[n] | ids[:n]) for n in targets, fp32, shape (len(targets),)."""
        logp = torch.log_softmax(self.logits(ids), dim=-1)  # (L, V)
        t = torch.tensor(targets, dtype=torch.long, device=logp.device)
        return logp[t - 1, torch.tensor(ids, device=logp.device)[t]]

    def logprob_sums(self, seqs: Sequence[TokenTargets]) -> SpanSums:
        sums = [self.token_logprobs(s.ids, s.targets).double().sum().item() for s in seqs]
        return SpanSums(sums, [len(s.targets) for s in seqs])

    def logit_sums(self, seqs: Sequence[LogitTargets]) -> SpanSums:
        sums = []
        for s in seqs:
            ids = torch.tensor(s.logit_ids, dtype=torch.long)
            sums.append(self.logits(s.ids)[s.logit_pos, ids].double().sum().item())
        return SpanSums(sums, [len(s.logit_ids) for s in seqs])
