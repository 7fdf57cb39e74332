"""Feedback fine-tuning: the role-swapped rendering, the loss mask, training with TRL + peft,
resuming, loading the tuned judge and scoring with it, and the training-data builder."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from tiny import CHAT_TEMPLATES, make_tokenizer

from flr_engine.chat import ChatRenderer
from flr_engine.chat_formats import (
    ROLE_SWAP_INSTRUCTION,
    RoleSwappedRenderer,
    role_swapped_messages,
)
from flr_engine.feedback import (
    IGNORE,
    PAIR_NEGATIVE,
    PAIR_POSITIVE,
    FeedbackRow,
    FeedbackTuneConfig,
    MixConfig,
    build_feedback_mix,
    encode_feedback,
    train_feedback,
)
from flr_engine.templates import load_templates

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Can you help me write a poem about the sea?"},
    {"role": "assistant", "content": "Sure! What mood?"},
    {"role": "user", "content": "Something calm."},
]
REPLY = "The sea is calm, the turtles sleep."
FOLLOWUPS = load_templates("flr-helpfulness").unique_texts[:12]
ROWS = [
    FeedbackRow([{"role": "user", "content": "What is the capital of France?"}],
                "The capital of France is Paris.", "Thanks, that's exactly what I needed."),
    FeedbackRow([{"role": "user", "content": "What is 2+2?"}], "I like turtles.",
                "That's not what I asked."),
    FeedbackRow(CONV, REPLY, "You are very clear."),
    FeedbackRow([{"role": "user", "content": "How do I bake bread?"}],
                "Mix flour, water, yeast and salt, knead, let it rise, then bake.",
                "I learned a lot from your response."),
]  # fmt: skip


def _rendered_ids(tok, messages) -> list[int]:
    """A plain re-tokenisation of the whole rendered conversation (the reference)."""
    return tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False).input_ids


# ------------------------------------------------------------------ role-swapped rendering


@pytest.mark.parametrize("family", sorted(CHAT_TEMPLATES))
def test_role_swapped_scored_tokens_decode_to_the_followup(family):
    tok = make_tokenizer(family)
    seqs = RoleSwappedRenderer(tok).build(CONV, REPLY, FOLLOWUPS)
    assert len(seqs) == len(FOLLOWUPS)
    for f, s in zip(FOLLOWUPS, seqs):
        assert s.targets == list(range(s.targets[0], s.targets[-1] + 1))  # contiguous
        assert tok.decode([s.ids[n] for n in s.targets]).strip() == f
        assert tok.decode([s.ids[n] for n in s.reply_targets]).strip() == REPLY
        # exactly the paper's four turns: only the last query is kept
        msgs = [
            {"role": "user", "content": ROLE_SWAP_INSTRUCTION},
            {"role": "assistant", "content": "Something calm."},
            {"role": "user", "content": REPLY},
            {"role": "assistant", "content": f},
        ]
        assert role_swapped_messages(CONV, REPLY, f) == msgs
        full = _rendered_ids(tok, msgs)
        assert s.ids == full[: len(s.ids)] and len(s.ids) == max(s.targets[-1], s.logit_pos) + 1


def test_role_swapped_truncation_cuts_the_query_from_its_start():
    tok = make_tokenizer("chatml")
    long_q = [{"role": "user", "content": "Can you help me write a poem about the sea? " * 40}]
    untruncated = RoleSwappedRenderer(tok).build(long_q, REPLY, FOLLOWUPS[:2])
    limit = len(untruncated[0].ids) - 30
    seqs = RoleSwappedRenderer(tok, max_length=limit).build(long_q, REPLY, FOLLOWUPS[:2])
    for f, s in zip(FOLLOWUPS[:2], seqs):
        assert s.truncated == 1 and len(s.ids) <= limit
        assert tok.decode([s.ids[n] for n in s.targets]).strip() == f


def test_role_swapped_scores_match_the_reference_forward(tiny_model_dir):
    """Engine scores in the role-swapped format == one plain forward per rendered sequence."""
    from flr_engine.scorer import FLRScorer

    sc = FLRScorer.from_pretrained(str(tiny_model_dir), format="role-swapped", templates="flr-mixed")
    assert sc.format == "role-swapped"
    res = sc.score([CONV], [REPLY])[0]
    tok, model = sc.tokenizer, sc.model
    for f in sc.templates.unique_texts[:6]:
        ids = _rendered_ids(tok, role_swapped_messages(CONV, REPLY, f))
        prefix = tok(tok.apply_chat_template(role_swapped_messages(CONV, REPLY, f), tokenize=False)
                     .rsplit(f, 1)[0], add_special_tokens=False).input_ids  # fmt: skip
        n_f = len(tok(f, add_special_tokens=False).input_ids)
        assert ids[: len(prefix)] == prefix
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        lp = np.mean([logp[n - 1, ids[n]].item() for n in range(len(prefix), len(prefix) + n_f)])
        assert res.template_logprobs[f] == pytest.approx(lp, abs=1e-4)


# ------------------------------------------------------------------ loss mask


@pytest.mark.parametrize("fmt", ["follow-up", "role-swapped"])
@pytest.mark.parametrize("family", sorted(CHAT_TEMPLATES))
def test_loss_mask_covers_exactly_the_feedback_tokens(family, fmt):
    tok = make_tokenizer(family)
    enc, skipped = encode_feedback(tok, ROWS, fmt)
    assert skipped == 0 and len(enc) == len(ROWS)
    for row, e in zip(ROWS, enc):
        ids, labels = e["input_ids"], e["labels"]
        pos = [n for n, x in enumerate(labels) if x != IGNORE]
        assert pos == list(range(pos[0], len(ids)))  # contiguous, and the sequence ends there
        assert all(labels[n] == ids[n] for n in pos)
        assert tok.decode([ids[n] for n in pos]).strip() == row.feedback
        # the input is a plain tokenisation of the same conversation the scorer renders
        if fmt == "follow-up":
            msgs = row.context + [{"role": "assistant", "content": row.response},
                                  {"role": "user", "content": row.feedback}]  # fmt: skip
            scorer_seq = ChatRenderer(tok).build(row.context, row.response, [row.feedback])[0]
        else:
            msgs = role_swapped_messages(row.context, row.response, row.feedback)
            scorer_seq = RoleSwappedRenderer(tok).build(row.context, row.response, [row.feedback])[0]
        assert ids == _rendered_ids(tok, msgs)[: len(ids)]
        assert scorer_seq.ids == ids and scorer_seq.targets == pos  # trained == scored tokens


def test_rows_that_cannot_fit_are_skipped_and_counted():
    tok = make_tokenizer("chatml")
    long = FeedbackRow([{"role": "user", "content": "Hi"}], "turtles " * 400, "Thanks.")
    enc, skipped = encode_feedback(tok, [ROWS[0], long], "follow-up", max_length=64)
    assert skipped == 1 and len(enc) == 1


# ------------------------------------------------------------------ training


def _masked_loss(model, enc) -> float:
    """Mean -log p over the labelled tokens of all rows (a plain forward per row)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for e in enc:
            ids = torch.tensor([e["input_ids"]])
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            for n, y in enumerate(e["labels"]):
                if y != IGNORE:
                    total -= logp[n - 1, y].item()
                    count += 1
    return total / count


def _run(tiny_model_dir, out, *extra):
    from flr_engine.cli import main

    return main(["-q", "feedback-tune", "--model", str(tiny_model_dir), "--data", str(out.parent / "fb.jsonl"),
                 "--out", str(out), "--batch-size", "2", "--lr", "5e-3", "--logging-steps", "1",
                 "--warmup-ratio", "0", *extra])  # fmt: skip


@pytest.fixture
def fb_file(tmp_path):
    with open(tmp_path / "fb.jsonl", "w") as fh:
        for r in ROWS:
            fh.write(json.dumps({"context": r.context, "response": r.response, "feedback": r.feedback}) + "\n")
    return tmp_path / "fb.jsonl"


@pytest.mark.parametrize("fmt", ["follow-up", "role-swapped"])
def test_training_lowers_the_loss_and_the_judge_loads_and_scores(tmp_path, tiny_model_dir, fb_file, fmt):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from flr_engine.models import load
    from flr_engine.scorer import FLRScorer

    out = tmp_path / "ft"
    assert _run(tiny_model_dir, out, "--max-steps", "12", "--format", fmt, "--save-steps", "6") == 0
    meta = json.loads((out / "flr_feedback.json").read_text())
    assert meta["format"] == fmt and meta["steps"] == 12 and meta["base"] == str(tiny_model_dir)
    assert (out / "adapter_model.safetensors").exists() and (out / "checkpoint-12").is_dir()
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 13))

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = make_tokenizer("chatml")
    enc, _ = encode_feedback(tok, ROWS, fmt)
    # the unmerged peft model is the independent reference for the merged judge
    tuned_ref = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out)
    ).eval()  # fmt: skip
    lora = {k: v for k, v in tuned_ref.named_parameters() if "lora_B" in k}
    assert lora and all(v.abs().max() > 0 for v in lora.values())  # lora_B starts at zero
    assert _masked_loss(tuned_ref, enc) < _masked_loss(base, enc) - 0.5

    lm = load(str(out))  # base + adapter, merged; the format comes from flr_feedback.json
    assert lm.format == fmt
    assert _masked_loss(lm.model, enc) == pytest.approx(_masked_loss(tuned_ref, enc), abs=1e-4)
    sc = FLRScorer.from_pretrained(str(out), templates="flr-mixed")
    assert sc.format == fmt
    res = sc.score([ROWS[0].context], [ROWS[0].response])[0]
    renderer = ChatRenderer(tok) if fmt == "follow-up" else RoleSwappedRenderer(tok)
    for f in sc.templates.unique_texts[:5]:
        s = renderer.build(ROWS[0].context, ROWS[0].response, [f])[0]
        with torch.no_grad():
            logp = torch.log_softmax(tuned_ref(torch.tensor([s.ids])).logits[0].float(), -1)
        ref = np.mean([logp[n - 1, s.ids[n]].item() for n in s.targets])
        assert res.template_logprobs[f] == pytest.approx(ref, abs=1e-4)


def test_resume_continues_to_the_same_weights(tmp_path, tiny_model_dir, fb_file):
    """Interrupted after step 3 (a checkpoint) and resumed == one uninterrupted run."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, TrainerCallback

    from flr_engine.models import load

    def train(out, resume=False, stop_at=None):
        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if stop_at and state.global_step >= stop_at:
                    control.should_training_stop = True

        tok = make_tokenizer("chatml")
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        enc, _ = encode_feedback(tok, ROWS, "follow-up")
        cfg = FeedbackTuneConfig(max_steps=6, batch_size=2, lr=5e-3, save_steps=3, warmup_ratio=0.0)
        torch.manual_seed(0)
        return train_feedback(model, tok, enc, str(out), cfg, resume=resume, progress=False,
                              callbacks=[Stop()], settings={"model": str(tiny_model_dir)})  # fmt: skip

    full = train(tmp_path / "full")
    part = train(tmp_path / "part", stop_at=3)
    assert part.steps == 3
    with pytest.raises(ValueError, match="--resume"):
        train(tmp_path / "part")  # checkpoints there: refuses to start over silently
    resumed = train(tmp_path / "part", resume=True)
    assert resumed.start_step == 3 and resumed.steps == 6 and full.steps == 6
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "part" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert load(str(tmp_path / "part")).format == "follow-up"
    steps = [json.loads(x)["step"] for x in open(tmp_path / "part" / "metrics.jsonl")]
    assert steps == sorted(set(steps)), "a resume must not log a step twice"


def test_output_folder_safety(tmp_path, tiny_model_dir):
    """A folder that is not a feedback-tune run is never written into; a resume with other
    data or settings is refused and names what differs."""
    from transformers import AutoModelForCausalLM

    from flr_engine.io import OutputConflictError

    tok = make_tokenizer("chatml")

    def train(out, rows=ROWS, resume=False, lr=5e-3):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        enc, _ = encode_feedback(tok, rows, "follow-up")
        cfg = FeedbackTuneConfig(max_steps=2, batch_size=2, lr=lr, save_steps=1, warmup_ratio=0.0)
        return train_feedback(model, tok, enc, str(out), cfg, resume=resume, progress=False,
                              settings={"model": str(tiny_model_dir)})  # fmt: skip

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    for kw in ({}, {"resume": True}):
        with pytest.raises(OutputConflictError, match="holds no feedback-tune run"):
            train(mine, **kw)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "run.lock"]
    assert (mine / "notes.txt").read_text() == "precious"
    run = tmp_path / "run"
    train(run)
    with pytest.raises(OutputConflictError, match="other config"):
        train(run, resume=True, lr=1e-3)
    with pytest.raises(OutputConflictError, match="other rows_sha256"):
        train(run, rows=ROWS[:-1], resume=True)


def test_default_ft_loads_the_shipped_adapter(tmp_path, tiny_model_dir, fb_file, monkeypatch):
    """``default-ft`` = the base named in the shipped flr_feedback.json + its adapter."""
    import flr_engine.models as models

    out = tmp_path / "ft"
    assert _run(tiny_model_dir, out, "--max-steps", "2", "--adapter-dtype", "bfloat16") == 0
    monkeypatch.setattr(models, "shipped_judge_dir", lambda name="default-ft": out)
    a, b = models.load("default-ft"), models.load(str(out))
    assert a.name == "default-ft" and a.format == "follow-up"
    for (k, v), (_, w) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(v, w), k
    base = models.load(str(tiny_model_dir))
    assert any(not torch.equal(v, base.model.state_dict()[k]) for k, v in a.model.state_dict().items())


def test_config_checks():
    with pytest.raises(ValueError, match="format"):
        FeedbackTuneConfig(format="swapped")
    with pytest.raises(ValueError, match="batch-size"):
        FeedbackTuneConfig(batch_size=0)


# ------------------------------------------------------------------ data builder

TRAIN = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "train")


def test_pair_reactions_use_neither_template_sets_wording():
    known = {t.lower().replace("’", "'") for s in ("flr-helpfulness", "flr-mixed")
             for t in load_templates(s).unique_texts}  # fmt: skip
    for t in PAIR_POSITIVE + PAIR_NEGATIVE:
        assert t.lower() not in known
    assert not set(PAIR_POSITIVE) & set(PAIR_NEGATIVE)


@pytest.mark.skipif(not os.path.isdir(TRAIN), reason="../shared/data/train not present")
def test_mix_holds_out_calibration_pairs_and_labels_polarity():
    cfg = MixConfig(pairs=40, calib_pairs=20, feedbackqa=10, oasst=5, seed=3)
    rows, calib, stats = build_feedback_mix(TRAIN, cfg)
    assert stats["counts"] == {"pair+": 40, "pair-": 40, "feedbackqa+": 5, "feedbackqa-": 5, "oasst": 5}
    trained = {r["id"][:-1] for r in rows if r["source"].startswith("pair:")}
    assert len(calib) == 20 and not trained & {p["id"] for p in calib}
    for r in rows:
        if r["source"].startswith("pair:"):
            assert r["feedback"] in (PAIR_POSITIVE if r["polarity"] == "+" else PAIR_NEGATIVE)
        if r["source"] == "feedbackqa":
            assert (r["rating"] in ("Excellent", "Acceptable")) == (r["polarity"] == "+")
    again, _, _ = build_feedback_mix(TRAIN, cfg)
    assert again == rows  # seeded


@pytest.mark.slow
def test_shipped_default_ft_scores_like_the_reference(default_model_dir):
    """The shipped judge: the engine's scores == the reference scorer's on the merged model,
    and they differ from the base model's (the adapter is really applied)."""
    from flr_engine.models import load, shipped_judge_dir
    from flr_engine.scorer import FLRScorer

    if not (shipped_judge_dir() / "adapter_model.safetensors").exists():
        pytest.skip("no shipped default-ft adapter")
    ft = load("default-ft")
    assert ft.format == "follow-up"
    conv, reply = "What is the capital of France?", "The capital of France is Paris."
    eng = FLRScorer(ft.model, ft.tokenizer, templates="flr-mixed", engine="engine").score([conv], [reply])[0]
    ref = FLRScorer(ft.model, ft.tokenizer, templates="flr-mixed", engine="reference").score([conv], [reply])[0]
    assert eng.reward == pytest.approx(ref.reward, abs=1e-4)
    base = FLRScorer.from_pretrained("default", templates="flr-mixed", engine="reference")
    assert abs(base.score([conv], [reply])[0].reward - ref.reward) > 1e-3
