"""DPO: loss algebra, fused vs plain log-prob gradients, training end to end, resume, LoRA."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flr_engine.cli import main
from flr_engine.dpo import (
    DPOConfig,
    EncodedPair,
    completion_logprobs,
    dpo_loss,
    encode_pairs,
    load_pairs,
    lr_factor,
    make_plan,
    train_dpo,
)

PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris.", "I like turtles."),
    ("How do I bake bread?", "Mix flour, water, yeast and salt, knead, then bake.", "No."),
    ("Can you help me write a poem about the sea?", "The sea is wide, the sea is blue.", "What?"),
    ("I like turtles.", "Turtles are reptiles with shells.", "The capital of France is Paris."),
]


def write_pairs(path, pairs=PAIRS, extra=()):
    with open(path, "w") as fh:
        for p, c, r in pairs:
            fh.write(json.dumps({
                "prompt": [{"role": "user", "content": p}],
                "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": r}],
            }) + "\n")  # fmt: skip
        for line in extra:
            fh.write(line + "\n")


def sigmoid_ref(h, beta, eps):
    ls = lambda z: -math.log1p(math.exp(-z))  # noqa: E731  log sigmoid
    return -(1 - eps) * ls(beta * h) - eps * ls(-beta * h)


# ---------------------------------------------------------------------------------- loss


def test_dpo_loss_hand_values():
    pc, pr = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -2.0])
    rc, rr = torch.tensor([-2.0, -4.0]), torch.tensor([-2.5, -2.0])
    # h = (pc - rc) - (pr - rr): pair 0: 1 - (-0.5) = 1.5; pair 1: 0 - 0 = 0
    losses, h = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert h.tolist() == [1.5, 0.0]
    # -log sigmoid(0.15) = log(1 + e^-0.15) = 0.620957...; at h = 0: log 2
    assert losses[0].item() == pytest.approx(math.log1p(math.exp(-0.15)), abs=1e-6)
    assert losses[0].item() == pytest.approx(0.620957, abs=1e-6)
    assert losses[1].item() == pytest.approx(math.log(2), abs=1e-6)
    # label smoothing 0.2: 0.8 * log(1 + e^-0.15) + 0.2 * log(1 + e^0.15) = 0.650957
    ls_losses, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    assert ls_losses[0].item() == pytest.approx(sigmoid_ref(1.5, 0.1, 0.2), abs=1e-6)
    assert ls_losses[0].item() == pytest.approx(0.8 * 0.620957 + 0.2 * 0.770957, abs=1e-5)
    assert ls_losses[1].item() == pytest.approx(math.log(2), abs=1e-6)  # any eps at h = 0
    # IPO: (h - 1 / (2 beta))^2 = (1.5 - 5)^2 = 12.25 and (0 - 5)^2 = 25
    ipo, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss="ipo")
    assert ipo.tolist() == pytest.approx([12.25, 25.0])
    # gradient dL/dh = -beta * sigmoid(-beta h) (eps = 0)
    hh = torch.tensor([1.5], requires_grad=True)
    dpo_loss(hh, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.1)[0].sum().backward()
    assert hh.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.15)), abs=1e-7)


def test_config_checks():
    for bad in (dict(beta=0), dict(loss="hinge"), dict(label_smoothing=0.5), dict(lr=-1),
                dict(batch_size=0), dict(warmup_ratio=1.0), dict(loss="ipo", label_smoothing=0.1),
                dict(forward="x"), dict(max_length=2)):  # fmt: skip
        with pytest.raises(ValueError, match="DPOConfig"):
            DPOConfig(**bad)


def test_schedule_and_plan():
    # W = 1 warmup step of S = 4: f = 1/2, then (4-1)/3, (4-2)/3, (4-3)/3
    assert [lr_factor(s, 4, 1) for s in range(4)] == pytest.approx([0.5, 1.0, 2 / 3, 1 / 3])
    plan = make_plan(5, DPOConfig(batch_size=2, grad_accum=2, epochs=2))
    assert [sum(len(m) for m in st) for st in plan] == [4, 1, 4, 1]
    assert sorted(i for st in plan[:2] for m in st for i in m) == list(range(5))
    assert plan == make_plan(5, DPOConfig(batch_size=2, grad_accum=2, epochs=2))
    assert len(make_plan(5, DPOConfig(batch_size=1, max_steps=3))) == 3


# ---------------------------------------------------------------------------------- log-probs


@pytest.fixture(scope="module")
def tok():
    from tiny import make_tokenizer

    return make_tokenizer("chatml")


def encoded(tokenizer, pairs=PAIRS):
    from flr_engine.evaluation.data import PairItem

    items = [PairItem(i + 1, i, [{"role": "user", "content": p}], c, r)
             for i, (p, c, r) in enumerate(pairs)]  # fmt: skip
    return encode_pairs(tokenizer, items)


def test_encode_pairs_share_prompt_and_end_with_eot(tok):
    pairs = encoded(tok)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    for p in pairs:
        assert p.chosen[: p.chosen_start] == p.rejected[: p.rejected_start]  # shared prompt
        assert p.chosen[-1] == eot and p.rejected[-1] == eot
        text = tok.decode(p.chosen[p.chosen_start : -1])
        assert text.strip() == PAIRS[p.line - 1][1]
    # truncation keeps the reply, cuts the prompt from its start
    from flr_engine.evaluation.data import PairItem

    long = PairItem(1, 1, [{"role": "user", "content": "turtles " * 40}], "Paris.", "No.")
    (p,) = encode_pairs(tok, [long], max_length=16)
    assert len(p.chosen) <= 16 and tok.decode(p.chosen[p.chosen_start :]).startswith("Paris")


@pytest.mark.parametrize("arch, family", [("llama", "chatml"), ("gemma2", "gemma")])
def test_fused_packed_matches_plain_logits_and_grads(arch, family):
    """Sequence log-probs of completions: trie + tree attention + fused log-prob (and padded +
    fused) vs full logits + log_softmax + gather; values and gradients of every parameter."""
    from tiny import make_model, make_tokenizer

    tk = make_tokenizer(family)
    model = make_model(arch, vocab_size=len(tk))
    pairs = encoded(tk)[:3]
    seqs = [s for p in pairs for s in (p.chosen, p.rejected)]
    starts = [s for p in pairs for s in (p.chosen_start, p.rejected_start)]
    weights = torch.linspace(-1, 1, len(seqs))  # a non-trivial downstream loss
    results = {}
    for fwd in ("plain", "packed", "padded"):
        model.zero_grad(set_to_none=True)
        sums, counts = completion_logprobs(model, seqs, starts, forward=fwd)
        (sums * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[fwd] = (sums.detach(), counts, grads)
    ref_sums, ref_counts, ref_grads = results["plain"]
    assert len(ref_grads) == len(list(model.parameters()))
    for fwd in ("packed", "padded"):
        sums, counts, grads = results[fwd]
        assert counts.tolist() == ref_counts.tolist()
        torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-4)
        assert grads.keys() == ref_grads.keys()
        for n, g in grads.items():
            torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-5, msg=f"{fwd}: {n}")


# ---------------------------------------------------------------------------------- training


def params_of(path_or_model):
    from transformers import AutoModelForCausalLM

    m = path_or_model
    if not isinstance(m, torch.nn.Module):
        m = AutoModelForCausalLM.from_pretrained(m)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def dpo_cli(tiny_model_dir, pairs, out, *extra):
    return main(["-q", "dpo", "--policy", str(tiny_model_dir), "--pairs", str(pairs),
                 "--out", str(out), *extra])  # fmt: skip


def test_dpo_end_to_end_loss_falls_and_every_parameter_changes(tmp_path, tiny_model_dir, capsys):
    pairs = tmp_path / "pairs.jsonl"
    # a tie row and an identical pair: skipped and counted
    write_pairs(pairs, PAIRS + [("Hi", "Same.", "Same.")])
    out = tmp_path / "run"
    rc = dpo_cli(tiny_model_dir, pairs, out, "--lr", "1e-3", "--epochs", "4", "--batch-size", "2",
                 "--beta", "0.5", "--warmup-ratio", "0", "--save-every", "3")  # fmt: skip
    assert rc == 0
    assert "1 ties skipped" in capsys.readouterr().err
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert {
        "loss",
        "margin",
        "accuracy",
        "chosen_drift",
        "rejected_drift",
        "lr",
        "grad_norm",
    } <= set(rows[0])
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference
    first, last = sum(r["loss"] for r in rows[:2]) / 2, sum(r["loss"] for r in rows[-2:]) / 2
    assert last < first - 0.05, (first, last)
    assert rows[-1]["accuracy"] == 1.0
    assert (out / "metrics.png").stat().st_size > 1000
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    before, after = params_of(tiny_model_dir), params_of(out)
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged
    # the result is usable by flr score
    from flr_engine import FLRScorer

    s = FLRScorer.from_pretrained(str(out), templates="flr-mixed", engine="reference")
    assert math.isfinite(s.score(["Hi"], ["Hello!"])[0].reward)
    # an existing run is not silently overwritten
    assert dpo_cli(tiny_model_dir, pairs, out) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_gives_the_same_parameters(tmp_path, tiny_model_dir):
    from flr_engine.models import load

    write_pairs(tmp_path / "p.jsonl")
    items, _, _ = load_pairs(str(tmp_path / "p.jsonl"))
    cfg = DPOConfig(lr=1e-3, epochs=2, batch_size=1, grad_accum=2, save_every=1, warmup_ratio=0.3)

    def run(out, **kw):
        lm = load(str(tiny_model_dir))
        pairs = encode_pairs(lm.tokenizer, items)
        res = train_dpo(lm.model, lm.tokenizer, pairs, str(out), cfg, progress=False, **kw)
        return res, lm.model

    full, model_a = run(tmp_path / "a")
    assert full.finished and full.steps == 4
    part, _ = run(tmp_path / "b", stop_after=2)
    assert not part.finished and not (tmp_path / "b" / "config.json").exists()
    rest, model_b = run(tmp_path / "b", resume=True)
    assert rest.start_step == 2 and rest.finished
    a, b = params_of(model_a), params_of(model_b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    mb = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(ma) == strip(mb)
    # a resume with other settings is refused
    with pytest.raises(ValueError, match="other settings"):
        lm = load(str(tiny_model_dir))
        train_dpo(lm.model, lm.tokenizer, encode_pairs(lm.tokenizer, items), str(tmp_path / "b"),
                  DPOConfig(lr=2e-3, epochs=2), resume=True, progress=False)  # fmt: skip


def test_lora_trains_and_saves_a_merged_plain_model(tmp_path, tiny_model_dir):
    pairs = tmp_path / "pairs.jsonl"
    write_pairs(pairs)
    out = tmp_path / "lora"
    rc = dpo_cli(tiny_model_dir, pairs, out, "--lora-r", "4", "--lr", "1e-2", "--max-steps", "2",
                 "--warmup-ratio", "0")  # fmt: skip
    assert rc == 0
    assert not (out / "adapter_config.json").exists()
    before, after = params_of(tiny_model_dir), params_of(out)
    assert before.keys() == after.keys()  # no lora_A / lora_B keys: merged
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("q_proj" in k for k in changed) and any("mlp" in k for k in changed)
    assert all("embed" not in k and "norm" not in k for k in changed)  # frozen outside LoRA
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert len(rows) == 2


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "pairs.jsonl:5: malformed JSON"),
        (json.dumps({"prompt": "hi", "chosen": "a"}), "pairs.jsonl:5: field 'rejected': missing"),
        (
            json.dumps({"prompt": "hi", "chosen": "", "rejected": "b"}),
            "pairs.jsonl:5: field 'chosen': is empty",
        ),
        (
            json.dumps(
                {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}
            ),
            "pairs.jsonl:5: field 'prompt'",
        ),
    ],
)
def test_bad_rows_name_file_line_field(tmp_path, tiny_model_dir, capsys, line, message):
    pairs = tmp_path / "pairs.jsonl"
    write_pairs(pairs, extra=[line])
    assert dpo_cli(tiny_model_dir, pairs, tmp_path / "out") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # validated before anything is written


def test_encoded_pair_needs_prompt_and_completion():
    model = torch.nn.Linear(1, 1)  # never reached: the check comes first
    p = EncodedPair(1, [1, 2], 0, [1, 2], 1)
    with pytest.raises(ValueError, match="prompt token"):
        completion_logprobs(model, [p.chosen], [p.chosen_start])


def test_ipo_and_label_smoothing_train(tmp_path, tiny_model_dir):
    """At step 1 the policy is the reference (h = 0): IPO loss = (1 / (2 beta))^2, smoothed
    sigmoid loss = log 2; both then decrease."""
    from flr_engine.models import load

    write_pairs(tmp_path / "p.jsonl")
    items, _, _ = load_pairs(str(tmp_path / "p.jsonl"))
    for cfg, first in (
        (DPOConfig(loss="ipo", beta=0.5, lr=1e-3, epochs=3, batch_size=4, warmup_ratio=0), 1.0),
        (DPOConfig(label_smoothing=0.1, beta=0.5, lr=1e-3, epochs=3, batch_size=4), math.log(2)),
    ):
        lm = load(str(tiny_model_dir))
        out = tmp_path / cfg.loss
        train_dpo(lm.model, lm.tokenizer, encode_pairs(lm.tokenizer, items), str(out), cfg,
                  progress=False, overwrite=True)  # fmt: skip
        rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
        assert rows[0]["loss"] == pytest.approx(first, abs=1e-4)
        assert rows[-1]["loss"] < rows[0]["loss"]


# ------------------------------------------------------------- FLRDPOTrainer vs TRL's DPOTrainer


def trl_args(out, **kw):
    from trl import DPOConfig as TRLConfig

    base = dict(output_dir=str(out), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-3,
                lr_scheduler_type="constant", bf16=False, gradient_checkpointing=False,
                precompute_ref_log_probs=True, report_to="none", logging_steps=1,
                save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)  # fmt: skip
    return TRLConfig(**(base | kw))


def trl_rows(pairs=PAIRS):
    return [{"prompt": [{"role": "user", "content": p}],
             "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in pairs]  # fmt: skip


@pytest.mark.parametrize("arch, family", [("llama", "chatml"), ("gemma2", "gemma")])
def test_flr_trainer_matches_trl_dpo_trainer(tmp_path, monkeypatch, arch, family):
    """The same rows, model and settings through trl.DPOTrainer and FLRDPOTrainer: the
    precomputed reference log-probs, every logged loss / log-prob / margin, and every
    parameter after 3 optimizer steps agree to float rounding; the packed forward ran (each
    batch a trie with fewer unique tokens than its rows hold)."""
    from datasets import Dataset
    from tiny import make_model, make_tokenizer
    from trl import DPOTrainer

    from flr_engine import dpo

    packs = []
    real_pack = dpo.pack_batch

    def counting(ids, mask):
        out = real_pack(ids, mask)
        packs.append((len(out["flr_pack_ids"]), int(mask.sum())))
        return out

    monkeypatch.setattr(dpo, "pack_batch", counting)
    tk = make_tokenizer(family)
    runs = {}
    for name, cls in (("trl", DPOTrainer), ("flr", dpo.FLRDPOTrainer)):
        model = make_model(arch, vocab_size=len(tk))
        tr = cls(model, args=trl_args(tmp_path / name), train_dataset=Dataset.from_list(trl_rows()),
                 processing_class=tk)  # fmt: skip
        ds = tr.train_dataset
        ref = torch.tensor([ds["ref_chosen_logps"], ds["ref_rejected_logps"]])
        tr.train()
        logs = [{k: v for k, v in h.items() if k.startswith(("loss", "logps/", "rewards/"))}
                for h in tr.state.log_history if "loss" in h]  # fmt: skip
        runs[name] = ref, dict(model.named_parameters()), logs
    (ref_a, par_a, logs_a), (ref_b, par_b, logs_b) = runs["trl"], runs["flr"]
    assert packs and all(unique < total for unique, total in packs)  # 2 reference + 3 steps
    torch.testing.assert_close(ref_b, ref_a, rtol=1e-6, atol=1e-4)
    assert len(logs_a) == len(logs_b) == 3
    for a, b in zip(logs_a, logs_b):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-4), k
    start = make_model(arch, vocab_size=len(tk)).state_dict()
    assert all(not torch.equal(p, start[n]) for n, p in par_a.items())  # every parameter moved
    # AdamW moves a parameter by about lr (1e-3) per step whatever its gradient's size, so a
    # gradient entry that rounding moves near zero shows up as up to ~lr / 10 here
    for n, p in par_a.items():
        torch.testing.assert_close(par_b[n], p, rtol=0, atol=1e-4, msg=n)
