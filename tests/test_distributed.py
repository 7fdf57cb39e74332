"""Data-parallel jobs under a launcher: ranks, sharded resumable outputs, and the real thing
(``torchrun --standalone --nproc-per-node 2``, gloo on the CPU) against one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_cli import write_rows

from flr_engine.cli import main
from flr_engine.distributed import Ranks, ShardedOutput, chunks, shard_paths
from flr_engine.io import OutputConflictError


def test_ranks_from_the_launchers_environment():
    r = Ranks.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (r.rank, r.world, r.local_rank, r.local_world, r.is_main) == (3, 4, 1, 2, False)
    assert r.tag == "[rank 3/4] "
    assert Ranks.from_env({}) == Ranks() and Ranks().tag == "" and Ranks().is_main
    with pytest.raises(ValueError, match="inconsistent"):
        Ranks.from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_each_rank_takes_every_world_th_chunk_and_all_rows_are_covered():
    items = list(range(23))
    parts = chunks(items, 4)
    assert parts[-1] == [20, 21, 22] and sum(parts, []) == items
    taken = [Ranks(r, 3).take(parts) for r in range(3)]
    assert taken[1] == [parts[1], parts[4]]
    assert sorted(x for t in taken for c in t for x in c) == items


def test_device_auto_is_the_local_gpu_or_cpu():
    import torch

    want = "cuda:1" if torch.cuda.is_available() else "cpu"
    assert Ranks(3, 4, 1, 2).device("auto") == want
    assert Ranks(3, 4, 1, 2).device("cuda:0") == "cuda:0"
    assert Ranks().device("auto") == "auto"  # one process: resolved where it always was


class Sequential(Ranks):
    """Ranks run one after the other in this process: barriers and broadcasts are no-ops
    (each rank's view is what it would be once the others reached the barrier)."""

    def barrier(self):
        pass

    def broadcast(self, obj):
        return obj


def rows(lines):
    return [{"line": n, "v": n * n} for n in lines]


def test_shards_are_merged_in_line_order_and_removed(tmp_path):
    out = str(tmp_path / "o.jsonl")
    with ShardedOutput(out, {"k": 1}, Sequential(1, 2)) as w:  # rank 1 first
        w.write(rows([7, 3]))
    assert [os.path.basename(p) for p in shard_paths(out)] == ["o.jsonl.shard-1"]
    with ShardedOutput(out, {"k": 1}, Sequential(0, 2)) as w:  # rank 0 merges on close
        assert w.done == {3, 7}  # the other rank's rows count as done
        w.write(rows([5, 1]))
    assert [json.loads(x)["line"] for x in open(out)] == [1, 3, 5, 7]
    assert shard_paths(out) == [] and not os.path.exists(out + ".shard-1.meta.json")
    with ShardedOutput(out, {"k": 1}, Sequential(0, 3)) as w:  # a resume, another world size
        assert w.done == {1, 3, 5, 7}


def test_a_killed_rank_leaves_its_shard_for_the_rerun(tmp_path):
    out = str(tmp_path / "o.jsonl")
    with pytest.raises(RuntimeError):
        with ShardedOutput(out, {"k": 1}, Sequential(1, 2)) as w:
            w.write(rows([2]))
            raise RuntimeError("killed")
    with open(out + ".shard-1", "a") as fh:
        fh.write('{"line": 4, "v"')  # a torn last write
    with ShardedOutput(out, {"k": 1}, Sequential(1, 2)) as w:
        assert w.done == {2}  # the torn line is dropped, not counted
        w.write(rows([4]))
    with ShardedOutput(out, {"k": 1}, Sequential(0, 2)) as w:
        w.write(rows([0]))
    assert [json.loads(x) for x in open(out)] == rows([0, 2, 4])


def test_rank_zero_checks_the_output_for_everyone(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"mine": 1}\n')  # the user's own file
    with pytest.raises(OutputConflictError, match="not an output this tool can resume"):
        ShardedOutput(str(out), {"k": 1}, Sequential(0, 2))
    assert out.read_text() == '{"mine": 1}\n' and shard_paths(str(out)) == []


def test_on_main_runs_on_rank_zero_only_and_its_error_stops_every_rank():
    class Relay(Sequential):  # rank 1 receives what rank 0 broadcast
        sent = None

        def broadcast(self, obj):
            if self.is_main:
                Relay.sent = obj
            return Relay.sent

    calls = []
    assert Relay(0, 2).on_main(lambda: calls.append(0) or "made") == "made"
    assert Relay(1, 2).on_main(lambda: calls.append(1) or "made") is None
    assert calls == [0]  # rank 1 neither checked nor created anything
    with pytest.raises(OutputConflictError, match="refused"):
        Relay(0, 2).on_main(lambda: (_ for _ in ()).throw(OutputConflictError("refused")))
    with pytest.raises(OutputConflictError, match="refused"):
        Relay(1, 2).on_main(lambda: calls.append(1))
    assert calls == [0]

# --- the real launcher -------------------------------------------------------------------

MANY = [
    {"id": i, "context": [{"role": "user", "content": f"Question number {i}?"}],
     "response": "An answer. " * (1 + i % 4)}
    for i in range(40)
]  # fmt: skip


def torchrun(*argv, nproc=2, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "flr_engine.cli", "-q", *map(str, argv)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHELASTIC_ERROR_FILE="")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, **kw)


def score_args(model, inp, out):
    return ["score", "--input", inp, "--output", out, "--model", model, "--templates", "flr-mixed",
            "--engine", "reference", "--batch-size", "3"]  # fmt: skip


def test_two_ranks_score_exactly_as_one_process(tmp_path, tiny_model_dir):
    inp = tmp_path / "in.jsonl"
    write_rows(inp, MANY[:13])
    assert main(["-q", *map(str, score_args(tiny_model_dir, inp, tmp_path / "one.jsonl"))]) == 0
    res = torchrun(*score_args(tiny_model_dir, inp, tmp_path / "two.jsonl"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert shard_paths(str(tmp_path / "two.jsonl")) == []


def test_two_ranks_evaluate_and_mine_as_one_process(tmp_path, tiny_model_dir):
    pairs = tmp_path / "pairs.jsonl"
    write_rows(pairs, [{"context": r["context"], "chosen": r["response"], "rejected": "No."}
                       for r in MANY[:7]])  # fmt: skip
    ev = ["eval", pairs, "--model", tiny_model_dir, "--templates", "flr-mixed", "--engine",
          "reference", "--batch-size", "2", "--bootstrap", "50", "--no-figure"]  # fmt: skip
    assert main(["-q", *map(str, ev), "--out", str(tmp_path / "e1")]) == 0
    res = torchrun(*ev, "--out", tmp_path / "e2")
    assert res.returncode == 0, res.stderr[-3000:]

    def scored(folder):
        recs = [json.loads(x) for x in open(folder / "sets" / "pairs.rows.jsonl")]
        return [{k: v for k, v in r.items() if k != "seconds"} for r in recs]  # a rank's time

    assert scored(tmp_path / "e2") == scored(tmp_path / "e1") and len(scored(tmp_path / "e1")) == 7
    one, two = (json.load(open(tmp_path / e / "results.json")) for e in ("e1", "e2"))
    assert two["sets"]["pairs"]["methods"] == one["sets"]["pairs"]["methods"]
    assert two["settings"]["ranks"] == 2
    mine = ["mine", "--policy", tiny_model_dir, "--prompts", pairs, "--num-samples", "3",
            "--max-new-tokens", "6", "--batch-prompts", "2", "--templates", "flr-mixed",
            "--engine", "reference"]  # fmt: skip
    assert main(["-q", *map(str, mine), "--out", str(tmp_path / "m1.jsonl")]) == 0
    res = torchrun(*mine, "--out", tmp_path / "m2.jsonl")
    assert res.returncode == 0, res.stderr[-3000:]
    for suffix in ("", ".skipped.jsonl"):
        assert (tmp_path / f"m2.jsonl{suffix}").read_bytes() == (tmp_path / f"m1.jsonl{suffix}").read_bytes()


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the worker with RANK=rank under the torchrun process ``parent``."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(pid)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the rank's pid in /proc")
def test_a_rank_killed_mid_run_resumes_to_the_same_output(tmp_path, tiny_model_dir):
    inp = tmp_path / "in.jsonl"
    write_rows(inp, MANY)
    assert main(["-q", *map(str, score_args(tiny_model_dir, inp, tmp_path / "one.jsonl")), "--batch-size", "1"]) == 0
    out = tmp_path / "two.jsonl"
    argv = [*score_args(tiny_model_dir, inp, out), "--batch-size", "1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "flr_engine.cli", "-q", *map(str, argv)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    shard = tmp_path / "two.jsonl.shard-1"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if shard.exists() and shard.read_text().count("\n") >= 3:
            break
        time.sleep(0.02)
    victim = _rank_pid(proc.pid, 1)
    assert victim is not None and proc.poll() is None, "rank 1 finished before it could be killed"
    os.kill(victim, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun stops the job when a rank dies
    assert not out.exists() or out.read_text().count("\n") < len(MANY)
    res = torchrun(*argv)  # the same command again
    assert res.returncode == 0, res.stderr[-3000:]
    assert out.read_bytes() == (tmp_path / "one.jsonl").read_bytes()


def test_dpo_two_ranks_match_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir):
    """`flr dpo` under torchrun (DDP, gloo) with 2 ranks x 2 pairs per step against one
    process with 4 pairs per step: the same global batches (the sampler's order, cut across
    ranks), DDP averages the ranks' gradients, so the parameters after 3 AdamW steps agree
    to float rounding (and differ from the start)."""
    import torch
    from safetensors.torch import load_file

    pairs = tmp_path / "pairs.jsonl"
    write_rows(pairs, [
        {"context": [{"role": "user", "content": f"Say {w}, please."}], "chosen": f"{w}.",
         "rejected": "I like turtles."}
        for w in ("yes", "no", "hello", "thanks", "bye", "ok", "sure", "fine")
    ])  # fmt: skip
    common = ["dpo", "--policy", tiny_model_dir, "--pairs", pairs, "--learning_rate", "1e-3",
              "--max_steps", "3", "--lr_scheduler_type", "constant", "--report_to", "none",
              "--save_strategy", "no", "--use_cpu", "true"]  # fmt: skip
    one = main(["-q", *map(str, common), "--output_dir", str(tmp_path / "one"),
                "--per_device_train_batch_size", "4"])  # fmt: skip
    assert one == 0
    two = torchrun(*common, "--output_dir", tmp_path / "two", "--per_device_train_batch_size", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count("flr dpo: 3 steps") == 2  # both ranks trained the 3 steps
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    start = load_file(tiny_model_dir / "model.safetensors")
    assert a.keys() == b.keys() == start.keys()
    for k in a:
        assert not torch.equal(a[k], start[k]), k
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-5, msg=k)
