"""FLRReward inside TRL itself: a real GRPOTrainer (tiny random policy, CPU) runs two steps
with FLRReward as its reward function; the rewards it logs equal FLRScorer's (the reference
backend, an independent code path) for the same completions. Skipped without trl."""

from __future__ import annotations

import copy
import math

import pytest
from tiny import make_model, make_tokenizer

from flr_engine import FLRReward, FLRScorer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

PROMPTS = [
    "What is the capital of France?",
    "How do I bake bread?",
    "Can you help me write a poem about the sea?",
    "Tell me about turtles.",
]


class Recording(FLRReward):
    """FLRReward that keeps what the trainer passed and what it returned."""

    def __call__(self, prompts, completions, **kwargs):
        out = super().__call__(prompts, completions, **kwargs)
        self.calls.append((prompts, completions, sorted(kwargs), out))
        return out


def test_grpo_trainer_two_steps_logs_flr_rewards(tmp_path):
    tok = copy.deepcopy(make_tokenizer("chatml"))
    tok.pad_token = "<|endoftext|>"
    policy = make_model("llama", vocab_size=len(tok), seed=1)
    judge = make_model("llama", vocab_size=len(tok), seed=2)
    reward = Recording(scorer=FLRScorer(judge, tok, templates="flr-mixed"))
    reward.calls = []
    data = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS]})
    args = trl.GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
        max_completion_length=12, max_steps=2, logging_steps=1, learning_rate=1e-3,
        report_to="none", use_cpu=True, bf16=False, save_strategy="no", seed=0,
    )  # fmt: skip
    trainer = trl.GRPOTrainer(
        model=policy, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok
    )
    trainer.train()

    reference = FLRScorer(judge, tok, templates="flr-mixed", engine="reference")
    steps = [h for h in trainer.state.log_history if "rewards/flr_reward/mean" in h]
    assert len(reward.calls) == 2 and len(steps) == 2
    for (prompts, completions, kwargs, out), logged in zip(reward.calls, steps):
        assert {"completion_ids", "trainer_state", "log_extra", "log_metric"} <= set(kwargs)
        assert isinstance(completions[0], list)  # conversational completions
        ok = [i for i, r in enumerate(out) if r is not None]
        want = reference.score([prompts[i] for i in ok], [completions[i] for i in ok])
        print(f"step rewards: {[round(r, 4) if r is not None else None for r in out]}")
        assert [out[i] for i in ok] == pytest.approx([r.reward for r in want], abs=1e-4)
        assert logged["rewards/flr_reward/mean"] == pytest.approx(sum(r.reward for r in want) / len(want), abs=1e-4)
        dims = reference.templates.dimension_names
        for d in dims:  # per-dimension means reach the trainer's logs through log_metric
            assert logged[f"flr/{d}"] == pytest.approx(sum(r.per_dimension[d]["reward"] for r in want) / len(want), abs=1e-4)
    # the trainer's completions table holds the last batch: the same rewards, for the same texts
    table = list(trainer._logs["rewards"]["flr_reward"])
    last_prompts, last_completions, _, last_out = reward.calls[-1]
    assert list(trainer._logs["completion"]) == list(last_completions)
    assert [None if math.isnan(x) else x for x in table] == pytest.approx(last_out, abs=1e-6)
