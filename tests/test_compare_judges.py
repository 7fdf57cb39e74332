"""scripts/compare_judges.py: judges scored on the same rows, with paired differences; on
hand-made rows with the values worked out by hand."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def judges():
    path = os.path.join(ROOT, "scripts", "compare_judges.py")
    spec = importlib.util.spec_from_file_location("compare_judges", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_run(folder, name, rows):
    (folder / "sets").mkdir(parents=True)
    with open(folder / "sets" / f"{name}.rows.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def side(reward, direct, length):
    return {"reward": reward, "direct": direct, "length": length}


def test_pairwise_accuracies_and_paired_differences(judges, tmp_path):
    # 4 pairs; A's FLR: right, wrong, tie, right -> 62.5%; B's FLR: right on all -> 100%;
    # Direct A: right on 1 and 2 -> 50%; Length (chosen longer): rows 1, 2, 3 -> 75%
    a = [{"line": i, "chosen": side(rc, dc, lc), "rejected": side(rr, dr, lr)}
         for i, (rc, rr, dc, dr, lc, lr) in enumerate(
             [(1, 0, 1, 0, 9, 1), (0, 1, 1, 0, 9, 1), (0.5, 0.5, 0, 1, 10, 9), (1, 0, 0, 1, 1, 9)], 1)]  # fmt: skip
    b = [{"line": r["line"], "chosen": side(1, 0, 0), "rejected": side(0, 0, 0)} for r in a]
    b.append({"line": 9, "error": "bad row"})  # error rows are not scored rows
    write_run(tmp_path / "A", "p", a)
    write_run(tmp_path / "B", "p", b)
    res = judges.compare([("A", str(tmp_path / "A")), ("B", str(tmp_path / "B"))], "p", bootstrap=200)
    c = {k: v[0] for k, v in res["cells"].items()}
    assert res["kind"] == "pairwise" and res["n"] == 4
    assert c["FLR A"] == 62.5 and c["FLR B"] == 100.0 and c["Direct A"] == 50.0
    assert c["Direct B"] == 50.0 and c["Length"] == 75.0  # B's Direct: all ties
    assert c["FLR A - Length"] == -12.5 and c["FLR B - Length"] == 25.0
    assert c["FLR B - FLR A"] == 37.5
    lo, hi = res["cells"]["FLR B - FLR A"][1:]
    assert 0.0 <= lo <= 37.5 <= hi <= 100.0  # B is never below A on a row: no negative resample
    # length-controlled: only row 3 (lengths 10 vs 9) is within 20%; there A ties, B is right
    lc = judges.compare([("A", str(tmp_path / "A")), ("B", str(tmp_path / "B"))], "p", 50, 0, True)
    c = {k: v[0] for k, v in lc["cells"].items()}
    assert lc["n"] == 1 and c["FLR A"] == 50.0 and c["FLR B"] == 100.0 and c["Length"] == 100.0


def test_rating_spearman_and_row_mismatch(judges, tmp_path):
    scores = [1.0, 2.0, 3.0, 4.0]
    write_run(tmp_path / "A", "r", [{"line": i, "score": s, "response": side(s, -s, 10 - i)}
                                    for i, s in enumerate(scores, 1)])  # fmt: skip
    res = judges.compare([("A", str(tmp_path / "A"))], "r", bootstrap=50)
    c = {k: v[0] for k, v in res["cells"].items()}
    assert res["kind"] == "rating"
    assert c["FLR A"] == pytest.approx(1.0) and c["Direct A"] == pytest.approx(-1.0)
    assert c["Length"] == pytest.approx(-1.0) and c["FLR A - Length"] == pytest.approx(2.0)
    write_run(tmp_path / "B", "r", [{"line": 1, "score": 1.0, "response": side(0, 0, 0)}])
    with pytest.raises(SystemExit, match="other rows"):
        judges.compare([("A", str(tmp_path / "A")), ("B", str(tmp_path / "B"))], "r")
