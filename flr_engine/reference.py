"""The reference scorer: one full forward pass per rendered sequence.

Obviously correct on purpose, it is the ground truth every faster path is tested
against::

    logits = model(ids).logits[0]                     # (L, V)
    logp   = log_softmax(logits.float(), -1)          # (L, V)
    lp[n]  = logp[n - 1, ids[n]]   for n in targets   # token n predicted from position n-1

This is also what the paper's released scorer costs: one pass per (reply, follow-up).
"""

from __future__ import annotations

import torch

from flr_engine.chat import ScoredSequence


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
        t = torch.tensor(targets, device=logp.device)
        return logp[t - 1, torch.tensor(ids, device=logp.device)[t]]

    def sequence_scores(
        self, seqs: list[ScoredSequence], mode: str = "likelihood", reduction: str = "mean"
    ) -> list[float]:
        out = []
        for s in seqs:
            if mode == "official":
                logits = self.logits(s.ids)
                out.append(logits[s.logit_pos, s.logit_ids].mean().item())
            else:
                lp = self.token_logprobs(s.ids, s.targets)
                out.append((lp.mean() if reduction == "mean" else lp.sum()).item())
        return out
