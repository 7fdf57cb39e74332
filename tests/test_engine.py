"""The packed engine against the reference scorer: every mode, several architectures."""

from __future__ import annotations

import gzip
import json
import os
import threading

import pytest
import torch
from tiny import make_model, make_tokenizer

from flr_engine import FLRScorer
from flr_engine.engine.attention import (
    ATTN_NAME,
    packed_forward,
    route_tree_attention,
    unroute_tree_attention,
)
from flr_engine.engine.backend import EngineBackend
from flr_engine.engine.forward import LMHead
from flr_engine.templates import Dimension, TemplateSet

CONVS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "user", "content": "How do I bake bread?"},
        {"role": "assistant", "content": "Mix flour, water, yeast and salt."},
        {"role": "user", "content": "And then?"},
    ],
]
REPLIES = ["Paris.", "I like turtles.", "Knead, let it rise, then bake."]
ARCH_FAMILY = [("llama", "llama3"), ("qwen2", "chatml"), ("mistral", "mistral"), ("gemma2", "gemma"), ("gemma3", "gemma")]


def assert_same(ref, eng, atol=2e-5):
    for a, b in zip(ref, eng):
        assert a.template_logprobs.keys() == b.template_logprobs.keys()
        for k in a.template_logprobs:
            assert b.template_logprobs[k] == pytest.approx(a.template_logprobs[k], abs=atol), k
        assert b.reward == pytest.approx(a.reward, abs=atol)
        assert a.num_tokens == b.num_tokens


@pytest.mark.parametrize("arch, family", ARCH_FAMILY)
@pytest.mark.parametrize("opts", [dict(), dict(mode="official"), dict(reduction="sum", score_eot=True)])
def test_engine_equals_reference(arch, family, opts):
    tok = make_tokenizer(family)
    model = make_model(arch, vocab_size=len(tok))
    ref = FLRScorer(model, tok, templates="flr-mixed", engine="reference", **opts).score(CONVS, REPLIES)
    scorer = FLRScorer(model, tok, templates="flr-mixed", engine="engine", engine_kwargs={"token_budget": 300}, **opts)
    eng = scorer.score(CONVS, REPLIES)
    assert scorer.engine_name == "engine"
    stats = scorer.backend.last_stats
    assert stats["packs"] > 1  # the budget split the work
    assert stats["unique_tokens"] < stats["total_tokens"] / 3  # prefixes really shared
    if opts.get("mode") != "official":  # follow-ups' first tokens share one softmax pass
        assert stats["normalisers"] < stats["scored"]
    assert_same(ref, eng)


def test_sliding_window_is_respected():
    """Gemma 3's sliding layers (window 8 here): ignoring the window would change scores."""
    tok = make_tokenizer("gemma")
    model = make_model("gemma3", vocab_size=len(tok))
    eng = FLRScorer(model, tok, templates="flr-mixed", engine="engine").score(CONVS[:1], REPLIES[:1])
    ref = FLRScorer(model, tok, templates="flr-mixed", engine="reference").score(CONVS[:1], REPLIES[:1])
    assert_same(ref, eng)
    model.config.sliding_window = 10_000  # now a different model: the engine must follow it
    for layer in model.model.layers:
        if layer.self_attn.sliding_window:
            layer.self_attn.sliding_window = 10_000
    eng_wide = FLRScorer(model, tok, templates="flr-mixed", engine="engine").score(CONVS[:1], REPLIES[:1])
    assert abs(eng_wide[0].reward - eng[0].reward) > 1e-4


def test_template_breaking_the_prefix_property_is_still_exact():
    """A template with no separators: the reply's last token merges with the follow-up's
    first characters, so (conversation + reply) tokenised alone is not a prefix of the
    full sequence. Sequences are tokenised whole, so the trie shares only true prefixes."""
    tok = make_tokenizer("chatml")
    saved = tok.chat_template
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    ts = TemplateSet("t", (Dimension("d", ("is is highly relevant here.", "is is great."), ("is is off-topic.",)),))
    try:
        model = make_model("llama", vocab_size=len(tok))
        reply = "Paris is nice. Th"  # "Th" + "is is ..." -> the token "This" spans the boundary
        q = CONVS[0][0]["content"]
        prefix_ids = tok(q + reply, add_special_tokens=False).input_ids
        full_ids = tok(q + reply + "is is great.", add_special_tokens=False).input_ids
        assert full_ids[: len(prefix_ids)] != prefix_ids  # the property is broken here
        ref = FLRScorer(model, tok, templates=ts, engine="reference").score(CONVS[:1], [reply])
        eng = FLRScorer(model, tok, templates=ts, engine="engine").score(CONVS[:1], [reply])
        assert_same(ref, eng)
    finally:
        tok.chat_template = saved


def test_bf16_engine_error_bounded_by_reference_error():
    """In bf16 the engine's error vs the fp32 reference is at most ~2x the bf16 reference's."""
    tok = make_tokenizer("chatml")
    m32 = make_model("llama", vocab_size=len(tok))
    m16 = make_model("llama", vocab_size=len(tok), dtype=torch.bfloat16)
    truth = FLRScorer(m32, tok, templates="flr-mixed", engine="reference").score(CONVS, REPLIES)
    ref16 = FLRScorer(m16, tok, templates="flr-mixed", engine="reference").score(CONVS, REPLIES)
    eng16 = FLRScorer(m16, tok, templates="flr-mixed", engine="engine").score(CONVS, REPLIES)

    def err(res):
        return max(abs(a.template_logprobs[k] - b.template_logprobs[k]) for a, b in zip(truth, res) for k in a.template_logprobs)

    assert err(eng16) <= 2 * err(ref16) + 1e-3


def test_explicit_engine_fails_loudly():
    tok = make_tokenizer("chatml")
    model = make_model("llama", vocab_size=len(tok))
    with pytest.raises(RuntimeError, match="engine='engine' cannot run"):
        FLRScorer(model, tok, engine="engine", engine_kwargs={"no_such_option": 1})
    assert FLRScorer(model, tok, engine="auto", engine_kwargs={"no_such_option": 1}).engine_name == "reference"


PAIRWISE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "pairwise", "hh-rlhf-helpful-base.jsonl.gz")


@pytest.mark.slow
def test_default_model_engine_equals_reference_on_real_rows(default_model_dir):
    if not os.path.exists(PAIRWISE):
        pytest.skip(f"{PAIRWISE} absent")
    with gzip.open(PAIRWISE, "rt") as fh:
        rows = [json.loads(next(fh)) for _ in range(1)]
    convs = [r["context"] for r in rows for _ in (0, 1)]
    replies = [x for r in rows for x in (r["chosen"], r["rejected"])]
    eng = FLRScorer.from_pretrained("default", templates="flr-mixed", engine="engine")
    ref = FLRScorer(eng.model, eng.tokenizer, templates="flr-mixed", engine="reference")
    assert_same(ref.score(convs, replies), eng.score(convs, replies), atol=1e-4)


@pytest.mark.parametrize("arch, family", [("llama", "chatml"), ("gemma3", "gemma")])
def test_prefix_cache_baseline_equals_reference(arch, family):
    tok = make_tokenizer(family)
    model = make_model(arch, vocab_size=len(tok))
    ref = FLRScorer(model, tok, templates="flr-mixed", engine="reference").score(CONVS, REPLIES)
    base = FLRScorer(model, tok, templates="flr-mixed", engine="hf-prefix-cache", engine_kwargs={"batch_size": 7})
    assert_same(ref, base.score(CONVS, REPLIES))


@pytest.mark.parametrize("bias, scale, softcap", [(False, 1.0, None), (True, 0.25, None), (True, 1.5, 3.0)])
def test_lm_head_rows_share_parent_normalisers(bias, scale, softcap):
    """What the engine does per pack: one softmax pass per unique parent, gathered per
    scored node; equals a full log_softmax of every scored node's parent, with the head's
    bias / scale / softcap."""
    g = torch.Generator().manual_seed(0)
    V, H = 300, 16
    w = torch.randn(V, H, generator=g)
    b = torch.randn(V, generator=g) if bias else None
    h = torch.randn(10, H, generator=g)
    parent = torch.tensor([0, 0, 0, 3, 3, 7, 9, 9, 9, 9])  # siblings under 0, 3 and 9
    ids = torch.randint(0, V, (10,), generator=g)
    z = h[parent] @ w.T + (b if bias else 0)
    z = z * scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    want = torch.log_softmax(z.double(), -1).gather(1, ids[:, None])[:, 0]
    uniq, row_of = torch.unique(parent, return_inverse=True)
    head = LMHead(w, b, scale, softcap)
    got = head.logprobs(h[uniq], ids, rows=row_of)
    assert got.dtype == torch.float32 and got.shape == (10,)
    assert torch.allclose(got.double(), want, atol=1e-5)
    raw = head.logits(h[uniq], ids, rows=row_of)  # the official mode's raw logits
    assert torch.allclose(raw.double(), z.double().gather(1, ids[:, None])[:, 0], atol=1e-5)


@pytest.mark.parametrize("arch", [a for a, _ in ARCH_FAMILY])
def test_lm_head_from_model_reproduces_the_logits(arch):
    """LMHead.from_model reads weight / bias / scale / softcap (Gemma 2: final softcap)."""
    model = make_model(arch, vocab_size=301)
    ids = torch.randint(0, 301, (1, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()  # (L, V)
        h = model.get_decoder()(input_ids=ids).last_hidden_state[0]  # (L, H)
    head = LMHead.from_model(model)
    assert (head.softcap is not None) == (arch == "gemma2")
    targets = ids[0].roll(-1)
    want = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
    with torch.no_grad():
        torch.testing.assert_close(head.logprobs(h, targets), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(head.logits(h, targets), logits.gather(1, targets[:, None])[:, 0])


def test_lm_head_refuses_unmerged_lora_on_the_head():
    peft = pytest.importorskip("peft")
    model = make_model("llama", vocab_size=301)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    with pytest.raises(ValueError, match="unmerged LoRA adapters"):
        LMHead.from_model(lora)
    with lora.disable_adapter():  # the base head is the model's head then
        assert LMHead.from_model(lora).weight is model.lm_head.base_layer.weight


@pytest.mark.parametrize("arch", [a for a, _ in ARCH_FAMILY])
def test_routing_leaves_other_forwards_unchanged(arch):
    """The engine routes attention once, when built; plain forwards (eager Gemma 2
    included: the modeling file's own eager function) give the same logits, and the
    names come back on unrouting."""
    model = make_model(arch, vocab_size=301)
    ids = torch.randint(0, 301, (2, 13), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: the native mask function must still run
    native = model.config._attn_implementation
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        EngineBackend(model)
        assert model.config._attn_implementation == f"{ATTN_NAME}:{native}"
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    route_tree_attention(model)  # idempotent
    assert model.config._attn_implementation == f"{ATTN_NAME}:{native}"
    unroute_tree_attention(model)
    assert model.config._attn_implementation == native


def test_packed_forward_builds_no_mask_and_refuses_a_missing_layout():
    model = make_model("llama", vocab_size=301)
    route_tree_attention(model)
    ids = torch.randint(0, 301, (1, 9))
    with torch.no_grad(), packed_forward(), pytest.raises(RuntimeError, match="no flr_tree layout"):
        model(input_ids=ids)  # a packed forward must carry its layout to every layer
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    name = model.config._attn_implementation
    kw = dict(batch_size=1, q_length=4, kv_length=4, allow_is_causal_skip=False)
    assert ALL_MASK_ATTENTION_FUNCTIONS[name](**kw) is not None
    with packed_forward():
        assert ALL_MASK_ATTENTION_FUNCTIONS[name](**kw) is None


def test_engine_and_plain_forwards_on_two_threads():
    """Nothing is switched around a forward: the engine scoring on one thread while the
    reference runs the same model on another gives each its sequential result."""
    tok = make_tokenizer("llama3")
    model = make_model("gemma3", vocab_size=len(tok))
    eng = FLRScorer(model, tok, templates="flr-mixed", engine="engine", engine_kwargs={"token_budget": 300})
    ref = FLRScorer(model, tok, templates="flr-mixed", engine="reference")
    want_eng, want_ref = eng.score(CONVS, REPLIES), ref.score(CONVS, REPLIES)
    got, errors = {}, []

    def run(name, scorer):
        try:
            got[name] = [scorer.score(CONVS, REPLIES) for _ in range(2)]
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=a) for a in (("eng", eng), ("ref", ref))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for res in got["eng"]:
        assert_same(want_eng, res, atol=1e-6)
    for res in got["ref"]:
        assert_same(want_ref, res, atol=1e-6)


# ---------------------------------------------------------------------------------- GPU


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("arch, family", [("llama", "llama3"), ("gemma2", "gemma"), ("gemma3", "gemma")])
def test_gpu_engine_equals_reference(arch, family):
    """On CUDA the engine runs the compiled Triton kernels (tree attention, fused log-prob;
    "auto"); fp32 scores equal the reference's (gemma2: soft-capping, gemma3: windows)."""
    tok = make_tokenizer(family)
    model = make_model(arch, vocab_size=len(tok)).cuda()
    ref = FLRScorer(model, tok, templates="flr-mixed", engine="reference").score(CONVS, REPLIES)
    scorer = FLRScorer(model, tok, templates="flr-mixed", engine="engine", engine_kwargs={"token_budget": 300})
    assert_same(ref, scorer.score(CONVS, REPLIES), atol=1e-4)
    from flr_engine.ops import fused_logprob, tree_attention

    assert not fused_logprob._triton_auto_failed and not tree_attention._triton_auto_failed


@pytest.mark.gpu
@needs_cuda
def test_gpu_bf16_engine_error_bounded_by_reference_error():
    tok = make_tokenizer("chatml")
    m32 = make_model("llama", vocab_size=len(tok)).cuda()
    m16 = make_model("llama", vocab_size=len(tok), dtype=torch.bfloat16).cuda()
    truth = FLRScorer(m32, tok, templates="flr-mixed", engine="reference").score(CONVS, REPLIES)
    ref16 = FLRScorer(m16, tok, templates="flr-mixed", engine="reference").score(CONVS, REPLIES)
    eng16 = FLRScorer(m16, tok, templates="flr-mixed", engine="engine").score(CONVS, REPLIES)

    def err(res):
        return max(abs(a.template_logprobs[k] - b.template_logprobs[k]) for a, b in zip(truth, res) for k in a.template_logprobs)

    assert err(eng16) <= 2 * err(ref16) + 1e-3


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_gpu_dpo_packed_backward_matches_plain(arch):
    """flr dpo's log-probs on CUDA: the batch's trie through the packed backbone (tree
    attention, torch path: a gradient is needed) vs the padded batch, both through TRL's
    fused LM head; values and the gradient of every parameter."""
    from test_dpo import packed_vs_padded

    model = make_model(arch, vocab_size=613).cuda()
    (ref, ref_grads), (got, grads) = packed_vs_padded(model, vocab=613, device="cuda")
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)
    for n, gr in grads.items():
        torch.testing.assert_close(gr, ref_grads[n], rtol=1e-3, atol=1e-4, msg=n)
