"""FLRReward under TRL 1.x's calling convention (no TRL needed): items the judge cannot
score get None and a warning naming the item and why; the rest match FLRScorer."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny import make_model, make_tokenizer

from flr_engine import FLRReward, FLRScorer
from flr_engine.models import load, resolve_device

Q = "What is the capital of France?"
A = "The capital of France is Paris."


@pytest.fixture(scope="module")
def scorer():
    tok = make_tokenizer("chatml")
    return FLRScorer(make_model("llama", vocab_size=len(tok)), tok, templates="flr-mixed", max_length=96)


def trl_kwargs(metrics: dict, n: int) -> dict:
    """What GRPOTrainer passes besides prompts/completions (plus a dataset column)."""
    return dict(
        completion_ids=[[1, 2]] * n,
        trainer_state=object(),
        log_extra=lambda column, values: None,
        log_metric=lambda name, value: metrics.setdefault(name, []).append(value),
        answer=["Paris"] * n,
    )


def test_bad_items_get_none_with_a_reason_and_the_rest_is_scored(scorer, caplog):
    user = [{"role": "user", "content": Q}]
    asst = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    items = [  # (prompt, completion, None or the conversation it is scored as, why)
        (user, asst(A), user, None),
        (user, asst(""), None, "empty"),
        (user, [{"role": "assistant", "content": None}], None, "content is None"),
        (user, asst("Let me check.") + asst(A), None, "2 messages"),
        ([{"role": "user", "content": "x"}, {"role": "tool", "content": "42"}, *user], asst(A), None, "role 'tool'"),
        ([{"role": "developer", "content": "Be brief."}, *user], asst(A),
         [{"role": "system", "content": "Be brief."}, *user], None),
        (Q, "word " * 200, None, "exceed the model's context"),
        (Q, A, Q, None),
    ]  # fmt: skip
    metrics: dict = {}
    with caplog.at_level(logging.WARNING, logger="flr_engine.trl_reward"):
        got = FLRReward(scorer=scorer, batch_size=2)(
            prompts=[p for p, *_ in items], completions=[c for _, c, *_ in items], **trl_kwargs(metrics, len(items))
        )
    scored = [(i, conv) for i, (_, _, conv, _) in enumerate(items) if conv is not None]
    want = scorer.score([conv for _, conv in scored], [A] * len(scored))
    assert [g is None for g in got] == [conv is None for _, _, conv, _ in items]
    assert [got[i] for i, _ in scored] == pytest.approx([r.reward for r in want], abs=1e-5)
    for i, (*_, why) in enumerate(items):
        if why:
            assert any(f"item {i} not scored" in r.message and why in r.message for r in caplog.records), why
    for d in scorer.templates.dimension_names:
        mean = sum(r.per_dimension[d]["reward"] for r in want) / len(want)
        assert metrics[f"flr/{d}"] == [pytest.approx(mean, abs=1e-5)]
    assert metrics["flr/unscored"] == [pytest.approx(5 / 8)]


def test_all_none_batch_and_no_log_metric(scorer):
    assert FLRReward(scorer=scorer)(prompts=[Q, Q], completions=["", "  "]) == [None, None]


def test_device_auto(tiny_model_dir, monkeypatch):
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    assert next(load(str(tiny_model_dir)).model.parameters()).device.type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    moved = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(a) or self)
    FLRScorer.from_pretrained(str(tiny_model_dir), engine="reference")  # default device="auto"
    assert moved == [("cuda",)]
