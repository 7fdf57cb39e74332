"""Benchmark: fused gathered log-prob, full-logits reference vs chunked torch (CPU, fp32).

Shape: N=2048 scored positions, SmolLM2-135M's head (H=576, V=49152).

    pytest benches/bench_fused_logprob.py --benchmark-enable

Time comes from pytest-benchmark. Peak memory cannot be seen by tracemalloc (torch allocates
outside Python), so each impl runs once in a fresh subprocess and reports its peak RSS over
the RSS with the inputs already in memory (Linux: VmHWM after resetting it through
/proc/self/clear_refs; elsewhere the growth of ``ru_maxrss``): the op's working memory; the same subprocess then times two more runs in CPU seconds
(``time.process_time``, steadier than wall time on a shared machine). ``extra_info`` holds
the time, the peak, the CPU seconds, the (N, V) fp32 logits size and the reference/chunked
ratios (the wall-time ratio once both benchmarks have run in one session).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from flr_engine.ops.fused_logprob import flr_gathered_logprob, gathered_logprob_reference

N, H, V = 2048, 576, 49152
LOGITS_MIB = N * V * 4 / 2**20  # one fp32 (N, V) logits tensor

_MEM_SCRIPT = r"""
import json, resource, sys, time
import torch
from flr_engine.ops.fused_logprob import flr_gathered_logprob, gathered_logprob_reference
n, h, v, impl = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
g = torch.Generator().manual_seed(0)
hidden = torch.randn(n, h, generator=g)
weight = torch.randn(v, h, generator=g).mul_(0.05)  # in place: no temporary raises the peak
targets = torch.randint(0, v, (n,), generator=g)
flr_gathered_logprob(hidden[:8], weight[:512], targets[:8] % 512, impl="torch")  # warm libs
def run():
    if impl == "reference":
        return gathered_logprob_reference(hidden, weight, targets)
    return flr_gathered_logprob(hidden, weight, targets, impl=impl)
def status_kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))
try:  # Linux: reset the peak (VmHWM) to the current RSS, so setup temporaries do not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS")
    out = run()
    after = status_kib("VmHWM")
except OSError:  # elsewhere: growth of the lifetime peak (a lower bound of the op's peak)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = run()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cpu = []
for _ in range(2):  # CPU seconds: steadier than wall time on a shared machine
    c0 = time.process_time()
    run()
    cpu.append(time.process_time() - c0)
print(json.dumps({"peak_delta_mib": (after - before) / 1024, "cpu_s": min(cpu),
                  "checksum": float(out.sum())}))
"""

_results: dict[str, dict] = {}


def _isolated_run(impl: str) -> dict:
    """{"peak_delta_mib", "cpu_s"} of one impl, measured in a fresh subprocess."""
    res = subprocess.run(
        [sys.executable, "-c", _MEM_SCRIPT, str(N), str(H), str(V), impl],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    hidden = torch.randn(N, H)  # (N, H)
    weight = torch.randn(V, H) * 0.05  # (V, H)
    targets = torch.randint(0, V, (N,))  # (N,)
    return hidden, weight, targets


@pytest.fixture(scope="module")
def isolated():
    return {impl: _isolated_run(impl) for impl in ("reference", "torch")}


def _record(benchmark, name: str, isolated: dict) -> None:
    stats = getattr(benchmark, "stats", None)
    mean_s = stats.stats.mean if stats is not None else None
    _results[name] = {"mean_s": mean_s}
    info = benchmark.extra_info
    info.update(
        shape=f"N={N} H={H} V={V} fp32 cpu",
        threads=torch.get_num_threads(),
        logits_fp32_mib=round(LOGITS_MIB, 1),
        peak_rss_delta_mib=round(isolated[name]["peak_delta_mib"], 1),
        mem_ratio_reference_over_chunked=round(
            isolated["reference"]["peak_delta_mib"] / max(isolated["torch"]["peak_delta_mib"], 1.0),
            2,
        ),
        cpu_s=round(isolated[name]["cpu_s"], 3),
        cpu_ratio_reference_over_chunked=round(
            isolated["reference"]["cpu_s"] / isolated["torch"]["cpu_s"], 2
        ),
    )
    if mean_s is not None:
        info["mean_s"] = round(mean_s, 4)
    ref, chunked = _results.get("reference", {}), _results.get("torch", {})
    if ref.get("mean_s") and chunked.get("mean_s"):
        info["time_ratio_reference_over_chunked"] = round(ref["mean_s"] / chunked["mean_s"], 2)


def test_bench_reference(benchmark, inputs, isolated):
    hidden, weight, targets = inputs
    out = benchmark.pedantic(
        gathered_logprob_reference, args=(hidden, weight, targets), rounds=3, warmup_rounds=1
    )
    assert out.shape == (N,)
    _record(benchmark, "reference", isolated)


def test_bench_torch_chunked(benchmark, inputs, isolated):
    hidden, weight, targets = inputs
    out = benchmark.pedantic(
        lambda: flr_gathered_logprob(hidden, weight, targets, impl="torch"),
        rounds=3,
        warmup_rounds=1,
    )
    assert out.shape == (N,)
    _record(benchmark, "torch", isolated)
    ref = gathered_logprob_reference(hidden, weight, targets)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def test_bench_matmul_floor(benchmark, inputs):
    """One full (N, H) @ (H, V) matmul: the floor both impls are measured against."""
    hidden, weight, _ = inputs
    benchmark.pedantic(torch.matmul, args=(hidden, weight.T), rounds=3, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["mean_s"] = round(stats.stats.mean, 4)
