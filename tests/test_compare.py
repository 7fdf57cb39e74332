"""`flr compare`: win rates and means against hand-computed values; length control; errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from flr_engine.cli import main
from flr_engine.evaluation.compare import (
    compare,
    fit_length_logistic,
    load_field,
    repetition,
    words,
)
from flr_engine.io import RowError


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_means_and_win_rate_by_hand():
    a = {"1": 0.0, "2": 1.0, "3": 2.0, "4": 5.0, "x": 9.0}
    b = {"1": 1.0, "2": 1.0, "3": 1.0, "4": 7.0, "y": 9.0}
    res = compare(a, b, n_boot=200)
    assert res["n"] == 4 and res["only_a"] == 1 and res["only_b"] == 1
    assert res["mean_reward_a"]["value"] == pytest.approx(2.0)
    assert res["mean_reward_b"]["value"] == pytest.approx(2.5)
    assert res["mean_difference"]["value"] == pytest.approx(0.5)
    # d = [1, 0, -1, 2]: wins 1 + 0.5 (tie) + 0 + 1 = 2.5 of 4
    assert res["win_rate_b"]["value"] == pytest.approx(0.625)
    lo, hi = res["win_rate_b"]["ci"]
    assert 0 <= lo <= 0.625 <= hi <= 1
    assert "mean_words_a" not in res


def test_length_control():
    rng = np.random.default_rng(0)
    n = 400
    keys = [str(i) for i in range(n)]
    wa = {k: int(w) for k, w in zip(keys, rng.integers(20, 200, n))}
    # B is longer on half the prompts; the reward only likes length: at equal length no edge
    wb = {k: int(wa[k] * (2.0 if i % 2 else 1.0)) for i, k in enumerate(keys)}
    ra = {k: math.log(wa[k]) + rng.normal(0, 0.3) for k in keys}
    rb = {k: math.log(wb[k]) + rng.normal(0, 0.3) for k in keys}
    res = compare(ra, rb, wa, wb, n_boot=100)
    assert res["longer_rate_b"]["value"] == pytest.approx(0.75)  # longer on half, tie on half
    assert res["win_rate_b"]["value"] > 0.65  # raw win rate is inflated by length ...
    sim = res["similar_length_win_rate_b"]
    assert sim["n"] == n // 2 and abs(sim["value"] - 0.5) < 0.1  # ... but not at equal length
    eq = res["equal_length_win_rate_b"]
    assert abs(eq["value"] - 0.5) < 0.1 and eq["length_slope"] > 1
    assert eq["ci"][0] < 0.5 < eq["ci"][1]


def test_logistic_fit_recovers_known_coefficients():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, 20000)
    y = (rng.random(x.size) < 1 / (1 + np.exp(-(0.4 + 1.5 * x)))).astype(float)
    a, c = fit_length_logistic(y, x)
    assert a == pytest.approx(0.4, abs=0.06) and c == pytest.approx(1.5, abs=0.08)


def test_cli_end_to_end_and_errors(tmp_path, capsys):
    sa = write(tmp_path / "a.jsonl", [{"id": i, "reward": -0.2} for i in range(3)])
    sb = write(tmp_path / "b.jsonl", [{"id": i, "reward": -0.1 * i} for i in range(3)])
    ra = write(tmp_path / "ra.jsonl", [{"id": i, "response": "a b c"} for i in range(3)])
    rb = write(tmp_path / "rb.jsonl", [{"id": i, "response": "a " * (i + 1)} for i in range(3)])
    out = tmp_path / "c.json"
    rc = main(["compare", sa, sb, "--names", "base,tuned", "--replies", ra, rb, "--json",
               str(out), "--bootstrap", "50"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "win rate of tuned (%) | 83.3" in text  # d = [0.2, 0.1, 0.0]: (1 + 1 + 0.5) / 3
    res = json.loads(out.read_text())
    assert res["win_rate_b"]["value"] == pytest.approx(2.5 / 3)
    assert res["mean_words_b"]["value"] == pytest.approx(2.0)
    assert words("  two  words ") == 2
    assert res["repetition_a"]["value"] == 0.0  # "a b c": no 4-gram at all
    assert "repeated word 4-grams, tuned (%) | 0.0" in text
    bad = write(tmp_path / "bad.jsonl", [{"id": 1, "reward": 0.1}, {"id": 2}])
    with pytest.raises(RowError, match="bad.jsonl:2: field 'reward': missing"):
        load_field(bad, "reward")
    dup = write(tmp_path / "dup.jsonl", [{"id": 1, "reward": 0.1}, {"id": 1, "reward": 0.2}])
    with pytest.raises(RowError, match="duplicate id"):
        load_field(dup, "reward")
    assert main(["compare", sa, bad]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_repetition_by_hand():
    assert repetition("a b c d") == 0.0  # one 4-gram
    # "no no no no no no": 3 four-grams, all the same -> 1 - 1/3
    assert repetition("no no no no no no") == pytest.approx(2 / 3)
    # a b c d a b c d: 4-grams abcd bcda cdab dabc abcd -> 4 distinct of 5
    assert repetition("a b c d a b c d") == pytest.approx(0.2)
    assert repetition("short") == 0.0
