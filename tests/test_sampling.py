"""Batched seeded sampling: top-p set as transformers', draw frequencies, batch independence."""

from __future__ import annotations

import pytest
import torch

from flr_engine import sampling
from flr_engine.sampling import SeededTopPSampler, generate, row_generators


def hf_top_p_mask(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Tokens transformers keeps (TemperatureLogitsWarper then TopPLogitsWarper)."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    out = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
    return torch.isfinite(out)


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("flat", [False, True])
def test_kept_set_matches_transformers(top_p, flat, monkeypatch):
    monkeypatch.setattr(sampling, "_TOPK", 16)  # small, so the full-sort fallback runs too
    gen = torch.Generator().manual_seed(0)
    scale = 0.05 if flat else 3.0  # flat: the nucleus is far wider than the top-k
    logits = torch.randn(6, 300, generator=gen, dtype=torch.float64) * scale
    want = hf_top_p_mask(logits, 0.7, top_p)
    # every token the sampler may return lies in transformers' kept set, and over many draws
    # it returns all of them (small sets) - checked through the draws' support
    for r in range(logits.shape[0]):
        seen = set()
        sampler = SeededTopPSampler(row_generators([r], 1), 0.7, top_p)
        for _ in range(400 if want[r].sum() <= 8 else 50):
            out = sampler(None, logits[r : r + 1])
            (tok,) = torch.nonzero(out[0] == 0).flatten().tolist()
            assert torch.isinf(out[0]).sum() == logits.shape[1] - 1
            seen.add(tok)
        assert seen <= set(torch.nonzero(want[r]).flatten().tolist())
        if want[r].sum() <= 8:
            assert seen == set(torch.nonzero(want[r]).flatten().tolist())


def test_draw_frequencies_follow_the_renormalised_nucleus():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -1.0, -3.0]])
    temperature, top_p = 0.8, 0.9
    p = torch.softmax(logits[0] / temperature, -1)
    keep = (torch.cumsum(p, 0) - p) < top_p  # already sorted descending
    want = torch.where(keep, p, 0) / p[keep].sum()
    sampler = SeededTopPSampler(row_generators([123], 1), temperature, top_p)
    n = 20000
    counts = torch.zeros(6)
    for _ in range(n):
        counts[int(sampler(None, logits).argmax())] += 1
    freq = counts / n
    # binomial standard error <= 0.0036 at n=20000: 5 sigma
    assert torch.allclose(freq, want, atol=0.018), (freq, want)
    assert counts[~keep].sum() == 0


def test_generators_are_per_row_and_reproducible():
    a = [torch.rand(3, generator=g) for g in row_generators([5, 6], 2)]
    b = [torch.rand(3, generator=g) for g in row_generators([5, 6], 2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len({tuple(x.tolist()) for x in a}) == 4  # distinct streams per prompt and sample


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    from flr_engine.models import load

    return load(str(tiny_model_dir))


def _prompts(tok):
    texts = ["Hello there, how are you?", "Bread", "A much longer prompt about the sea and ships"]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_samples_do_not_depend_on_the_batch(tiny_lm):
    model, tok = tiny_lm.model, tiny_lm.tokenizer
    a, b, c = _prompts(tok)
    kw = dict(max_new_tokens=12, stop_ids=[tok.eos_token_id], pad_id=0, num_samples=3,
              temperature=1.0, top_p=0.95)  # fmt: skip
    alone = generate(model, [a], seeds=[7], **kw)[0]
    batched = generate(model, [c, a, b], seeds=[1, 7, 2], **kw)
    assert batched[1] == alone
    assert len({tuple(s) for s in alone}) > 1, "a random tiny model gives distinct samples"
    assert generate(model, [a], seeds=[8], **kw)[0] != alone  # the seed matters
    assert [len(x) for x in batched] == [3, 3, 3]


def test_greedy_batched_equals_greedy_alone(tiny_lm):
    model, tok = tiny_lm.model, tiny_lm.tokenizer
    prompts = _prompts(tok)
    kw = dict(max_new_tokens=10, stop_ids=[tok.eos_token_id], pad_id=0)
    batched = generate(model, prompts, **kw)
    for p, got in zip(prompts, batched):
        ids = torch.tensor([p])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=10, eos_token_id=tok.eos_token_id,
                             pad_token_id=0)[0, len(p):].tolist()  # fmt: skip
        if tok.eos_token_id in ref:
            ref = ref[: ref.index(tok.eos_token_id)]
        assert got == [ref]


def test_stop_ids_cut_and_argument_errors(tiny_lm):
    model, tok = tiny_lm.model, tiny_lm.tokenizer
    (p,) = _prompts(tok)[:1]
    (full,) = generate(model, [p], max_new_tokens=8, stop_ids=[tok.eos_token_id], pad_id=0)[0]
    if len(full) >= 2:  # stop at the 2nd generated token: the reply is cut before it
        (cut,) = generate(model, [p], max_new_tokens=8, stop_ids=[full[1]], pad_id=0)[0]
        assert cut == full[: full.index(full[1])]
    with pytest.raises(ValueError, match="num_samples must be 1"):
        generate(model, [p], max_new_tokens=2, stop_ids=[0], pad_id=0, num_samples=2)
    with pytest.raises(ValueError, match="one seed per prompt"):
        generate(model, [p], max_new_tokens=2, stop_ids=[0], pad_id=0, temperature=1.0)
    assert generate(model, [], max_new_tokens=2, stop_ids=[0], pad_id=0) == []


def test_generate_cli_slices_resumes_and_feeds_flr_score(tmp_path, tiny_model_dir, capsys):
    import json

    from flr_engine.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(
        json.dumps({"id": f"p{i}", "prompt": f"Question number {i}?"}) + "\n" for i in range(5)
    ))  # fmt: skip
    out = tmp_path / "r.jsonl"
    args = ["-q", "generate", "--policy", str(tiny_model_dir), "--prompts", str(prompts),
            "--out", str(out), "--skip", "1", "--limit", "3", "--max-new-tokens", "6",
            "--batch-prompts", "2"]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["p1", "p2", "p3"] and [r["line"] for r in rows] == [2, 3, 4]
    for r in rows:
        assert r["context"] == [{"role": "user", "content": f"Question number {r['line'] - 1}?"}]
        assert 0 <= r["tokens"] <= 6 and r["finished"] == (r["tokens"] < 6)
    # greedy replies equal transformers' greedy generate on the same prompt
    from flr_engine.chat import end_of_turn_ids, generation_prompt
    from flr_engine.models import load

    lm = load(str(tiny_model_dir))
    ids = lm.tokenizer(generation_prompt(lm.tokenizer, rows[0]["context"]),
                       add_special_tokens=False, return_tensors="pt")["input_ids"]  # fmt: skip
    eot = end_of_turn_ids(lm.tokenizer)
    ref = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=6, eos_token_id=eot,
                            pad_token_id=eot[0])[0, ids.shape[1]:].tolist()  # fmt: skip
    ref = ref[: next((i for i, t in enumerate(ref) if t in eot), len(ref))]
    assert rows[0]["response"] == lm.tokenizer.decode(ref, skip_special_tokens=True).strip()
    # resume after a torn last line: identical file
    text = out.read_text()
    out.write_text(text[: text.rindex('{"line"') + 7])
    assert main(args) == 0
    assert out.read_text() == text
    # other settings are refused; nothing written is lost
    assert main(args + ["--max-new-tokens", "7"]) == 2
    assert out.read_text() == text
    # the replies are flr score input
    scores = tmp_path / "s.jsonl"
    assert main(["-q", "score", "--model", str(tiny_model_dir), "--input", str(out),
                 "--output", str(scores), "--templates", "flr-mixed"]) == 0  # fmt: skip
    assert [json.loads(x)["id"] for x in scores.read_text().splitlines()] == ["p1", "p2", "p3"]
