"""The package works wherever it is imported from, the repository root included.

The root's ``kernels/`` (our Triton sources) once shadowed Hugging Face's ``kernels`` package,
a transformers dependency, whenever the root was on ``sys.path`` (``python -m``, ``python -c``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_in_root(args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout
    )


def test_root_kernels_folder_is_not_a_regular_package():
    assert (ROOT / "kernels" / "fused_logprob.py").exists()
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_installed_kernels_package_wins_from_the_root():
    pytest.importorskip("kernels")  # Hugging Face's, pulled in by transformers >= 5.25
    res = run_in_root(["-c", "import kernels; print(kernels.__file__)"])
    assert res.returncode == 0, res.stderr
    assert not res.stdout.strip().startswith(str(ROOT / "kernels")), res.stdout


def test_api_and_cli_from_the_repository_root(tiny_model_dir, tmp_path):
    code = (
        "import transformers.integrations.hub_kernels\n"  # imports HF kernels when present
        "from flr_engine import FLRScorer\n"
        "import flr_engine.kernels.fused_logprob, flr_engine.kernels.tree_attention\n"
        f"s = FLRScorer.from_pretrained({str(tiny_model_dir)!r}, templates='flr-mixed')\n"
        "r = s.score(['What is 2+2?'], ['4'])\n"
        "print(round(r[0].reward, 6))\n"
    )
    res = run_in_root(["-c", code])
    assert res.returncode == 0, res.stderr
    float(res.stdout.strip().splitlines()[-1])
    res = run_in_root(["-m", "flr_engine.cli", "env"])
    assert res.returncode == 0, res.stderr
    assert "flr-engine" in res.stdout
