"""The FLR reward: configuration, per-sequence quantity and aggregation.

For a conversation ``C``, reply ``R`` and follow-up ``f`` rendered as
``C + [assistant: R] + [user: f]``::

    lp(f) = mean_{t in tokens(f)} log p(t | everything before t)        (mode="likelihood")
    reward(C, R) = mean_d [ mean_{f in P_d} lp(f) - mean_{f in N_d} lp(f) ]

Options: ``reduction="sum"`` sums instead of averaging over tokens; ``score_eot`` also
scores the end-of-turn token after ``f``; ``dimensions`` keeps a subset.

``mode="official"`` reproduces the paper's *released* scorer (not its stated method): with
``ids(f)`` the follow-up tokenised alone including BOS and ``L`` the full length,
``lp(f) = mean_{k in ids(f)} logits[L - len(ids(f)), k]`` (raw logits, no softmax).
Duplicates inside a template list weight the mean, as published.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from flr_engine.errors import ConfigError
from flr_engine.templates import TemplateSet

MODES = ("likelihood", "official")
REDUCTIONS = ("mean", "sum")


@dataclass
class RewardConfig:
    """How the reward is computed (see the module docstring for the formulas)."""

    mode: str = field(
        default="likelihood",
        metadata={"help": "likelihood (paper's method) or official (released code)"},
    )
    reduction: str = field(
        default="mean", metadata={"help": "mean or sum of token log-probs per follow-up"}
    )
    score_eot: bool = field(
        default=False, metadata={"help": "also score the end-of-turn token after the follow-up"}
    )
    dimensions: list[str] | None = field(
        default=None, metadata={"help": "subset of template dimensions (None: all)"}
    )

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"RewardConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.reduction not in REDUCTIONS:
            raise ConfigError(
                f"RewardConfig.reduction must be one of {REDUCTIONS}, got {self.reduction!r}"
            )
        if self.mode == "official" and (self.reduction != "mean" or self.score_eot):
            raise ConfigError(
                "RewardConfig: mode='official' fixes its own quantity; reduction/score_eot do not apply"
            )


@dataclass
class ScoreResult:
    """The reward of one (conversation, reply) and everything it was made of.

    ``template_logprobs[text]`` is ``lp(text)`` (official mode: the mean raw logit);
    ``num_tokens[text]`` the number of scored tokens; ``per_dimension[d]`` has the
    dimension's ``positive`` and ``negative`` means and their difference ``reward``.
    """

    reward: float
    positive: float
    negative: float
    per_dimension: dict[str, dict[str, float]]
    template_logprobs: dict[str, float]
    num_tokens: dict[str, int]
    mode: str = "likelihood"
    truncated: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def aggregate(
    templates: TemplateSet,
    scores: dict[str, float],
    num_tokens: dict[str, int],
    mode: str = "likelihood",
    truncated: int = 0,
) -> ScoreResult:
    """Combine per-text scores into the reward, weighting duplicates as they occur."""
    per_dim = {}
    for d in templates.dimensions:
        pos = sum(scores[t] for t in d.positive) / len(d.positive)
        neg = sum(scores[t] for t in d.negative) / len(d.negative)
        per_dim[d.name] = {"reward": pos - neg, "positive": pos, "negative": neg}
    n = len(per_dim)
    return ScoreResult(
        reward=sum(v["reward"] for v in per_dim.values()) / n,
        positive=sum(v["positive"] for v in per_dim.values()) / n,
        negative=sum(v["negative"] for v in per_dim.values()) / n,
        per_dimension=per_dim,
        template_logprobs=dict(scores),
        num_tokens=dict(num_tokens),
        mode=mode,
        truncated=truncated,
    )
