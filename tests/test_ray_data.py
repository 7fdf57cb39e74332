"""``FLRBatchScorer`` (Ray Data's callable class) against ``flr score``: called directly on
numpy and pandas batches (no Ray needed), then in a pipeline on a local Ray instance."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from test_cli import write_rows

from flr_engine.cli import main
from flr_engine.errors import InputError
from flr_engine.ray_data import RESULT_COLUMNS, FLRBatchScorer

ROWS = [
    {"id": 10 + i, "context": [{"role": "user", "content": f"Question number {i}?"}],
     "response": "An answer. " * (1 + i % 3), "source": f"set-{i % 2}"}
    for i in range(6)
]  # fmt: skip
ROWS[2] = {**ROWS[2], "response": ""}  # refused when the rows are read
ROWS[4] = {**ROWS[4], "response": "word " * 600}  # refused when rendered: longer than the judge
MIXED = [*ROWS, {"id": 99, "prompt": "How do I bake bread?", "completion": "Mix flour and water.",
                 "source": "trl"}]  # fmt: skip
SETTINGS = {"templates": "flr-mixed", "engine": "reference", "batch_size": 2}


def flr_score(tmp_path, model, rows, engine="reference"):
    """``flr score --on-error skip``'s rows and errors, keyed by id."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_rows(inp, rows)
    argv = ["-q", "score", "--input", str(inp), "--output", str(out), "--model", str(model),
            "--templates", "flr-mixed", "--engine", engine, "--batch-size", "2",
            "--on-error", "skip"]  # fmt: skip
    assert main(argv) == 0
    scored = {r.pop("id"): r for r in map(json.loads, open(out))}
    for r in scored.values():
        assert r.pop("line")  # the only field a dataset row does not get
    errors = [json.loads(x) for x in open(f"{out}.errors.jsonl")]
    return scored, {rows[e["line"] - 1]["id"]: e["error"] for e in errors}


def numpy_batch(rows):
    """Rows as Ray's numpy batch format: a list column is an object array of arrays."""
    batch = {}
    for k in ("id", "context", "response", "prompt", "completion", "source"):
        col = np.empty(len(rows), dtype=object)
        for i, r in enumerate(rows):
            v = r.get(k)
            col[i] = np.array(v, dtype=object) if isinstance(v, list) else v
        batch[k] = col
    batch["id"] = batch["id"].astype(np.int64)
    return batch


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    return FLRBatchScorer(str(tiny_model_dir), **SETTINGS)


@pytest.fixture(scope="module")
def expected(tmp_path_factory, tiny_model_dir):
    return flr_score(tmp_path_factory.mktemp("cli"), tiny_model_dir, MIXED)


def check_against_cli(ids, results, expected):
    scored, errors = expected
    assert sorted(errors) == [12, 14] and len(scored) == len(MIXED) - 2
    for i, res in zip(ids, results):
        if i in errors:
            assert all(res[c] is None for c in RESULT_COLUMNS if c != "error")
            # the CLI's message is "FILE:LINE: field ...: why"; the batch's, "field ...: why"
            assert res["error"] and errors[i].endswith(res["error"])
        else:
            assert res["error"] is None
            assert {c: res[c] for c in RESULT_COLUMNS if c != "error"} == scored[i]  # exact


def test_a_numpy_batch_scores_as_flr_score(scorer, expected):
    batch = numpy_batch(MIXED)
    out = scorer(batch)
    assert isinstance(out, dict) and list(out)[: len(batch)] == list(batch)
    for k in batch:  # every input column is passed through as it was
        assert out[k] is batch[k]
    assert all(len(out[c]) == len(MIXED) for c in RESULT_COLUMNS)
    assert out["error"][2].startswith("field 'response': is empty")
    rows = [{c: out[c][i] for c in RESULT_COLUMNS} for i in range(len(MIXED))]
    check_against_cli([r["id"] for r in MIXED], rows, expected)


def test_a_pandas_batch_scores_the_same(scorer, expected):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(MIXED)
    out = scorer(df)
    assert isinstance(out, pd.DataFrame) and list(out.columns) == [*df.columns, *RESULT_COLUMNS]
    assert out["source"].tolist() == df["source"].tolist() and "reward" not in df  # not in place
    rows = out[list(RESULT_COLUMNS)].to_dict("records")
    check_against_cli(out["id"].tolist(), rows, expected)


def test_the_packed_engine_matches_flr_score_when_the_batches_are_the_same(tmp_path, tiny_model_dir):
    # one Ray batch of all rows, cut into judge calls of 2 as flr score cuts the file; other
    # cuts pack other rows together, and the engine's last bits may then differ
    expected = flr_score(tmp_path, tiny_model_dir, MIXED, engine="engine")
    scorer = FLRBatchScorer(str(tiny_model_dir), **{**SETTINGS, "engine": "engine"})
    assert scorer.scorer.engine_name == "engine"
    out = scorer(numpy_batch(MIXED))
    rows = [{c: out[c][i] for c in RESULT_COLUMNS} for i in range(len(MIXED))]
    check_against_cli([r["id"] for r in MIXED], rows, expected)


def test_bad_batches_are_refused_with_a_reason(scorer):
    with pytest.raises(InputError, match=r"already has result column\(s\) \['reward'\]"):
        scorer({**numpy_batch(ROWS[:1]), "reward": np.array([1.0])})
    with pytest.raises(TypeError, match="batch_format='numpy'"):
        scorer([ROWS[0]])
    out = scorer({"id": np.array([1]), "text": np.array(["no context"])})
    assert out["reward"][0] is None and "needs 'context' + 'response'" in out["error"][0]


def test_bad_settings_fail_before_the_model_loads():
    with pytest.raises(ValueError, match="mode"):
        FLRBatchScorer("no-such-model", mode="nope")
    with pytest.raises(Exception, match="no-such-set"):
        FLRBatchScorer("no-such-model", templates="no-such-set")


def test_the_module_does_not_import_ray():
    code = "import sys, flr_engine.ray_data; assert 'ray' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


# --- a local Ray instance ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_a_ray_pipeline_scores_as_flr_score(ray_local, tiny_model_dir, expected):
    t0 = time.time()
    ds = ray_local.data.from_items(ROWS, override_num_blocks=3)  # list contexts: one schema
    got = ds.map_batches(
        FLRBatchScorer,
        fn_constructor_kwargs={"model": str(tiny_model_dir), **SETTINGS},
        compute=ray_local.data.ActorPoolStrategy(size=2),  # two actors, a judge each
        batch_size=2,
    ).take_all()
    print(f"ray pipeline: {time.time() - t0:.1f}s")
    got.sort(key=lambda r: r["id"])
    assert [r["id"] for r in got] == [r["id"] for r in ROWS]
    assert [r["source"] for r in got] == [r["source"] for r in ROWS]
    assert [r["response"] for r in got] == [r["response"] for r in ROWS]
    assert set(got[0]) == {*ROWS[0], *RESULT_COLUMNS}
    check_against_cli([r["id"] for r in got], got, expected)
