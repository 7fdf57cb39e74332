"""flr dpo: FLRDPOTrainer against TRL's DPOTrainer, the packed batch, the command end to end
(YAML config, resume, LoRA), bad rows."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flr_engine import dpo
from flr_engine.cli import main
from flr_engine.dpo import encode_pairs, load_pairs, pack_batch

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


def test_pack_batch_shares_prompts_and_maps_every_token():
    """A right-padded batch (chosen rows, then rejected rows) -> one trie: shared starts are
    one node, each row's tokens map to nodes holding the same token at depth = position."""
    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 9, 0, 0], [5, 6, 7, 3, 4], [1, 2, 0, 0, 0]])
    mask = (torch.arange(5) < torch.tensor([4, 3, 5, 2])[:, None]).long()
    out = pack_batch(ids, mask)
    node, tok, pos = out["flr_pack_node"], out["flr_pack_ids"], out["flr_pack_positions"]
    assert len(tok) == 9  # 5 6 7 8 | 9 | 3 4 | 1 2: 14 real tokens, 5 shared
    for i, n in enumerate(mask.sum(1).tolist()):
        assert torch.equal(tok[node[i, :n]], ids[i, :n])
        assert torch.equal(pos[node[i, :n]], torch.arange(n))
    with pytest.raises(ValueError, match="right-padded"):
        pack_batch(ids, mask.flip(1))


def packed_vs_padded(model, vocab: int, device: str = "cpu"):
    """Per-token completion log-probs of 3 pairs sharing a 37-token prompt (right-padded
    batch: chosen rows, then rejected rows) through TRL's fused LM head, with the padded
    batch and with the packed trie; for each: (log-probs of the completion tokens, the
    gradient of every parameter under a non-trivial downstream loss)."""
    from trl.trainer.utils import add_fused_lm_head

    from flr_engine.dpo import PackedPreferenceCollator, add_packed_forward

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (37,), generator=g).tolist()
    rows = [{"prompt_ids": prompt, "chosen_ids": torch.randint(0, vocab, (n,), generator=g).tolist(),
             "rejected_ids": torch.randint(0, vocab, (m,), generator=g).tolist()}
            for n, m in ((11, 5), (23, 17), (3, 29))]  # fmt: skip
    add_fused_lm_head(model)
    add_packed_forward(model)
    batch = {k: v.to(device) for k, v in PackedPreferenceCollator(pad_token_id=0)(rows).items()}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    mask = batch["completion_mask"][:, 1:].bool()
    weights = torch.linspace(-1, 1, mask.shape[0], device=device)[:, None]
    results = []
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        keys = ("input_ids", "attention_mask", *(dpo.PACK_KEYS if packed else ()))
        lp = model(**{k: batch[k] for k in keys}, labels=labels, fused_lm_head=True).log_probs
        (lp * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((lp.detach()[mask], grads))
    return results


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_packed_backbone_matches_padded_values_and_gradients(arch):
    """The packed trie (each prompt once, tree attention) vs TRL's padded batch, through the
    same fused LM head: completion log-probs and every parameter's gradient."""
    from tiny import make_model

    model = make_model(arch, vocab_size=613)
    (ref, ref_grads), (got, grads) = packed_vs_padded(model, vocab=613)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    for n, gr in grads.items():
        torch.testing.assert_close(gr, ref_grads[n], rtol=1e-4, atol=1e-5, msg=n)


# ------------------------------------------------------------- FLRDPOTrainer vs TRL's DPOTrainer


def trl_args(out, **kw):
    from trl import DPOConfig as TRLConfig

    from flr_engine.cli.dpo import _no_checkpointing

    base = dict(output_dir=str(out), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-3,
                lr_scheduler_type="constant", bf16=False, precompute_ref_log_probs=True,
                report_to="none", logging_steps=1, save_strategy="no", use_cpu=True,
                disable_tqdm=True, seed=0, **_no_checkpointing(TRLConfig))  # fmt: skip
    return TRLConfig(**(base | kw))


def trl_rows(pairs=PAIRS):
    return [{"prompt": [{"role": "user", "content": p}],
             "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in pairs]  # fmt: skip


@pytest.mark.parametrize("arch, family", [("llama", "chatml"), ("gemma2", "gemma")])
def test_flr_trainer_matches_trl_dpo_trainer(tmp_path, monkeypatch, arch, family):
    """The same rows, model and settings through trl.DPOTrainer and FLRDPOTrainer: the
    precomputed reference log-probs, every logged loss / log-prob / margin (and TRL's other
    metrics: entropy, mean logits, token accuracy), and every parameter after 3 optimizer
    steps agree to float rounding; the packed forward ran (each batch a trie with fewer unique
    tokens than its rows hold)."""
    from datasets import Dataset
    from tiny import make_model, make_tokenizer
    from trl import DPOTrainer

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
        if name == "flr":  # TRL's head scored only the trie's completion rows
            assert model.forward._flr_packed_head
        logs = [{k: v for k, v in h.items() if k.startswith(("loss", "logps/", "rewards/",
                                                              "entropy", "logits/", "mean_token"))}
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


# ---------------------------------------------------------------------------- the command


def params_of(path_or_model):
    from transformers import AutoModelForCausalLM

    m = path_or_model
    if not isinstance(m, torch.nn.Module):
        m = AutoModelForCausalLM.from_pretrained(m)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def dpo_cli(tiny_model_dir, pairs, out, *extra):
    return main(["-q", "dpo", "--policy", str(tiny_model_dir), "--pairs", str(pairs),
                 "--output_dir", str(out), "--report_to", "none", *extra])  # fmt: skip


def logged(out):
    with open(out / "trainer_state.json") as fh:
        return [h for h in json.load(fh)["log_history"] if "loss" in h]


def test_dpo_end_to_end_with_a_yaml_config(tmp_path, tiny_model_dir, capsys):
    """YAML settings, command-line overrides, ties skipped and counted, the loss falls from
    log 2, every parameter changes, TRL's checkpoints, a plain model folder that flr score
    loads, and no silent overwrite of a finished run."""
    pairs = tmp_path / "pairs.jsonl"
    write_pairs(pairs, PAIRS + [("Hi", "Same.", "Same.")])  # identical: skipped and counted
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text("learning_rate: 1.0e-3\nnum_train_epochs: 4\nper_device_train_batch_size: 2\n"
                   "beta: 0.5\nlogging_steps: 1\nsave_steps: 3\nlr_scheduler_type: constant\n"
                   "seed: 3\n")  # fmt: skip
    out = tmp_path / "run"
    assert dpo_cli(tiny_model_dir, pairs, out, "--config", str(cfg), "--save_steps", "4") == 0
    assert "1 ties skipped" in capsys.readouterr().err
    rows = logged(out / "checkpoint-8")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference
    assert rows[0]["learning_rate"] == pytest.approx(1e-3)  # from the YAML
    first, last = sum(r["loss"] for r in rows[:2]) / 2, sum(r["loss"] for r in rows[-2:]) / 2
    assert last < first - 0.05, (first, last)
    assert rows[-1]["rewards/accuracies"] == 1.0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    before, after = params_of(tiny_model_dir), params_of(out)
    assert before.keys() == after.keys()
    assert not [k for k in before if torch.equal(before[k], after[k])]
    cfg_json = json.loads((out / "config.json").read_text())
    assert "flr_tree" not in json.dumps(cfg_json)  # the routed attention is not saved
    from flr_engine import FLRScorer

    s = FLRScorer.from_pretrained(str(out), templates="flr-mixed", engine="reference")
    assert math.isfinite(s.score(["Hi"], ["Hello!"])[0].reward)
    assert dpo_cli(tiny_model_dir, pairs, out) == 2  # an existing run is not overwritten
    assert "--resume_from_checkpoint last" in capsys.readouterr().err


def test_resume_from_checkpoint_gives_the_same_parameters(tmp_path, tiny_model_dir):
    """Stopped after step 2 of 4 (a callback), resumed with TRL's resume_from_checkpoint:
    the same parameters and logged losses as one uninterrupted run."""
    from transformers import TrainerCallback

    from flr_engine.dpo import run_dpo
    from flr_engine.models import load

    write_pairs(tmp_path / "p.jsonl")
    items, _, _ = load_pairs(str(tmp_path / "p.jsonl"))

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                control.should_training_stop = True

    def run(out, **kw):
        lm = load(str(tiny_model_dir))
        args = trl_args(out, max_steps=-1, num_train_epochs=2, per_device_train_batch_size=1,
                        gradient_accumulation_steps=2, save_strategy="steps", save_steps=1,
                        lr_scheduler_type="linear", warmup_steps=0.3)  # fmt: skip
        res = run_dpo(lm.model, lm.tokenizer, encode_pairs(lm.tokenizer, items), args, **kw)
        return res, lm.model

    full, model_a = run(tmp_path / "a")
    assert full.steps == 4
    run(tmp_path / "b", callbacks=[StopAt()])
    rest, model_b = run(tmp_path / "b", resume="last")
    assert rest.start_step == 2 and rest.steps == 4
    a, b = params_of(model_a), params_of(model_b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    la, lb = logged(tmp_path / "a" / "checkpoint-4"), logged(tmp_path / "b" / "checkpoint-4")
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], abs=1e-6)
    # a resume that would compute something else is refused, naming the difference
    lm = load(str(tiny_model_dir))
    with pytest.raises(ValueError, match="other settings .*learning_rate: 0.001 -> 0.002"):
        run_dpo(lm.model, lm.tokenizer, encode_pairs(lm.tokenizer, items),
                trl_args(tmp_path / "b", learning_rate=2e-3), resume="last")  # fmt: skip


def test_lora_trains_and_saves_a_merged_plain_model(tmp_path, tiny_model_dir):
    pairs = tmp_path / "pairs.jsonl"
    write_pairs(pairs)
    out = tmp_path / "lora"
    rc = dpo_cli(tiny_model_dir, pairs, out, "--lora_r", "4", "--learning_rate", "1e-2",
                 "--max_steps", "2", "--logging_steps", "1")  # fmt: skip
    assert rc == 0
    assert not (out / "adapter_config.json").exists()
    before, after = params_of(tiny_model_dir), params_of(out)
    assert before.keys() == after.keys()  # no lora_A / lora_B keys: merged
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("q_proj" in k for k in changed) and any("mlp" in k for k in changed)
    assert all("embed" not in k and "norm" not in k for k in changed)  # frozen outside LoRA


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
