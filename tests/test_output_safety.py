"""Outputs never destroy a file the tool did not create, and resume only the same computation.

Each case runs `flr score` through main(argv) on the tiny model and checks the exit code,
the message, and that every existing file is byte-for-byte what it was.
"""

from __future__ import annotations

import json
import os

import pytest
from test_cli import ROWS, read, score, write_rows

from flr_engine.io import OutputBusyError, ResumableWriter


def snapshot(*paths):
    return {str(p): open(p, "rb").read() for p in paths if os.path.exists(p)}


@pytest.fixture
def job(tmp_path, tiny_model_dir):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_rows(inp, ROWS[:2])
    return inp, out


def test_output_that_is_the_input_is_refused(job, tiny_model_dir, capsys):
    inp, _ = job
    before = snapshot(inp)
    assert score(tiny_model_dir, inp, inp) == 2
    assert "is the input file" in capsys.readouterr().err
    assert snapshot(inp) == before


def test_output_that_links_to_the_input_is_refused(job, tiny_model_dir, tmp_path, capsys):
    inp, _ = job
    link = tmp_path / "link.jsonl"
    link.symlink_to(inp)
    before = snapshot(inp)
    assert score(tiny_model_dir, inp, link) == 2
    assert "is the input file" in capsys.readouterr().err
    assert snapshot(inp) == before and link.is_symlink()


def test_output_that_is_a_hard_link_is_refused_even_with_overwrite(job, tiny_model_dir, tmp_path, capsys):
    """A hard link is the input under another name: the resolved paths differ, the file
    does not. Also an output another job writes under a second (hard-linked) name."""
    inp, out = job
    alias = tmp_path / "alias.jsonl"
    os.link(inp, alias)
    before = snapshot(inp)
    assert score(tiny_model_dir, inp, alias, "--overwrite") == 2
    assert "is the input file" in capsys.readouterr().err
    assert snapshot(inp) == before
    other = tmp_path / "other.jsonl"  # an earlier output, now also reachable as other.jsonl
    assert score(tiny_model_dir, inp, out) == 0
    os.link(out, other)
    before = snapshot(out)
    for target in (out, other):
        assert score(tiny_model_dir, inp, target, "--overwrite") == 2
        assert "hard links" in capsys.readouterr().err
    assert snapshot(out) == before


def test_unwritable_output_paths_and_folder_input_are_messages(job, tiny_model_dir, tmp_path, capsys):
    inp, _ = job
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for out in (a_file / "out.jsonl", tmp_path):  # under a regular file; a folder
        assert score(tiny_model_dir, inp, out) == 2
        assert "cannot write --output" in capsys.readouterr().err
    if os.path.isdir("/proc/self"):  # a file system that refuses new files
        assert score(tiny_model_dir, inp, "/proc/out.jsonl") == 2
        assert "cannot write --output" in capsys.readouterr().err
    assert score(tiny_model_dir, tmp_path, tmp_path / "o.jsonl") == 2
    assert "is a folder, not a JSONL file" in capsys.readouterr().err
    assert a_file.read_text() == "x"


def test_eval_never_writes_into_a_folder_it_did_not_make(tmp_path, tiny_model_dir, capsys):
    from flr_engine.cli import main

    pairs = tmp_path / "pairs.jsonl"
    write_rows(pairs, [{"context": q, "chosen": "An answer.", "rejected": "No."} for q in ("Hi?", "Why?")])
    ev = ["-q", "eval", str(pairs), "--model", str(tiny_model_dir), "--templates", "flr-mixed",
          "--engine", "reference", "--bootstrap", "20", "--no-figure", "--out"]  # fmt: skip
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.json").write_text('{"mine": true}')
    for extra in ([], ["--overwrite"]):
        assert main([*ev, str(mine), *extra]) == 2
        assert "holds no flr eval run" in capsys.readouterr().err
    assert os.listdir(mine) == ["results.json"] and (mine / "results.json").read_text() == '{"mine": true}'
    assert main([*ev, str(pairs)]) == 2  # --out naming a file
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main([*ev, str(tmp_path / "run")]) == 0
    assert main([*ev, str(tmp_path / "run")]) == 0  # its own folder: resumed
    assert main([*ev, str(tmp_path / "run"), "--overwrite"]) == 0


def test_existing_foreign_file_is_not_replaced_without_overwrite(job, tiny_model_dir, tmp_path, capsys):
    inp, _ = job
    mine = tmp_path / "my-notes.jsonl"
    write_rows(mine, [{"note": "precious"}, {"note": "also precious"}])
    before = snapshot(mine)
    assert score(tiny_model_dir, inp, mine) == 2
    err = capsys.readouterr().err
    assert "not an output this tool can resume" in err and "--overwrite" in err
    assert snapshot(mine) == before
    assert score(tiny_model_dir, inp, mine, "--overwrite") == 0  # the user said so
    assert [r["line"] for r in read(mine)] == [1, 2]


def test_missing_metadata_next_to_an_output_is_an_error_not_a_fresh_start(job, tiny_model_dir, capsys):
    inp, out = job
    assert score(tiny_model_dir, inp, out) == 0
    os.remove(str(out) + ".meta.json")
    before = snapshot(out)
    assert score(tiny_model_dir, inp, out, "--mode", "official") == 2
    assert "metadata" in capsys.readouterr().err and snapshot(out) == before


def test_unreadable_metadata_is_an_error(job, tiny_model_dir, capsys):
    inp, out = job
    assert score(tiny_model_dir, inp, out) == 0
    with open(str(out) + ".meta.json", "w") as fh:
        fh.write("{torn")
    before = snapshot(out)
    assert score(tiny_model_dir, inp, out) == 2
    assert "unreadable" in capsys.readouterr().err and snapshot(out) == before


def test_edited_input_is_not_resumed_into_old_rows(job, tiny_model_dir, capsys):
    inp, out = job
    assert score(tiny_model_dir, inp, out) == 0
    write_rows(inp, ROWS[:1] + ROWS[2:3])  # same path, other content
    before = snapshot(out, str(out) + ".meta.json")
    assert score(tiny_model_dir, inp, out) == 2
    err = capsys.readouterr().err
    assert f"{inp} changed since" in err
    assert snapshot(out, str(out) + ".meta.json") == before


def test_edited_templates_file_is_not_resumed(job, tiny_model_dir, tmp_path, capsys):
    inp, out = job
    tpl = tmp_path / "t.json"
    dims = {"d": {"positive": ["Thanks!"], "negative": ["No."]}}
    tpl.write_text(json.dumps({"name": "t", "dimensions": dims}))
    assert score(tiny_model_dir, inp, out, "--templates", str(tpl)) == 0
    dims["d"]["positive"] = ["Great, thanks!"]
    tpl.write_text(json.dumps({"name": "t", "dimensions": dims}))
    assert score(tiny_model_dir, inp, out, "--templates", str(tpl)) == 2
    assert f"{tpl} changed since" in capsys.readouterr().err


def test_changed_model_weights_are_not_resumed(job, tiny_model_dir, tmp_path, capsys):
    import shutil

    inp, out = job
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    assert score(model, inp, out) == 0
    cfg = json.loads((model / "config.json").read_text())
    cfg["rms_norm_eps"] = cfg.get("rms_norm_eps", 1e-6) * 2
    (model / "config.json").write_text(json.dumps(cfg))
    assert score(model, inp, out) == 2
    assert "config.json changed since" in capsys.readouterr().err


def test_other_settings_are_named(job, tiny_model_dir, capsys):
    inp, out = job
    assert score(tiny_model_dir, inp, out) == 0
    assert score(tiny_model_dir, inp, out, "--reduction", "sum") == 2
    assert "reduction: 'mean' -> 'sum'" in capsys.readouterr().err


def test_unchanged_resume_still_works(job, tiny_model_dir):
    inp, out = job
    assert score(tiny_model_dir, inp, out) == 0
    full = open(out, "rb").read()
    lines = full.splitlines(keepends=True)
    with open(out, "wb") as fh:
        fh.write(lines[0])
    assert score(tiny_model_dir, inp, out) == 0
    assert open(out, "rb").read() == full


def test_lock_is_keyed_on_the_resolved_path(tmp_path):
    out = tmp_path / "out.jsonl"
    link = tmp_path / "alias.jsonl"
    link.symlink_to(out)
    with ResumableWriter(str(out), {"a": 1}):
        with pytest.raises(OutputBusyError):
            ResumableWriter(str(link), {"a": 1})


def test_dpo_folder_is_held_by_one_run(tmp_path, monkeypatch):
    """Two `flr dpo` runs on one folder would write the same checkpoints: the second is
    refused while the first holds the folder (here: its lock, taken by hand)."""
    from types import SimpleNamespace

    from flr_engine import dpo
    from flr_engine.io import lock_exclusive

    out = tmp_path / "run"
    out.mkdir()
    held = lock_exclusive(os.path.join(os.path.realpath(out), "run"))
    args = SimpleNamespace(output_dir=str(tmp_path / "." / "run"))
    try:
        with pytest.raises(OutputBusyError):
            dpo.run_dpo(None, None, [], args, resume="last")
    finally:
        held.close()

    class Reached(Exception):
        pass

    def trainer(*a, **kw):
        raise Reached

    monkeypatch.setattr(dpo, "pairs_dataset", lambda *a: None)
    monkeypatch.setattr(dpo, "_trainer_class", lambda: trainer)
    with pytest.raises(Reached):  # free again once the first run let go
        dpo.run_dpo(None, None, [], args, resume="last")


def test_dpo_never_trains_into_a_folder_it_did_not_make(tmp_path, monkeypatch):
    """A non-empty folder without a DPO run (a user's project, say) is refused before any
    file is written there, --overwrite or not; a path under a regular file is a message."""
    from types import SimpleNamespace

    from flr_engine import dpo
    from flr_engine.io import OutputConflictError

    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": true}')
    for overwrite in (False, True):
        with pytest.raises(OutputConflictError, match="holds no flr dpo run"):
            dpo.run_dpo(None, None, [], SimpleNamespace(output_dir=str(mine)), overwrite=overwrite)
    assert os.listdir(mine) == ["config.json"] and (mine / "config.json").read_text() == '{"mine": true}'
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutputConflictError, match="cannot write --output_dir"):
        dpo.run_dpo(None, None, [], SimpleNamespace(output_dir=str(tmp_path / "a-file" / "run")))


def test_output_is_checked_before_the_model_loads(job, tiny_model_dir, monkeypatch, capsys):
    """A refused output costs no model load (with a large model, minutes)."""
    from flr_engine.cli import score as score_cmd

    def no_load(args):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(score_cmd, "scorer_from_args", no_load)
    inp, _ = job
    assert score(tiny_model_dir, inp, inp) == 2
    assert "is the input file" in capsys.readouterr().err
