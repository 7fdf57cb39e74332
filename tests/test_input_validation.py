"""The whole input is validated before the first model call; every problem is reported as
``file:line: field: what is wrong`` with exit code 2 and nothing written."""

from __future__ import annotations

import gzip
import json
import os

import pytest
from test_cli import ROWS, read, score, write_rows

GOOD = ROWS[0]


def test_every_bad_row_is_reported_before_anything_is_written(tmp_path, tiny_model_dir, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [GOOD] * 10 + [{"context": "Hi", "response": 3}] + [GOOD]
    write_rows(inp, rows, ["{not json"])
    assert score(tiny_model_dir, inp, out) == 2
    err = capsys.readouterr().err
    assert "2 bad rows" in err
    assert f"{inp}:11: field 'response': must be a string" in err
    assert f"{inp}:13: malformed JSON" in err
    assert not out.exists()  # nothing computed, nothing written


def test_first_20_problems_then_a_count(tmp_path, tiny_model_dir, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_rows(inp, [{"context": "Hi"}] * 25)
    assert score(tiny_model_dir, inp, out) == 2
    err = capsys.readouterr().err
    assert err.count("field 'response': missing") == 20 and "... and 5 more bad rows" in err


def test_truncated_and_fake_gzip_are_clear_errors(tmp_path, tiny_model_dir, capsys):
    inp, out = tmp_path / "in.jsonl.gz", tmp_path / "out.jsonl"
    with gzip.open(inp, "wt") as fh:
        for _ in range(2000):
            fh.write(json.dumps(GOOD) + "\n")
    data = inp.read_bytes()
    inp.write_bytes(data[: len(data) // 2])
    assert score(tiny_model_dir, inp, out) == 2
    err = capsys.readouterr().err
    assert "corrupt or truncated compressed file after line" in err and "Traceback" not in err
    inp.write_bytes(b"this is not gzip\n")
    assert score(tiny_model_dir, inp, out) == 2
    assert "corrupt or truncated compressed file after line 0" in capsys.readouterr().err
    assert not out.exists()


def test_skip_covers_every_kind_of_row_error_and_counts_them(tmp_path, tiny_model_dir, caplog):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_rows(inp, [GOOD, {"context": "Hi"}, GOOD, {**GOOD, "id": float("nan")}], ["{oops"])
    assert score(tiny_model_dir, inp, out, "--on-error", "skip") == 0
    assert [r["line"] for r in read(out)] == [1, 3]
    errors = [json.loads(x) for x in open(str(out) + ".errors.jsonl")]
    assert sorted(e["line"] for e in errors) == [2, 4, 5]
    logged = caplog.text
    assert f"{inp}:2: field 'response': missing" in logged
    assert f"{inp}:4: field 'id': must be finite" in logged
    assert f"{inp}:5: malformed JSON" in logged
    assert "skipped 3 bad rows" in logged
    # a rerun (resume: nothing left to score) lists each bad row once, not once per run
    assert score(tiny_model_dir, inp, out, "--on-error", "skip") == 0
    errors = [json.loads(x) for x in open(str(out) + ".errors.jsonl")]
    assert sorted(e["line"] for e in errors) == [2, 4, 5]
    # --overwrite starts the list over: a row fixed since is no longer listed
    write_rows(inp, [GOOD, GOOD, GOOD, {**GOOD, "id": float("nan")}], ["{oops"])
    assert score(tiny_model_dir, inp, out, "--on-error", "skip", "--overwrite") == 0
    errors = [json.loads(x) for x in open(str(out) + ".errors.jsonl")]
    assert sorted(e["line"] for e in errors) == [4, 5]


def test_nan_id_is_rejected_so_the_output_stays_valid_json(tmp_path, tiny_model_dir, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_rows(inp, [{"id": float("nan"), **{k: v for k, v in GOOD.items() if k != "id"}}])
    assert score(tiny_model_dir, inp, out) == 2
    assert f"{inp}:1: field 'id': must be finite" in capsys.readouterr().err


def test_empty_input_is_an_error_unless_allowed(tmp_path, tiny_model_dir, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n\n")
    assert score(tiny_model_dir, inp, out) == 2
    assert "empty: no rows" in capsys.readouterr().err and not out.exists()
    assert score(tiny_model_dir, inp, out, "--allow-empty") == 0
    assert read(out) == []


def test_empty_input_suggests_allow_empty_only_where_the_flag_exists(tmp_path):
    from flr_engine.errors import FLRError
    from flr_engine.mining import read_prompts

    inp = tmp_path / "in.jsonl"
    inp.write_text("")
    with pytest.raises(FLRError, match="empty: no rows$"):
        read_prompts(str(inp))  # flr mine / flr generate have no --allow-empty


def test_unwritable_output_is_a_message_not_a_traceback(tmp_path, tiny_model_dir, capsys):
    inp = tmp_path / "in.jsonl"
    write_rows(inp, [GOOD])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert score(tiny_model_dir, inp, blocker / "out.jsonl") == 2
    err = capsys.readouterr().err
    assert "cannot write --output" in err and "Traceback" not in err
    assert blocker.read_text() == "x" and os.path.isfile(blocker)


def test_completion_with_role_user_is_not_taken_as_the_reply(tmp_path, tiny_model_dir, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_rows(inp, [{"prompt": "Hi", "completion": [{"role": "user", "content": "Thanks!"}]}])
    assert score(tiny_model_dir, inp, out) == 2
    assert f"{inp}:1: field 'completion': the reply message must have role 'assistant'" in (
        capsys.readouterr().err
    )
    assert not out.exists()
