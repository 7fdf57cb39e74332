"""scripts/eval_agreement.py: row-by-row agreement of two `flr eval` runs, on hand-made rows."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def agreement():
    spec = importlib.util.spec_from_file_location("eval_agreement", os.path.join(ROOT, "scripts", "eval_agreement.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pair(line, rc, rr, dc=-1.0, dr=-2.0):
    return {"line": line, "chosen": {"reward": rc, "direct": dc}, "rejected": {"reward": rr, "direct": dr}}


def test_pairwise_agreement_by_hand(agreement):
    a = {1: pair(1, 0.10, 0.00), 2: pair(2, 0.00, 0.05), 3: pair(3, 0.30, 0.29, -2.0, -1.0)}
    # B: row 3's FLR choice flips (0.28 < 0.29); rows 1-2 move by 0.01 / 0.0; row 4 is B's only
    b = {1: pair(1, 0.11, 0.00), 2: pair(2, 0.00, 0.05), 3: pair(3, 0.28, 0.29, -2.0, -1.0),
         4: pair(4, 0.50, 0.49)}
    r = agreement.compare_set(a, b)
    assert r["common"] == 3 and r["same_flr"] == 2 and r["same_direct"] == 3
    assert r["max_diff"] == pytest.approx(0.02) and r["median_diff"] == pytest.approx(0.0)
    # margin differences A - B on the common rows: d = (-0.01, 0, +0.02). B's margins
    # 0.11, -0.05, -0.01, 0.01 flip sign under d with probability 0, 0, 1/3 (-0.01 + 0.02),
    # 0 (0.01 - 0.01 = 0 is no flip)
    assert r["b_rows"] == 4 and r["expected_flips"] == pytest.approx(1 / 3)


def test_rating_agreement_and_cli(agreement, tmp_path, capsys, monkeypatch):
    for name, rewards in (("A", [0.1, 0.2, 0.3]), ("B", [0.1, 0.3, 0.2])):  # |diffs| 0, 0.1, 0.1
        (tmp_path / name / "sets").mkdir(parents=True)
        with open(tmp_path / name / "sets" / "r.rows.jsonl", "w") as fh:
            for i, x in enumerate(rewards, 1):
                fh.write(json.dumps({"line": i, "response": {"reward": x}}) + "\n")
            fh.write(json.dumps({"line": 9, "error": "bad row"}) + "\n")
    monkeypatch.setattr("sys.argv", ["eval_agreement.py", str(tmp_path / "A"), str(tmp_path / "B")])
    agreement.main()
    out = capsys.readouterr().out
    assert out.startswith("r: 3 common rows; |reward diff| median 0.1000, max 0.1000")
    assert "Spearman(A, B) 0.5000" in out
