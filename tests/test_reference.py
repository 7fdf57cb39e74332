"""The reference scorer against independent computations.

* likelihood: Hugging Face's own loss with labels only on the follow-up tokens is
  ``-mean lp`` (it shifts labels internally), a different code path from ours.
* official: a line-by-line transcription of the paper's released scorer.
"""

from __future__ import annotations

import pytest
import torch
from tiny import make_model, make_tokenizer

from flr_engine.chat import ChatRenderer
from flr_engine.reference import ReferenceBackend
from flr_engine.scorer import sequence_scores
from flr_engine.templates import load_templates

CONV = [{"role": "user", "content": "How do I bake bread?"}]
REPLY = "Mix flour, water, yeast and salt, knead, let it rise, then bake."


@pytest.mark.parametrize("family, arch", [("chatml", "llama"), ("llama3", "qwen2"), ("gemma", "gemma2")])
def test_likelihood_matches_hf_loss(family, arch):
    tok = make_tokenizer(family)
    model = make_model(arch, vocab_size=len(tok))
    followups = load_templates("flr-mixed").unique_texts[:6]
    seqs = ChatRenderer(tok).build(CONV, REPLY, followups)
    ref = ReferenceBackend(model)
    means = sequence_scores(ref, seqs, "likelihood", "mean")
    sums = sequence_scores(ref, seqs, "likelihood", "sum")
    raw = ref.logprob_sums(seqs)  # the backend protocol: raw sums and token counts
    assert raw.sums == pytest.approx(sums, abs=0) and raw.counts == [len(s.targets) for s in seqs]
    for s, m, sm in zip(seqs, means, sums):
        ids = torch.tensor([s.ids])
        labels = torch.full_like(ids, -100)
        labels[0, s.targets] = ids[0, s.targets]
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss.item()
        assert m == pytest.approx(-loss, abs=1e-5)
        assert sm == pytest.approx(-loss * len(s.targets), abs=1e-4)


def test_official_matches_released_code_transcription():
    tok = make_tokenizer("llama3")
    model = make_model("llama", vocab_size=len(tok))
    followups = load_templates("flr-helpfulness").dimensions[1].positive[:4]
    seqs = ChatRenderer(tok).build(CONV, REPLY, list(followups))
    got = sequence_scores(ReferenceBackend(model), seqs, "official")
    for f, g in zip(followups, got):
        # --- the released scorer, transcribed ---
        feedback_ids = tok(f, return_tensors="pt").input_ids
        feedback_len = feedback_ids.shape[1]
        messages = CONV + [{"role": "assistant", "content": REPLY}, {"role": "user", "content": f}]
        text = tok.apply_chat_template(messages, tokenize=False)
        label_ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(input_ids=label_ids).logits[0, -feedback_len:, :]
        expected = logits[0, feedback_ids[0]].mean().item()
        # ---
        assert g == pytest.approx(expected, abs=1e-5)
