"""A reward callable for training code, shaped like TRL's ``reward_funcs`` entries.

    >>> reward = FLRReward("default")              # or FLRReward(scorer=my_scorer)
    >>> reward(prompts=["Hi!"], completions=["Hello, how can I help?"])
    [-0.52]

It follows TRL 1.x's calling convention (GRPOTrainer, RLOOTrainer, OnlineDPOTrainer)::

    f(prompts=, completions=, completion_ids=, trainer_state=, log_extra=, log_metric=,
      **dataset_columns) -> list[float | None]

in the standard format (strings) or the conversational one (``prompts`` as message lists,
``completions`` as ``[{"role": "assistant", "content": ...}]``). No TRL import is needed.

The contract, per item (the rest of the batch is always scored):

* ``None`` with a warning that says why for an item the judge cannot score: an empty
  completion, a completion message whose content is ``None`` or not text, a completion of
  several messages (FLR scores one assistant reply), a prompt with a ``tool`` message or a
  message without text content, a reply + follow-up longer than the judge's context, or
  any other bad input (a prompt that does not end with a user turn, ...).
* A ``developer`` message (OpenAI's name for the system prompt) is scored as ``system``.
* A context longer than the judge's context is cut by the truncation policy of
  :mod:`flr_engine.chat` (oldest turns first), not refused.
* With ``log_metric``, the batch means of each dimension's reward are logged as
  ``flr/<dimension>``, plus ``flr/unscored`` (the fraction of ``None`` items).

The object pickles (for multi-process trainers): a scorer built from a model name is dropped
on pickling and loaded again on first use in the new process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from flr_engine.errors import InputError

log = logging.getLogger(__name__)


def _conversation(prompt: object) -> object:
    """A TRL prompt as the scorer's conversation: ``developer`` becomes ``system``; tool
    messages and messages without text are refused (InputError)."""
    if not isinstance(prompt, list):
        return prompt  # a string, or anything the scorer then refuses with a reason
    out = []
    for i, m in enumerate(prompt):
        role = m.get("role") if isinstance(m, dict) else None
        if role == "tool":
            raise InputError(f"message {i} has role 'tool': the judge scores chats without tools", "prompt")
        if isinstance(m, dict) and not isinstance(m.get("content"), str):
            raise InputError(f"message {i} ({role}) has no text content", "prompt")
        out.append({"role": "system", "content": m["content"]} if role == "developer" else m)
    return out


def _reply(completion: object) -> str:
    """A TRL completion as one reply text (InputError when there is none)."""
    if isinstance(completion, list):
        if len(completion) != 1:
            raise InputError(
                f"has {len(completion)} messages: FLR scores a single assistant reply", "completion"
            )
        m = completion[0]
        content = m.get("content") if isinstance(m, dict) else None
        if content is None:
            raise InputError("its message has no content (content is None)", "completion")
        completion = content
    if not isinstance(completion, str):
        raise InputError(f"must be text, got {type(completion).__name__}", "completion")
    if not completion.strip():
        raise InputError("is empty (the policy ended its turn at once)", "completion")
    return completion


class FLRReward:
    """``(prompts, completions, **kwargs) -> list[float | None]``: the FLR reward of each
    completion (see the module docstring for the contract)."""

    def __init__(
        self,
        model: str = "default",
        *,
        scorer=None,
        templates: str = "flr-helpfulness",
        batch_size: int = 16,
        device: str = "auto",
        **scorer_kwargs,
    ):
        self.model = model
        self.templates = templates
        self.batch_size = batch_size
        self.device = device
        self.scorer_kwargs = scorer_kwargs
        self._scorer = scorer
        self._owns_scorer = scorer is None
        self.__name__ = "flr_reward"  # TRL logs reward functions by __name__

    @property
    def scorer(self):
        if self._scorer is None:
            from flr_engine.scorer import FLRScorer

            self._scorer = FLRScorer.from_pretrained(
                self.model, templates=self.templates, device=self.device, **self.scorer_kwargs
            )
        return self._scorer

    def __getstate__(self):
        state = dict(self.__dict__)
        if self._owns_scorer:
            state["_scorer"] = None
        return state

    def __call__(
        self,
        prompts: Sequence[object],
        completions: Sequence[object],
        completion_ids: Sequence[object] | None = None,
        log_metric: Callable[[str, float], None] | None = None,
        **kwargs,
    ) -> list[float | None]:
        if len(prompts) != len(completions):
            raise InputError(
                f"prompts and completions must have the same length, got {len(prompts)} and "
                f"{len(completions)}"
            )
        prepared, where = [], []
        for i, (p, c) in enumerate(zip(prompts, completions)):
            try:
                prepared.append(self.scorer.prepare(_conversation(p), _reply(c)))
                where.append(i)
            except InputError as exc:
                log.warning("FLRReward: item %d not scored (reward None): %s", i, exc)
        out: list[float | None] = [None] * len(prompts)
        results = []
        for k in range(0, len(prepared), self.batch_size):
            results += self.scorer.score_prepared(prepared[k : k + self.batch_size])
        for i, r in zip(where, results):
            out[i] = r.reward
        if log_metric is not None and prompts:
            for d in self.scorer.templates.dimension_names:
                if results:
                    log_metric(f"flr/{d}", sum(r.per_dimension[d]["reward"] for r in results) / len(results))
            log_metric("flr/unscored", 1 - len(results) / len(prompts))
        return out
