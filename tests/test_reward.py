"""The reward's aggregation against hand-computed values."""

from __future__ import annotations

import pytest

from flr_engine.reward import RewardConfig, aggregate
from flr_engine.templates import Dimension, TemplateSet


def test_aggregate_by_hand():
    # d1: P = [a, a, b] (a duplicated: weighs twice), N = [c]; d2: P = [b], N = [c, d]
    ts = TemplateSet("t", (Dimension("d1", ("a", "a", "b"), ("c",)), Dimension("d2", ("b",), ("c", "d"))))
    lp = {"a": -1.0, "b": -4.0, "c": -3.0, "d": -5.0}
    r = aggregate(ts, lp, {k: 2 for k in lp})
    # d1: pos = (-1 -1 -4)/3 = -2, neg = -3, reward = 1 ; d2: pos = -4, neg = -4, reward = 0
    assert r.per_dimension["d1"] == pytest.approx({"reward": 1.0, "positive": -2.0, "negative": -3.0})
    assert r.per_dimension["d2"] == pytest.approx({"reward": 0.0, "positive": -4.0, "negative": -4.0})
    assert r.reward == pytest.approx(0.5)
    assert r.positive == pytest.approx(-3.0) and r.negative == pytest.approx(-3.5)
    assert r.template_logprobs == lp and r.to_dict()["num_tokens"]["a"] == 2


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(mode="nope"), "mode"),
        (dict(reduction="max"), "reduction"),
        (dict(mode="official", reduction="sum"), "official"),
        (dict(mode="official", score_eot=True), "official"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        RewardConfig(**kw)
