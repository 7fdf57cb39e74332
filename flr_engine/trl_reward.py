"""A reward callable for training code, shaped like TRL's ``reward_funcs`` entries.

    >>> reward = FLRReward("default")              # or FLRReward(scorer=my_scorer)
    >>> reward(prompts=["Hi!"], completions=["Hello, how can I help?"])
    [-0.52]

Conversational data works too: ``prompts`` as message lists, ``completions`` as
``[{"role": "assistant", "content": ...}]``. No TRL import is needed. The object pickles
(for multi-process trainers): a scorer built from a model name is dropped on pickling and
loaded again on first use in the new process.
"""

from __future__ import annotations

from collections.abc import Sequence


class FLRReward:
    """``(prompts, completions, **kwargs) -> list[float]``: the FLR reward of each completion."""

    def __init__(
        self,
        model: str = "default",
        *,
        scorer=None,
        templates: str = "flr-helpfulness",
        batch_size: int = 16,
        **scorer_kwargs,
    ):
        self.model = model
        self.templates = templates
        self.batch_size = batch_size
        self.scorer_kwargs = scorer_kwargs
        self._scorer = scorer
        self._owns_scorer = scorer is None
        self.__name__ = "flr_reward"  # TRL logs reward functions by __name__

    @property
    def scorer(self):
        if self._scorer is None:
            from flr_engine.scorer import FLRScorer

            self._scorer = FLRScorer.from_pretrained(
                self.model, templates=self.templates, **self.scorer_kwargs
            )
        return self._scorer

    def __getstate__(self):
        state = dict(self.__dict__)
        if self._owns_scorer:
            state["_scorer"] = None
        return state

    def __call__(
        self, prompts: Sequence[object], completions: Sequence[object], **kwargs
    ) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(
                f"prompts and completions must have the same length, got {len(prompts)} and "
                f"{len(completions)}"
            )
        out: list[float] = []
        for i in range(0, len(prompts), self.batch_size):
            res = self.scorer.score(
                list(prompts[i : i + self.batch_size]), list(completions[i : i + self.batch_size])
            )
            out += [r.reward for r in res]
        return out
