"""Fault injection: kill -9 at random points, then resume; a full disk mid-write.

Each killed job is a forked child of this (pre-imported) process running ``main(argv)``,
killed with SIGKILL after a seeded random delay within the job's measured duration; the same
command is then run to completion and its output compared with an uninterrupted run's.
Scoring uses the reference backend here, whose per-row numbers do not depend on which rows
share a batch, so "identical" can mean byte-identical.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import time

import pytest
import torch
from test_cli import ROWS, write_rows

from flr_engine.cli import main

SEEDS = range(20)
pytestmark = pytest.mark.slow


def child(argv: list[str]) -> int:
    """Run ``main(argv)`` in a forked child; return its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            code = main(argv)
        finally:
            os._exit(code or 0)
    return pid


def run(argv: list[str]) -> tuple[int, float]:
    t0 = time.time()
    _, status = os.waitpid(child(argv), 0)
    return os.waitstatus_to_exitcode(status), time.time() - t0


def killed(argv: list[str], delay: float) -> bool:
    """Start the job, SIGKILL it after ``delay`` s; True if it was still running."""
    pid = child(argv)
    time.sleep(delay)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status)


def files(folder, names):
    return {n: (folder / n).read_bytes() for n in names}


def check_faults(tmp_path, argv_for, outputs, compare=None):
    """Run once whole (the expected result), then for every seed: kill, resume, compare."""
    ref = tmp_path / "ref"
    code, took = run(argv_for(ref))
    assert code == 0
    expected = files(ref, outputs)
    hits = 0
    for seed in SEEDS:
        out = tmp_path / f"s{seed}"
        delay = random.Random(seed).uniform(0.02, took)
        hits += killed(argv_for(out), delay)
        code, _ = run(argv_for(out))
        assert code == 0, f"seed {seed}: resume failed"
        got = files(out, outputs)
        if compare is None:
            assert got == expected, f"seed {seed} (killed after {delay:.2f}s)"
        else:
            compare(ref, out, seed)
    assert hits >= len(SEEDS) // 2, "most kills should land mid-run"


def test_score_killed_anywhere_resumes_to_the_same_bytes(tmp_path, tiny_model_dir):
    torch.set_num_threads(1)
    inp = tmp_path / "in.jsonl"
    write_rows(inp, [dict(r, id=f"{i}-{j}") for j in range(4) for i, r in enumerate(ROWS)])

    def argv(folder):
        folder.mkdir(exist_ok=True)
        return ["-q", "score", "--input", str(inp), "--output", str(folder / "o.jsonl"),
                "--model", str(tiny_model_dir), "--templates", "flr-mixed",
                "--engine", "reference", "--batch-size", "2"]  # fmt: skip

    check_faults(tmp_path, argv, ["o.jsonl"])


def test_mine_killed_anywhere_resumes_to_the_same_bytes(tmp_path, tiny_model_dir):
    torch.set_num_threads(1)
    prompts = tmp_path / "p.jsonl"
    write_rows(prompts, [{"prompt": f"Question {i}: what is {i} + {i}?"} for i in range(8)])

    def argv(folder):
        folder.mkdir(exist_ok=True)
        return ["-q", "mine", "--policy", str(tiny_model_dir), "--prompts", str(prompts),
                "--out", str(folder / "pairs.jsonl"), "--num-samples", "4",
                "--max-new-tokens", "8", "--templates", "flr-mixed", "--engine", "reference",
                "--batch-prompts", "2"]  # fmt: skip

    check_faults(tmp_path, argv, ["pairs.jsonl", "pairs.jsonl.skipped.jsonl"])


def test_dpo_killed_anywhere_resumes_to_the_same_parameters(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    pairs = tmp_path / "pairs.jsonl"
    write_rows(pairs, [
        {"context": [{"role": "user", "content": f"Say {w}."}], "chosen": f"{w}.",
         "rejected": "I like turtles."} for w in ("yes", "no", "hello", "thanks", "bye", "ok")
    ])  # fmt: skip

    def argv(folder):
        return ["-q", "dpo", "--policy", str(tiny_model_dir), "--pairs", str(pairs),
                "--output_dir", str(folder), "--learning_rate", "1e-3", "--num_train_epochs", "2",
                "--per_device_train_batch_size", "2", "--save_steps", "1", "--logging_steps", "1",
                "--report_to", "none", "--resume_from_checkpoint", "last"]  # fmt: skip

    def compare(ref, out, seed):
        a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"seed {seed}: {k}"
        losses = lambda f: [h["loss"] for h in json.load(open(f))["log_history"] if "loss" in h]  # noqa: E731
        last = "checkpoint-6/trainer_state.json"
        assert losses(ref / last) == losses(out / last), f"seed {seed}"

    check_faults(tmp_path, argv, [], compare)


def test_disk_full_mid_write_keeps_the_output_readable_and_resumable(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    """ENOSPC on the 3rd row: the error names the file, earlier rows stay valid JSON lines,
    and the same command, rerun, gives the uninterrupted result."""
    from flr_engine import io

    inp = tmp_path / "in.jsonl"
    write_rows(inp, ROWS)
    argv = lambda out: ["-q", "score", "--input", str(inp), "--output", str(out),  # noqa: E731
                        "--model", str(tiny_model_dir), "--templates", "flr-mixed",
                        "--engine", "reference", "--batch-size", "1"]  # fmt: skip
    assert main(argv(tmp_path / "ref.jsonl")) == 0
    out = tmp_path / "out.jsonl"
    real_open, calls = open, {"n": 0}

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def write(self, text):
            calls["n"] += 1
            if calls["n"] == 3:
                self.fh.write(text[: len(text) // 2])  # a torn line reaches the disk
                self.fh.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(text)

        def __getattr__(self, name):
            return getattr(self.fh, name)

    def fake_open(path, mode="r", *a, **kw):
        fh = real_open(path, mode, *a, **kw)
        return Full(fh) if str(path) == str(out) and mode == "a" else fh

    monkeypatch.setattr(io, "open", fake_open, raising=False)
    assert main(argv(out)) == 2
    err = capsys.readouterr().err
    assert f"writing {out} failed (No space left on device)" in err
    lines = out.read_bytes().splitlines(keepends=True)
    assert [json.loads(x)["line"] for x in lines[:2]] == [1, 2] and not lines[2].endswith(b"\n")
    monkeypatch.undo()
    assert main(argv(out)) == 0
    assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()
