"""`flr` through main(argv): scoring, resume, bad input, env, model fetch errors."""

from __future__ import annotations

import gzip
import json

import pytest

from flr_engine.cli import main

ROWS = [
    {"id": "a", "context": [{"role": "user", "content": "What is the capital of France?"}], "response": "Paris."},
    {"id": "b", "prompt": "How do I bake bread?", "completion": "Mix flour and water."},
    {"prompt": [{"role": "user", "content": "Hi!"}], "completion": [{"role": "assistant", "content": "Hello!"}]},
    {"id": "d", "context": "Tell me a joke.", "response": "No."},
]


def write_rows(path, rows, extra_lines=()):
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
        for line in extra_lines:
            fh.write(line + "\n")


def score(tiny_model_dir, inp, out, *extra):
    return main(["-q", "score", "--input", str(inp), "--output", str(out), "--model", str(tiny_model_dir),
                 "--templates", "flr-mixed", "--engine", "reference", "--batch-size", "2", *extra])


def read(out):
    return [json.loads(line) for line in open(out)]


def test_score_writes_one_row_per_input(tmp_path, tiny_model_dir):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_rows(inp, ROWS)
    assert score(tiny_model_dir, inp, out) == 0
    rows = read(out)
    assert [r["line"] for r in rows] == [1, 2, 3, 4]
    assert [r["id"] for r in rows] == ["a", "b", 3, "d"]
    assert all({"reward", "positive", "negative", "per_dimension", "template_logprobs", "num_tokens"} <= set(r) for r in rows)
    # the API gives the same numbers
    from flr_engine import FLRScorer

    s = FLRScorer.from_pretrained(str(tiny_model_dir), templates="flr-mixed", engine="reference")
    assert s.score(["How do I bake bread?"], ["Mix flour and water."])[0].reward == pytest.approx(rows[1]["reward"])


def test_resume_skips_done_rows_and_repairs_torn_line(tmp_path, tiny_model_dir):
    inp, out = tmp_path / "in.jsonl.gz", tmp_path / "out.jsonl"
    with gzip.open(inp, "wt") as fh:
        for r in ROWS:
            fh.write(json.dumps(r) + "\n")
    assert score(tiny_model_dir, inp, out) == 0
    full = read(out)
    # simulate an interrupted run: keep 2 complete rows + half of the third
    lines = open(out).read().splitlines(keepends=True)
    with open(out, "w") as fh:
        fh.write("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    assert score(tiny_model_dir, inp, out) == 0
    again = read(out)
    assert [r["line"] for r in again] == [1, 2, 3, 4]
    assert again == full  # identical results, nothing duplicated
    # a resume with other settings is refused, the file is untouched
    before = open(out).read()
    assert main(["-q", "score", "--input", str(inp), "--output", str(out), "--model", str(tiny_model_dir),
                 "--templates", "flr-helpfulness", "--engine", "reference"]) == 2
    assert open(out).read() == before


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "in.jsonl:3: malformed JSON"),
        (json.dumps({"context": [{"role": "user", "content": "hi"}]}), "in.jsonl:3: field 'response': missing"),
        (json.dumps({"context": "hi", "response": ""}), "in.jsonl:3: field 'response': is empty"),
        (json.dumps({"context": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "response": "c"}),
         "in.jsonl:3: field 'context': must end with a user turn"),
        (json.dumps({"text": "hi"}), "in.jsonl:3: row needs"),
    ],
)
def test_bad_rows_name_file_line_field(tmp_path, tiny_model_dir, capsys, bad, message):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_rows(inp, ROWS[:2], [bad])
    assert score(tiny_model_dir, inp, out) == 2
    assert message in capsys.readouterr().err


def test_non_utf8_and_skip_mode(tmp_path, tiny_model_dir, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_rows(inp, ROWS[:1])
    with open(inp, "ab") as fh:
        fh.write(b'{"context": "caf\xe9", "response": "x"}\n')
    assert score(tiny_model_dir, inp, out) == 2
    assert "in.jsonl:2: not valid UTF-8" in capsys.readouterr().err
    inp2 = tmp_path / "in2.jsonl"
    write_rows(inp2, [ROWS[0], {"context": "hi", "response": " "}, ROWS[1]])
    assert score(tiny_model_dir, inp2, out, "--on-error", "skip", "--overwrite") == 0
    assert [r["line"] for r in read(out)] == [1, 3]
    err = [json.loads(x) for x in open(str(out) + ".errors.jsonl")]
    assert err[0]["line"] == 2 and "field 'response'" in err[0]["error"]


def test_bad_rows_after_good_ones_keep_written_results(tmp_path, tiny_model_dir):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_rows(inp, ROWS[:2] + [{"context": "x" * 5, "response": "y"}])
    assert score(tiny_model_dir, inp, out) == 0
    n = len(read(out))
    write_rows(inp, ROWS[:2] + [{"context": "x" * 5, "response": "y"}, {"context": "z", "response": ""}])
    assert score(tiny_model_dir, inp, out) == 2  # validation fails before any compute ...
    assert len(read(out)) == n  # ... and nothing written is lost


def test_unknown_templates_and_missing_input(tmp_path, tiny_model_dir, capsys):
    inp = tmp_path / "in.jsonl"
    write_rows(inp, ROWS[:1])
    assert main(["score", "--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--templates", "nope"]) == 2
    assert "unknown template set 'nope'" in capsys.readouterr().err
    assert main(["score", "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_env_lists_backends(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "cpp (flr_engine._C)" in out and "triton" in out


def test_model_fetch_without_wheel_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLR_ENGINE_CACHE", str(tmp_path))
    monkeypatch.setenv("FLR_ENGINE_DEFAULT_GGUF", str(tmp_path / "nope.gguf"))
    assert main(["model", "fetch"]) == 2
    assert "FLR_ENGINE_DEFAULT_GGUF" in capsys.readouterr().err


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    assert "examples:" in capsys.readouterr().out


def test_quiet_silences_library_progress_bars(tmp_path, tiny_model_dir):
    """`flr -q` prints nothing on success, not even transformers' "Loading weights" bar."""
    import os
    import subprocess
    import sys

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_rows(inp, ROWS[:1])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    res = subprocess.run(
        [sys.executable, "-m", "flr_engine.cli", "-q", "score", "--input", str(inp), "--output", str(out),
         "--model", str(tiny_model_dir), "--templates", "flr-mixed", "--engine", "reference"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr == "" and res.stdout == ""
    assert len(read(out)) == 1


def test_second_writer_on_the_same_output_is_refused(tmp_path, tiny_model_dir, capsys):
    """Two jobs on one output would append the same lines twice: the second is refused with
    a clear error while the first holds the file, and may go on once it is closed."""
    from flr_engine.io import OutputBusyError, ResumableWriter

    out = tmp_path / "out.jsonl"
    with ResumableWriter(str(out), {"a": 1}) as first:
        first.write([{"line": 1}])
        with pytest.raises(OutputBusyError, match="being written by another process"):
            ResumableWriter(str(out), {"a": 1})
        inp = tmp_path / "in.jsonl"
        write_rows(inp, ROWS[:1])
        assert score(tiny_model_dir, inp, out) == 2
        assert "out.jsonl is being written by another process" in capsys.readouterr().err
    assert read(out) == [{"line": 1}]  # the refused attempts changed nothing
    with ResumableWriter(str(out), {"a": 1}) as again:
        assert again.done == {1}


def test_errors_share_one_base_class():
    from flr_engine.chat import ContextTooLongError, InputError
    from flr_engine.errors import ConfigError, FLRError
    from flr_engine.evaluation.data import EvalDataError
    from flr_engine.io import OutputBusyError, RowError
    from flr_engine.models import ModelLoadError
    from flr_engine.templates import TemplateError

    for cls in (InputError, ContextTooLongError, RowError, ModelLoadError, TemplateError,
                EvalDataError, OutputBusyError, ConfigError):  # fmt: skip
        assert issubclass(cls, FLRError), cls
    assert issubclass(InputError, ValueError) and issubclass(ModelLoadError, RuntimeError)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["mine", "--prompts", "{inp}", "--out", "{tmp}/o.jsonl", "--num-samples", "1"],
         "num_samples must be >= 2"),
        (["dpo", "--pairs", "{tmp}/none.jsonl", "--output_dir", "{tmp}/run"], "does not exist"),
        (["score", "--input", "{inp}", "--output", "{tmp}/o.jsonl", "--chat-template", "{tmp}/t.jinja"],
         "t.jinja: --chat-template file does not exist"),
        (["score", "--input", "{inp}", "--output", "{tmp}/o.jsonl", "--mode", "official", "--reduction", "sum"],
         "RewardConfig: mode='official'"),
    ],
)  # fmt: skip
def test_project_errors_exit_2_with_the_message(tmp_path, tiny_model_dir, capsys, argv, message):
    inp = tmp_path / "in.jsonl"
    write_rows(inp, ROWS[:1])
    argv = [a.format(inp=inp, tmp=tmp_path) for a in argv]
    assert main(["-q", *argv, "--model" if argv[0] == "score" else "--policy", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_dpo_bad_pair_row_names_file_line_field(tmp_path, tiny_model_dir, capsys):
    pairs = tmp_path / "pairs.jsonl"
    good = {"context": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Go away."}
    write_rows(pairs, [good, {**good, "chosen": "ok", "rejected": "ok too"}])
    # a chat template that drops the content: the reply cannot be placed in row 1
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}{% endfor %}")
    rc = main(["-q", "dpo", "--pairs", str(pairs), "--output_dir", str(tmp_path / "run"), "--policy",
               str(tiny_model_dir), "--chat-template", str(template), "--max-steps", "1"])  # fmt: skip
    assert rc == 2
    assert f"{pairs}:1: field 'chosen': the chat template changed the reply text" in capsys.readouterr().err


def test_other_exceptions_keep_their_traceback(monkeypatch):
    """A ValueError that is not the project's own is a bug: main does not swallow it."""
    import flr_engine.cli.env as env_cli

    def bug(args):
        raise ValueError("internal bug")

    monkeypatch.setattr(env_cli, "cmd_env", bug)
    with pytest.raises(ValueError, match="internal bug"):
        main(["env"])
