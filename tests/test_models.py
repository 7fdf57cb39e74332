"""Model loading: local folders, the default model, GGUF files."""

from __future__ import annotations

import pytest
import torch

from flr_engine.models import ModelLoadError, load, resolve


def test_load_local_folder(tiny_model_dir):
    lm = load(str(tiny_model_dir))
    assert lm.model.training is False and lm.tokenizer.chat_template
    assert next(lm.model.parameters()).dtype == torch.float32
    lm16 = load(str(tiny_model_dir), dtype="bfloat16", chat_template="{{ messages }}")
    assert next(lm16.model.parameters()).dtype == torch.bfloat16
    assert lm16.tokenizer.chat_template == "{{ messages }}"


def test_bad_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve(str(tmp_path / "x.gguf"))
    with pytest.raises(ModelLoadError, match="without config.json"):
        resolve(str(tmp_path))


@pytest.mark.slow
def test_default_model_and_gguf_path(default_model_dir, tmp_path, monkeypatch):
    """The default model is SmolLM2-135M-Instruct; a .gguf path converts to the same weights."""
    lm = load("default")
    cfg = lm.model.config
    assert cfg.model_type == "llama" and cfg.hidden_size == 576 and cfg.num_hidden_layers == 30
    assert "<|im_start|>" in lm.tokenizer.chat_template
    from flr_engine.models import _download_default_gguf

    monkeypatch.setenv("FLR_ENGINE_CACHE", str(tmp_path))
    gguf = _download_default_gguf(tmp_path / "dl")
    other = load(str(gguf))
    for (k, a), (_, b) in zip(lm.model.state_dict().items(), other.model.state_dict().items()):
        assert torch.equal(a, b), k
