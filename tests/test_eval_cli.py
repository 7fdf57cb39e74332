"""`flr eval` end to end on a tiny random model: report, JSON, figure, resume, errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from flr_engine.cli import evaluate as eval_cli
from flr_engine.cli import main

Q = [
    "What is the capital of France?",
    "How do I bake bread?",
    "Can you help me write a poem about the sea?",
    "Tell me about turtles.",
    "What is 2+2?",
]
PAIRS = [
    {"id": f"p{i}", "context": [{"role": "user", "content": q}], "chosen": c, "rejected": r,
     "tie": False}
    for i, (q, c, r) in enumerate(zip(
        Q,
        ["The capital of France is Paris.", "Mix flour, water, yeast and salt.",
         "The sea is wide and blue.", "Turtles are reptiles with shells.", "It is 4."],
        ["I like turtles.", "No.", "Paris.", "Bread.", "Five, maybe."],
    ))
]
PAIRS.insert(1, {**PAIRS[0], "id": "tie", "tie": True})
RATINGS = [
    {"id": f"r{i}", "context": [{"role": "user", "content": q}], "response": r, "score": s}
    for i, (q, r, s) in enumerate(zip(
        Q, ["Paris.", "Knead and bake it.", "No.", "Turtles have shells.", "4"], [4, 3, 1, 3.5, 5]
    ))
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run ~100x faster on one thread than on two contended ones."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write(path, rows):
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return str(path)


def run(model, out, *data, extra=()):
    return main(["-q", "eval", *map(str, data), "--out", str(out), "--model", str(model),
                 "--templates", "flr-mixed", "--engine", "reference", "--limit", "3",
                 "--bootstrap", "50", *extra])


@pytest.fixture(scope="module")
def first(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    data = d / "data"
    data.mkdir()
    write(data / "pairs.jsonl", PAIRS)
    write(data / "ratings.jsonl", RATINGS)
    write(data / "ties.jsonl", [{**PAIRS[1]}] * 2)
    out = d / "out"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = run(tiny_model_dir, out, data)
    return {"rc": rc, "stdout": buf.getvalue(), "out": out, "data": data}


def test_eval_writes_table_json_and_figure(first):
    assert first["rc"] == 0
    out, text = first["out"], first["stdout"]
    assert "| set | n | ties | bad | FLR | Direct | Length | Random |" in text
    assert "| pairs | 3 | 1 | 0 |" in text  # limit 3 non-tie pairs; the tie is counted
    assert "| ties | 0 | 2 | 0 | no non-tie pairs |" in text
    assert "| ratings | 3 | spearman |" in text
    res = json.load(open(out / "results.json"))
    pairs = res["sets"]["pairs"]
    assert pairs["n"] == 3 and pairs["ties"] == 1 and pairs["computed_rows"] == 3
    for m in ("flr", "direct", "length", "random"):
        acc = pairs["methods"][m]["accuracy"]
        assert 0 <= acc["value"] <= 1 and acc["ci"][0] <= acc["value"] <= acc["ci"][1]
    # Length: chosen is longer in the first 3 non-tie pairs -> 100%
    assert pairs["methods"]["length"]["accuracy"]["value"] == 1.0
    assert list(pairs["dimensions"]) == ["overall"]
    assert len(pairs["templates"]) == 39 and {"text", "polarity", "accuracy"} <= set(pairs["templates"][0])
    ratings = res["sets"]["ratings"]
    assert {"pearson", "spearman", "kendall", "n"} <= set(ratings["methods"]["flr"])
    assert res["sets"]["ties"]["note"] == "no non-tie pairs"
    with open(out / "eval.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(x) for x in open(out / "sets" / "pairs.rows.jsonl")]
    assert [r["line"] for r in rows] == [1, 3, 4]  # line 2 is the tie
    assert len(rows[0]["chosen"]["lp"]) == 39 and rows[0]["chosen"]["length"] == len(PAIRS[0]["chosen"])
    # scoring time is kept per row, so a set's total survives resumes
    assert all(r["seconds"] > 0 for r in rows) and pairs["timed_rows"] == 3
    assert pairs["scoring_seconds"] == pytest.approx(sum(r["seconds"] for r in rows), abs=0.06)
    assert "(scoring time, summed over the runs that wrote the rows: pairs " in text


def test_flr_and_direct_match_the_api(first, tiny_model_dir):
    from flr_engine import FLRScorer

    s = FLRScorer.from_pretrained(str(tiny_model_dir), templates="flr-mixed", engine="reference")
    row = json.loads(open(first["out"] / "sets" / "pairs.rows.jsonl").readline())
    ctx, reply = PAIRS[0]["context"], PAIRS[0]["chosen"]
    assert s.score([ctx], [reply])[0].reward == pytest.approx(row["chosen"]["reward"], abs=1e-5)
    # Direct by hand: mean log p of the reply's tokens given the context
    import torch

    seq = s.prepare(ctx, reply).sequences[0]
    with torch.no_grad():
        ids = torch.tensor([seq.ids], device=s.model.device)  # the judge may sit on a GPU
        logp = torch.log_softmax(s.model(ids).logits[0].float(), -1)
    t = seq.reply_targets
    direct = logp[[n - 1 for n in t], [seq.ids[n] for n in t]].mean().item()
    assert direct == pytest.approx(row["chosen"]["direct"], abs=1e-5)


def test_rerun_reuses_finished_sets_without_loading_a_model(first, tiny_model_dir, monkeypatch, capsys):
    out = first["out"]
    rows = out / "sets" / "pairs.rows.jsonl"
    before, mtime = rows.read_bytes(), os.stat(rows).st_mtime_ns

    def boom(args):
        raise AssertionError("the model must not be loaded for finished sets")

    monkeypatch.setattr(eval_cli, "scorer_from_args", boom)
    assert run(tiny_model_dir, out, first["data"]) == 0
    text = capsys.readouterr().out
    assert "reused finished results for: pairs, ratings, ties" in text
    assert rows.read_bytes() == before and os.stat(rows).st_mtime_ns == mtime
    res = json.load(open(out / "results.json"))
    assert res["sets"]["pairs"]["cached"] is True


def test_interrupted_set_resumes_where_it_stopped(first, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first["out"], out)
    rows = out / "sets" / "pairs.rows.jsonl"
    full = rows.read_text().splitlines(keepends=True)
    rows.write_text(full[0] + full[1][: len(full[1]) // 2])  # 1 row + a torn line
    os.remove(out / "sets" / "pairs.result.json")
    assert run(tiny_model_dir, out, first["data"] / "pairs.jsonl") == 0
    res = json.load(open(out / "results.json"))
    assert res["sets"]["pairs"]["computed_rows"] == 2
    again = rows.read_text().splitlines(keepends=True)
    assert [json.loads(x)["line"] for x in again] == [1, 3, 4]
    assert again[0] == full[0]  # the finished row, its time included, is kept as it was
    assert res["sets"]["pairs"]["timed_rows"] == 3
    for new, old in zip(again, full):
        new, old = json.loads(new), json.loads(old)
        assert new["chosen"]["reward"] == pytest.approx(old["chosen"]["reward"], abs=1e-5)
        assert new["rejected"]["lp"] == pytest.approx(old["rejected"]["lp"], abs=1e-5)


def test_set_held_by_another_run_is_left_out_not_duplicated(first, tiny_model_dir, tmp_path, capsys):
    """Two `flr eval` runs on one --out share the sets: a set whose rows another run is
    writing is skipped (named in the report), the others are scored."""
    from flr_engine.io import ResumableWriter

    out = tmp_path / "out"
    shutil.copytree(first["out"], out)
    for f in ("pairs.result.json", "ratings.result.json"):
        os.remove(out / "sets" / f)
    rows = out / "sets" / "pairs.rows.jsonl"
    before = rows.read_bytes()
    meta = json.load(open(str(rows) + ".meta.json"))
    inputs = list(meta.pop("input_sha256"))
    meta.pop("flr_engine_version")
    with ResumableWriter(str(rows), meta, inputs=inputs):  # "the other run", same computation
        assert run(tiny_model_dir, out, first["data"]) == 0
    text = capsys.readouterr().out
    assert "left out, being scored by another process: pairs" in text
    res = json.load(open(out / "results.json"))
    assert "pairs" not in res["sets"] and res["busy"] == ["pairs"]
    assert res["sets"]["ratings"]["n"] == 3
    assert rows.read_bytes() == before
    assert run(tiny_model_dir, out, first["data"]) == 0  # once it is free: reported again
    assert json.load(open(out / "results.json"))["sets"]["pairs"]["n"] == 3


def test_calibration_reports_only_other_sets(tiny_model_dir, tmp_path, capsys):
    a = write(tmp_path / "a.jsonl", [p for p in PAIRS if not p["tie"]])
    b = write(tmp_path / "b.jsonl", RATINGS[:3])
    args = ["--limit", "5", "--calibrate-on", "a", "--no-figure"]
    assert main(["-q", "eval", a, b, "--out", str(tmp_path / "o"), "--model", str(tiny_model_dir),
                 "--templates", "flr-mixed", "--engine", "engine", "--bootstrap", "30", *args]) == 0
    text = capsys.readouterr().out
    assert "FLR-cal" in text and "(fit set)" in text and "Calibration: per-template" in text
    res = json.load(open(tmp_path / "o" / "results.json"))
    cal = res["calibration"]
    assert cal["fit_on"] == "a" and list(cal["transfer"]) == ["b"] and len(cal["weights"]) == 39
    # the fit set's own figure is its held-out (cross-validated) accuracy at the chosen lambda
    chosen = [c for c in cal["cv"] if c["lam"] == cal["lam"]]
    assert len(chosen) == 1 and cal["cv_accuracy"] == chosen[0]["accuracy"]
    assert (2 * 5 * cal["cv_accuracy"]) % 1 == 0  # 5 pairs, a score tie counts 0.5
    assert f"held-out accuracy on a itself (5-fold CV): {100 * cal['cv_accuracy']:.1f}%" in text
    assert not (tmp_path / "o" / "eval.png").exists()
    # too few pairs to fit: the rest of the report stands (rows are reused, not rescored)
    args[1] = "3"
    assert main(["-q", "eval", a, b, "--out", str(tmp_path / "o"), "--model", str(tiny_model_dir),
                 "--templates", "flr-mixed", "--bootstrap", "30", *args]) == 0
    text = capsys.readouterr().out
    assert "Calibration on a failed: calibration needs at least 4" in text and "FLR-cal" not in text
    assert json.load(open(tmp_path / "o" / "results.json"))["sets"]["a"]["computed_rows"] == 0
    assert main(["-q", "eval", a, "--out", str(tmp_path / "o"), "--calibrate-on", "zzz",
                 "--model", str(tiny_model_dir), "--templates", "flr-mixed"]) == 2
    assert "no such set" in capsys.readouterr().err


def test_bad_rows_fail_before_any_model_load(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(eval_cli, "scorer_from_args", lambda a: 1 / 0)
    p = write(tmp_path / "x.jsonl", [PAIRS[0], {"context": "hi", "chosen": "a"}])
    assert main(["-q", "eval", p, "--out", str(tmp_path / "o"), "--on-error", "fail"]) == 2
    assert "x.jsonl:2: field 'rejected': missing" in capsys.readouterr().err
    q = write(tmp_path / "y.jsonl", [{"question": "hi"}])
    assert main(["-q", "eval", q, "--out", str(tmp_path / "o"), "--on-error", "fail"]) == 2
    assert "y.jsonl:1: unknown row format" in capsys.readouterr().err


def test_reward_model_column(tiny_model_dir, tmp_path, capsys):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from tiny import make_tokenizer
    from transformers import AutoConfig, AutoModelForSequenceClassification

    tok = make_tokenizer("chatml")
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                               max_position_embeddings=256, num_labels=1, pad_token_id=0)
    rm = tmp_path / "rm"
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(rm)
    tok.save_pretrained(rm)
    p = write(tmp_path / "p.jsonl", PAIRS[:3])
    assert main(["-q", "eval", p, "--out", str(tmp_path / "o"), "--model", str(tiny_model_dir),
                 "--templates", "flr-mixed", "--dimensions", "overall", "--engine", "reference",
                 "--limit", "2", "--bootstrap", "20", "--reward-model", str(rm), "--no-figure"]) == 0
    assert "| RM |" in capsys.readouterr().out
    res = json.load(open(tmp_path / "o" / "results.json"))
    assert res["sets"]["p"]["methods"]["rm"]["accuracy"]["n"] == 2
    rows = [json.loads(x) for x in open(tmp_path / "o" / "sets" / "p.rm.jsonl")]
    assert [r["line"] for r in rows] == [1, 3] and isinstance(rows[0]["chosen"], float)


def test_data_option_and_default_out(first, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`--data FILE_OR_DIR` (the documented spelling) reads the same sets as positional
    inputs; without --out the results go to runs/eval under the working directory."""
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "eval", "--data", str(first["data"] / "pairs.jsonl"), "--model",
                 str(tiny_model_dir), "--templates", "flr-mixed", "--engine", "reference",
                 "--limit", "3", "--bootstrap", "50", "--no-figure"]) == 0
    mine = json.load(open(tmp_path / "runs" / "eval" / "results.json"))["sets"]["pairs"]
    theirs = json.load(open(first["out"] / "results.json"))["sets"]["pairs"]
    assert mine["methods"] == theirs["methods"] and mine["n"] == 3
    capsys.readouterr()
    assert main(["-q", "eval", "--model", str(tiny_model_dir)]) == 2
    assert "no inputs" in capsys.readouterr().err


def test_row_errors_survive_pickling():
    """A rank's RowError / InputError reaches the others (torch.distributed pickles it) with
    its file, line and field."""
    import pickle

    from flr_engine.chat import InputError
    from flr_engine.io import RowError

    e = pickle.loads(pickle.dumps(RowError("a.jsonl", 3, "rejected", "is empty")))
    assert (e.path, e.line, e.field, str(e)) == ("a.jsonl", 3, "rejected",
                                                 "a.jsonl:3: field 'rejected': is empty")
    i = pickle.loads(pickle.dumps(InputError("is empty", "response")))
    assert (i.message, i.field, str(i)) == ("is empty", "response", "field 'response': is empty")


def test_saved_calibration_applies_to_every_set(tiny_model_dir, tmp_path, capsys):
    """--calibrate-on A --save-calibration F, then --calibration F: FLR-cal on every set
    equals the weights applied by hand to the per-template log-probs of the rows."""
    import numpy as np

    from flr_engine.evaluation.metrics import accuracy_ci

    a = write(tmp_path / "a.jsonl", [p for p in PAIRS if not p["tie"]])
    b = write(tmp_path / "b.jsonl", RATINGS[:3])
    common = ["--model", str(tiny_model_dir), "--templates", "flr-mixed", "--bootstrap", "30",
              "--no-figure", "--limit", "5"]
    cal_file = tmp_path / "cal.json"
    fit = write(tmp_path / "fitset.jsonl", [p for p in PAIRS if not p["tie"]])
    assert main(["-q", "eval", fit, "--out", str(tmp_path / "fit"), "--calibrate-on", "fitset",
                 "--save-calibration", str(cal_file), *common]) == 0
    saved = json.load(open(cal_file))
    assert saved["templates"] == "flr-mixed" and saved["fit_on"] == "fitset"
    assert len(saved["weights"]) == 39
    capsys.readouterr()
    assert main(["-q", "eval", a, b, "--out", str(tmp_path / "o"), "--calibration", str(cal_file),
                 *common]) == 0
    text = capsys.readouterr().out
    assert "FLR-cal" in text and "(fit set)" not in text and "Calibration from" in text
    res = json.load(open(tmp_path / "o" / "results.json"))
    assert set(res["calibration"]["transfer"]) == {"a", "b"}
    from flr_engine.templates import load_templates

    w = np.array([saved["weights"][t] for t in load_templates("flr-mixed").unique_texts])
    rows = [json.loads(x) for x in open(tmp_path / "o" / "sets" / "a.rows.jsonl")]
    d = np.array([(np.array(r["chosen"]["lp"]) - np.array(r["rejected"]["lp"])) @ w for r in rows])
    want = accuracy_ci(d, n_boot=30)["value"]
    assert res["calibration"]["transfer"]["a"]["accuracy"]["value"] == pytest.approx(want)
    # weights for another template set are refused, before any model is loaded
    assert main(["-q", "eval", a, "--out", str(tmp_path / "x"), "--calibration", str(cal_file),
                 "--model", str(tiny_model_dir), "--templates", "flr-helpfulness"]) == 2
    assert "fit for template set 'flr-mixed'" in capsys.readouterr().err
    assert main(["-q", "eval", a, "--out", str(tmp_path / "x"), "--calibration", "auto",
                 "--model", str(tiny_model_dir)]) == 2
    assert "has no calibration-flr-helpfulness.json" in capsys.readouterr().err


def test_length_controlled_accuracy(first):
    """Accuracy on the pairs whose replies differ in length by < 20% of the longer one."""
    import numpy as np

    from flr_engine.evaluation.results import SetScores
    from flr_engine.evaluation.set_metrics import length_controlled, pairwise_metrics

    assert length_controlled([100, 100, 10], [81, 80, 10]).tolist() == [True, False, True]
    la, lb = np.array([100.0, 100, 50, 50, 10]), np.array([85.0, 40, 45, 20, 11])
    flr_a, flr_b = np.array([1.0, 0, 0, 1, 0]), np.array([0.0, 1, 1, 0, 1])
    s = SetScores(
        lines=list(range(5)),
        a={"flr": flr_a, "length": la}, b={"flr": flr_b, "length": lb},
        dims_a={}, dims_b={}, lp_a=np.zeros((5, 0)), lp_b=np.zeros((5, 0)), y=None,
    )  # fmt: skip
    m = pairwise_metrics(s, [], n_boot=20)
    assert m["n_lc"] == 3  # pairs 0, 2, 4
    assert m["methods"]["flr"]["accuracy_lc"]["value"] == pytest.approx(1 / 3)  # right on 0 only
    assert m["methods"]["flr"]["accuracy"]["value"] == pytest.approx(2 / 5)
    assert m["methods"]["length"]["accuracy_lc"]["value"] == pytest.approx(2 / 3)
    res = json.load(open(first["out"] / "results.json"))
    assert "n_lc" in res["sets"]["pairs"] and "accuracy_lc" in res["sets"]["pairs"]["methods"]["flr"]
    assert "Length-controlled accuracy" in first["stdout"]
