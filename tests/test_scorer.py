"""FLRScorer and the TRL-style reward callable, on a tiny random model."""

from __future__ import annotations

import pickle

import pytest
import torch
from tiny import make_model, make_tokenizer

from flr_engine import FLRReward, FLRScorer
from flr_engine.templates import load_templates

CONVS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "user", "content": "Can you help me write a poem about the sea?"},
        {"role": "assistant", "content": "Sure! What mood?"},
        {"role": "user", "content": "Calm."},
    ],
]
REPLIES = ["The capital of France is Paris.", "The sea is calm, the turtles sleep."]


@pytest.fixture(scope="module")
def tiny():
    tok = make_tokenizer("chatml")
    return make_model("llama", vocab_size=len(tok)), tok


def hf_mean_logprob(model, tok, msgs, span):
    """mean log p of the tokens inside the last occurrence of ``span`` in the rendered
    ``msgs``, via HF's loss (not our code path)."""
    text = tok.apply_chat_template(msgs, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    start = text.rindex(span)
    ids = torch.tensor([enc.input_ids])
    labels = torch.tensor([[i if a >= start and b <= start + len(span) and b > a else -100
                            for i, (a, b) in zip(enc.input_ids, enc.offset_mapping)]])
    with torch.no_grad():
        return -model(input_ids=ids, labels=labels).loss.item()


def independent_lp(model, tok, conv, reply, f):
    """mean log p of the follow-up tokens."""
    msgs = conv + [{"role": "assistant", "content": reply}, {"role": "user", "content": f}]
    return hf_mean_logprob(model, tok, msgs, f)


def test_reward_matches_independent_formula(tiny):
    model, tok = tiny
    scorer = FLRScorer(model, tok, templates="flr-helpfulness", engine="reference")
    res = scorer.score(CONVS, REPLIES)
    ts = load_templates("flr-helpfulness")
    for conv, reply, r in zip(CONVS, REPLIES, res):
        lp = {f: independent_lp(model, tok, conv, reply, f) for f in ts.unique_texts}
        dims = [
            sum(lp[f] for f in d.positive) / len(d.positive) - sum(lp[f] for f in d.negative) / len(d.negative)
            for d in ts.dimensions
        ]
        assert r.reward == pytest.approx(sum(dims) / len(dims), abs=1e-5)
        assert r.template_logprobs == pytest.approx(lp, abs=1e-5)
        assert set(r.per_dimension) == set(ts.dimension_names)


def test_options_sum_dimensions_compare(tiny):
    model, tok = tiny
    mean = FLRScorer(model, tok, templates="flr-mixed", engine="reference").score(CONVS[:1], REPLIES[:1])[0]
    summ = FLRScorer(model, tok, templates="flr-mixed", engine="reference", reduction="sum").score(CONVS[:1], REPLIES[:1])[0]
    for t, v in mean.template_logprobs.items():
        assert summ.template_logprobs[t] == pytest.approx(v * mean.num_tokens[t], abs=1e-4)
    full = FLRScorer(model, tok, engine="reference").score(CONVS[:1], REPLIES[:1])[0]
    one = FLRScorer(model, tok, engine="reference", dimensions=["relevance"]).score(CONVS[:1], REPLIES[:1])[0]
    assert one.reward == pytest.approx(full.per_dimension["relevance"]["reward"], abs=1e-6)
    cmp = FLRScorer(model, tok, templates="flr-mixed", engine="reference").compare(CONVS[0], REPLIES)
    assert cmp[0].reward == pytest.approx(mean.reward, abs=1e-6) and len(cmp) == 2


def test_plain_string_conversation_and_length_mismatch(tiny):
    model, tok = tiny
    s = FLRScorer(model, tok, templates="flr-mixed", engine="reference")
    a = s.score(["What is the capital of France?"], [REPLIES[0]])[0]
    b = s.score(CONVS[:1], REPLIES[:1])[0]
    assert a.reward == pytest.approx(b.reward)
    with pytest.raises(ValueError, match="same length"):
        s.score(CONVS, REPLIES[:1])


def test_trl_reward_callable(tiny):
    model, tok = tiny
    scorer = FLRScorer(model, tok, templates="flr-mixed", engine="reference")
    reward = FLRReward(scorer=scorer, batch_size=1)
    conv = reward(prompts=CONVS, completions=[[{"role": "assistant", "content": r}] for r in REPLIES])
    plain = reward(prompts=["What is the capital of France?"], completions=[REPLIES[0]], extra=1)
    assert conv == pytest.approx([r.reward for r in scorer.score(CONVS, REPLIES)])
    assert plain[0] == pytest.approx(conv[0])
    assert reward.__name__ == "flr_reward"
    clone = pickle.loads(pickle.dumps(reward))  # carries the model when given a scorer
    assert clone(prompts=CONVS, completions=REPLIES) == pytest.approx(conv)


def test_trl_reward_from_name_pickles_without_model(tiny_model_dir):
    reward = FLRReward(str(tiny_model_dir), templates="flr-mixed", engine="reference")
    first = reward(prompts=CONVS[:1], completions=REPLIES[:1])
    state = pickle.dumps(reward)
    assert len(state) < 10_000  # no weights inside
    assert pickle.loads(state)(prompts=CONVS[:1], completions=REPLIES[:1]) == pytest.approx(first)


def independent_direct(model, tok, conv, reply):
    """Direct baseline: mean log p of the reply's tokens given the context."""
    return hf_mean_logprob(model, tok, conv + [{"role": "assistant", "content": reply}], reply)


@pytest.mark.parametrize("engine", ["engine", "reference"])
@pytest.mark.parametrize("mode,reduction", [("likelihood", "mean"), ("likelihood", "sum"), ("official", "mean")])
def test_direct_baseline_from_the_same_call(tiny, engine, mode, reduction):
    model, tok = tiny
    scorer = FLRScorer(model, tok, templates="flr-mixed", engine=engine, mode=mode, reduction=reduction)
    calls = []
    for method in ("logprob_sums", "logit_sums"):
        real = getattr(scorer.backend, method)
        setattr(scorer.backend, method,
                lambda seqs, real=real, m=method: calls.append((m, len(seqs))) or real(seqs))  # fmt: skip
    prepared = [scorer.prepare(c, r) for c, r in zip(CONVS, REPLIES)]
    results, direct = scorer.score_prepared_with_direct(prepared)
    stats = dict(getattr(scorer.backend, "last_stats", {}))
    k = len(scorer.templates.unique_texts)
    # likelihood: one backend call holding the follow-ups and one Direct sequence per pair;
    # official: the follow-ups' logits, then the Direct log-probs
    if mode == "likelihood":
        assert calls == [("logprob_sums", 2 * k + 2)]
    else:
        assert calls == [("logit_sums", 2 * k), ("logprob_sums", 2)]
    for conv, reply, d in zip(CONVS, REPLIES, direct):
        assert d == pytest.approx(independent_direct(model, tok, conv, reply), abs=1e-5)
    plain = scorer.score_prepared(prepared)
    if engine == "engine" and mode == "likelihood":  # the trie shares every Direct token
        assert stats["unique_tokens"] == scorer.backend.last_stats["unique_tokens"]
    assert [r.reward for r in results] == pytest.approx([r.reward for r in plain], abs=1e-6)
    assert [r.template_logprobs for r in results] == [
        pytest.approx(r.template_logprobs, abs=1e-6) for r in plain
    ]
