"""Preference mining: prompts, chat-template helpers, `flr mine` end to end, resume, refusals."""

from __future__ import annotations

import gzip
import json

import pytest

from flr_engine.chat import end_of_turn_ids, generation_prompt
from flr_engine.cli import main
from flr_engine.io import RowError
from flr_engine.mining import MineConfig, prompt_seed, read_prompts

PROMPTS = [
    {"prompt": "What is the capital of France?"},
    {"prompt": [{"role": "user", "content": "How do I bake bread?"}], "id": "bread"},
    {
        "messages": [
            {"role": "user", "content": "Can you help me write a poem about the sea?"},
            {"role": "assistant", "content": "Sure."},
        ]
    },  # fmt: skip
    {"context": [{"role": "user", "content": "I like turtles."}], "chosen": "a", "rejected": "b"},
]


def write_jsonl(path, rows, extra=()):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
        for line in extra:
            fh.write(line + "\n")


def test_read_prompts_formats_and_errors(tmp_path):
    path = tmp_path / "p.jsonl.gz"
    write_jsonl(path, PROMPTS)
    rows = read_prompts(str(path))
    assert [r.line for r in rows] == [1, 2, 3, 4]
    assert rows[1].id == "bread" and rows[0].id == 1
    assert rows[2].messages == [
        {"role": "user", "content": "Can you help me write a poem about the sea?"}
    ]
    assert [r.line for r in read_prompts(str(path), limit=2)] == [1, 2]
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, PROMPTS[:1], [json.dumps({"text": "x"})])
    with pytest.raises(RowError, match=r"bad.jsonl:2: row needs 'prompt'"):
        read_prompts(str(bad))
    write_jsonl(bad, PROMPTS[:1], [json.dumps({"prompt": [{"role": "user", "content": 3}]})])
    with pytest.raises(RowError, match=r"bad.jsonl:2: field 'prompt'"):
        read_prompts(str(bad))


@pytest.mark.parametrize("family, eot", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>"),
                                         ("mistral", "</s>"), ("gemma", "<end_of_turn>")])  # fmt: skip
def test_end_of_turn_and_generation_prompt(family, eot):
    from tiny import make_tokenizer

    tok = make_tokenizer(family)
    assert tok.convert_tokens_to_ids(eot) in end_of_turn_ids(tok)
    msgs = [{"role": "user", "content": "Hi"}]
    prefix = generation_prompt(tok, msgs)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "Yo"}], tokenize=False)
    assert full.startswith(prefix) and full[len(prefix) :].startswith("Yo")


def test_config_and_seed():
    with pytest.raises(ValueError, match="num_samples"):
        MineConfig(num_samples=1)
    with pytest.raises(ValueError, match="top_p"):
        MineConfig(top_p=0)
    assert prompt_seed(0, 1) == prompt_seed(0, 1) != prompt_seed(0, 2) != prompt_seed(1, 1)


def mine_cli(model_dir, prompts, out, *extra):
    return main(["-q", "mine", "--policy", str(model_dir), "--prompts", str(prompts),
                 "--out", str(out), "--num-samples", "4", "--max-new-tokens", "8",
                 "--templates", "flr-mixed", "--temperature", "1.0", "--top-p", "1.0",
                 *extra])  # fmt: skip


def read(path):
    return [json.loads(x) for x in open(path)]


def test_mine_end_to_end_resume_and_refusal(tmp_path, tiny_model_dir, capsys, monkeypatch):
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "pairs.jsonl"
    write_jsonl(prompts, PROMPTS)
    assert mine_cli(tiny_model_dir, prompts, out) == 0
    rows = read(out)
    skipped = read(str(out) + ".skipped.jsonl")
    assert sorted(r["line"] for r in rows + skipped) == [1, 2, 3, 4]
    assert rows, "a random tiny policy still gives distinct samples"
    for r in rows:
        assert set(r) >= {"prompt", "chosen", "rejected", "scores", "samples", "line"}
        assert r["prompt"][-1]["role"] == "user"
        assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
        c, j = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert c != j and len(set(r["samples"])) == len(r["samples"]) >= 2
        assert len(r["scores"]) == len(r["samples"])
        assert c == r["samples"][r["scores"].index(max(r["scores"]))]
        assert j == r["samples"][r["scores"].index(min(r["scores"]))]
        assert r["margin"] == pytest.approx(max(r["scores"]) - min(r["scores"])) and r["margin"] > 0
    # the rows are valid DPO input
    from flr_engine.dpo import load_pairs

    assert len(load_pairs(str(out))[0]) == len(rows)
    # resume: drop the last row (and tear the file); rerun: the same rows, nothing duplicated
    lines = open(out).read().splitlines(keepends=True)
    with open(out, "w") as fh:
        fh.write("".join(lines[:-1]) + lines[-1][:10])
    capsys.readouterr()
    assert mine_cli(tiny_model_dir, prompts, out) == 0
    assert read(out) == rows  # per-prompt seeding: identical samples and scores
    assert "3 already done before" in capsys.readouterr().err  # only the torn prompt redone
    # other settings are refused, before any model loads, and the file is untouched
    import flr_engine.models

    loads = []
    monkeypatch.setattr(flr_engine.models, "load", lambda *a, **k: loads.append(a) or 1 / 0)
    before = open(out).read()
    assert mine_cli(tiny_model_dir, prompts, out, "--seed", "1") == 2
    assert open(out).read() == before and loads == []


def test_min_margin_skips_and_counts(tmp_path, tiny_model_dir, capsys):
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "pairs.jsonl"
    write_jsonl(prompts, PROMPTS[:2])
    assert mine_cli(tiny_model_dir, prompts, out, "--min-margin", "1e9") == 0
    assert read(out) == []
    skipped = read(str(out) + ".skipped.jsonl")
    assert len(skipped) == 2 and all("reason" in s for s in skipped)
    assert "0 pairs written" in capsys.readouterr().err


def test_policy_without_chat_template(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoTokenizer

    bare = tmp_path / "bare"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    tok.save_pretrained(bare)
    for f in tiny_model_dir.iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            (bare / f.name).write_bytes(f.read_bytes())
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "pairs.jsonl"
    write_jsonl(prompts, PROMPTS[:1])
    assert mine_cli(bare, prompts, out) == 2
    assert "no chat template: pass --chat-template" in capsys.readouterr().err
    from tiny import CHAT_TEMPLATES

    tpl = tmp_path / "chatml.jinja"
    tpl.write_text(CHAT_TEMPLATES["chatml"])
    assert mine_cli(bare, prompts, tmp_path / "pairs2.jsonl", "--chat-template", str(tpl)) == 0
