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


def test_processes_fetching_at_once_convert_the_default_model_once(tmp_path, monkeypatch):
    """Ranks of a launcher on a fresh machine all call fetch_default: one converts (the
    others wait on the lock file), then they all find it cached. Separate open() calls
    take separate flocks, so threads stand in for processes here."""
    import threading
    import time

    from flr_engine import models

    monkeypatch.setenv("FLR_ENGINE_CACHE", str(tmp_path))
    calls = []

    def convert(folder):
        calls.append(folder)
        time.sleep(0.3)  # long enough for the other fetches to arrive while this one works
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"")
        return folder

    monkeypatch.setattr(models, "_fetch_default", convert)
    got = []
    threads = [threading.Thread(target=lambda: got.append(models.fetch_default())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 3 and len(set(got)) == 1
