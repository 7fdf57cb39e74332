"""``flr feedback-tune --objective pairwise``: FLR's own margin as a Bradley-Terry loss.

The packed margins (one trie per batch, tree attention, fused gathered log-prob) are checked
against a plain forward per rendered sequence, values and gradients, on several architectures;
training must raise the margin on its pairs; the CLI writes a judge that loads and scores."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import make_model, make_tokenizer

from flr_engine.chat import ChatRenderer
from flr_engine.errors import ConfigError
from flr_engine.evaluation.data import PairItem
from flr_engine.feedback import (
    PAIR_NEGATIVE,
    PAIR_POSITIVE,
    FeedbackTuneConfig,
    held_out_reactions,
)
from flr_engine.io import InputFileError
from flr_engine.pairwise_tune import (
    PairwiseCollator,
    ReactionPool,
    load_reactions,
    margins,
    pairwise_loss,
    prepare_pairs,
)
from flr_engine.templates import load_templates

POOL = ReactionPool(PAIR_POSITIVE[:6], PAIR_NEGATIVE[:6])
PAIRS = [
    PairItem(1, "a", [{"role": "user", "content": "What is the capital of France?"}],
             "The capital of France is Paris.", "I like turtles."),
    PairItem(2, "b", [{"role": "user", "content": "What is 2+2?"}], "4", "I like turtles, and five."),
    PairItem(3, "c", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Bread?"},
                 {"role": "assistant", "content": "What about it?"},
                 {"role": "user", "content": "How do I bake it?"}],
             "Mix flour, water, yeast and salt; knead, let it rise, bake.", "Buy it."),
]  # fmt: skip


def _reference_margins(model, tok, rows, items, pool):
    """Plain forward per rendered sequence, full log_softmax, gather: r(chosen) - r(rejected)."""
    renderer = ChatRenderer(tok)
    out = []
    for row in rows:
        it = items[row["idx"]]
        pos = [pool.positive[i] for i in row["pos"]]
        neg = [pool.negative[i] for i in row["neg"]]
        r = []
        for reply in (it.chosen, it.rejected):
            lps = {}
            for s, f in zip(renderer.build(it.context, reply, pos + neg), pos + neg):
                logp = torch.log_softmax(model(torch.tensor([s.ids])).logits[0].float(), -1)
                lps[f] = torch.stack([logp[n - 1, s.ids[n]] for n in s.targets]).mean()
            r.append(torch.stack([lps[f] for f in pos]).mean() - torch.stack([lps[f] for f in neg]).mean())
        out.append(r[0] - r[1])
    return torch.stack(out)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_packed_margins_and_gradients_match_a_plain_forward(arch):
    tok = make_tokenizer("chatml")
    model = make_model(arch, vocab_size=len(tok))
    rows, kept, skipped = prepare_pairs(tok, PAIRS, POOL, k=3, seed=1)
    assert skipped == 0 and len(rows) == 3
    batch = PairwiseCollator(tok, kept, POOL)(rows)
    got = margins(model, batch)
    (got * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    want = _reference_margins(model, tok, rows, kept, POOL)
    (want * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert want.abs().max() > 1e-3  # the check is not between zeros
    for n, p in model.named_parameters():
        torch.testing.assert_close(g_packed[n], p.grad, atol=1e-4, rtol=1e-3, msg=n)


def test_collator_scores_exactly_the_reactions_in_order():
    """Sequence s = ((pair * 2 + reply) * 2 + sign) * k + j; its scored tokens decode to the
    reaction (the pair's positive then negative draws), after the reply."""
    tok = make_tokenizer("chatml")
    rows, kept, _ = prepare_pairs(tok, PAIRS, POOL, k=2, seed=0)
    batch = PairwiseCollator(tok, kept, POOL)(rows)
    seq = batch["seq"]
    assert int(seq.max()) + 1 == len(rows) * 2 * 2 * 2
    for s in range(int(seq.max()) + 1):
        b, rest = divmod(s, 8)
        reply, rest = divmod(rest, 4)
        sign, j = divmod(rest, 2)
        text = (POOL.positive, POOL.negative)[sign][rows[b][("pos", "neg")[sign]][j]]
        assert tok.decode(batch["targets"][seq == s]).strip() == text
    # the same draws every time (resume sees the same sequences)
    again, _, _ = prepare_pairs(tok, PAIRS, POOL, k=2, seed=0)
    assert again == rows
    other, _, _ = prepare_pairs(tok, PAIRS, POOL, k=2, seed=1)
    assert other != rows


def test_pairs_that_cannot_fit_are_skipped_and_counted():
    tok = make_tokenizer("chatml")
    long = PairItem(9, "z", [{"role": "user", "content": "Hi"}], "word " * 400, "ok")
    rows, kept, skipped = prepare_pairs(tok, [*PAIRS, long], POOL, k=2, max_length=128)
    assert skipped == 1 and [it.line for it in kept] == [1, 2, 3]
    with pytest.raises(InputFileError, match="exceeds the pool"):
        prepare_pairs(tok, PAIRS, POOL, k=7)


def test_training_raises_the_margin_on_its_pairs():
    """A few AdamW steps on the loss make chosen's FLR exceed rejected's on the pairs trained."""
    tok = make_tokenizer("chatml")
    model = make_model("llama", vocab_size=len(tok))
    rows, kept, _ = prepare_pairs(tok, PAIRS, POOL, k=3)
    batch = PairwiseCollator(tok, kept, POOL)(rows)
    with torch.no_grad():
        before = margins(model, batch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(15):
        loss, _ = pairwise_loss(model, batch, beta=5.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        after = margins(model, batch)
    assert (after > 0).all() and after.mean() > before.mean() + 0.5, (before, after)


def test_reactions_pool_and_held_out_wording():
    pool = load_reactions("flr-mixed")
    mixed = load_templates("flr-mixed")
    assert set(pool.positive) == {t for _, s, t in mixed.followups if s == "positive"}
    assert len(pool.positive) == len(set(pool.positive))
    ts = held_out_reactions("flr-helpfulness", "flr-mixed")
    texts = ts["dimensions"]["reaction"]
    assert not set(texts["positive"] + texts["negative"]) & set(mixed.unique_texts)
    assert set(PAIR_POSITIVE) <= set(texts["positive"]) and set(PAIR_NEGATIVE) <= set(texts["negative"])
    helpful = {t for _, s, t in load_templates("flr-helpfulness").followups if s == "negative"}
    assert helpful - set(mixed.unique_texts) <= set(texts["negative"])


def test_config_checks():
    with pytest.raises(ConfigError, match="objective"):
        FeedbackTuneConfig(objective="dpo")
    with pytest.raises(ConfigError, match="bf16"):
        FeedbackTuneConfig(objective="pairwise", bf16=True)
    with pytest.raises(ConfigError, match="beta"):
        FeedbackTuneConfig(objective="pairwise", beta=0)


def test_cli_trains_a_judge_that_loads_and_scores(tmp_path, tiny_model_dir, capsys):
    from flr_engine.cli import main
    from flr_engine.models import load

    data = tmp_path / "pairs.jsonl"
    with open(data, "w") as fh:
        for p in PAIRS:
            fh.write(json.dumps({"context": p.context, "chosen": p.chosen, "rejected": p.rejected}) + "\n")
    out = tmp_path / "pw"
    args = ["-q", "feedback-tune", "--objective", "pairwise", "--model", str(tiny_model_dir),
            "--data", str(data), "--reactions", "flr-mixed", "--reactions-per-reply", "2",
            "--batch-size", "2", "--max-steps", "4", "--save-steps", "2", "--logging-steps", "1",
            "--lr", "5e-3", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert all(0 <= m["pair_accuracy"] <= 1 and "margin" in m for m in steps)
    meta = json.loads((out / "flr_feedback.json").read_text())
    assert meta["config"]["objective"] == "pairwise" and meta["steps"] == 4
    mixed = load_templates("flr-mixed").followups
    assert meta["settings"]["reactions"]["positive"] == list(dict.fromkeys(t for _, s, t in mixed if s == "positive"))
    lm = load(str(out))  # base + adapter, merged
    assert lm.format == "follow-up"
    capsys.readouterr()
    assert main(args) != 0  # a finished run is not overwritten silently
    assert "--resume" in capsys.readouterr().err
