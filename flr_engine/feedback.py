"""Feedback fine-tuning of the follow-up model (``flr feedback-tune``), the paper's third part.

A feedback row ``{context, response, feedback}`` is a user's natural-language reaction to a
reply. Supervised fine-tuning on it, with the loss on the feedback tokens only, teaches the
follow-up model which reactions follow which replies, so that FLR's positive and negative
follow-ups separate good replies from bad ones better.

Each row is rendered by the *same* renderer that scores (:func:`flr_engine.chat_formats.
make_renderer`): the tokens the loss covers are exactly the tokens FLR scores afterwards
(``ScoredSequence.targets``), so training and scoring tokenisation agree by construction::

    input_ids = renderer.build(context, response, [feedback])[0].ids
    labels[n] = input_ids[n]  for n in targets,  -100 elsewhere
    loss      = mean over labelled n of -log p(input_ids[n] | input_ids[:n])

Formats: ``follow-up`` (the feedback is the user's next turn) and ``role-swapped`` (the
paper's released fine-tuned scorer; see :mod:`flr_engine.chat_formats`). The training loop
is TRL's ``SFTTrainer`` (pre-tokenised rows with a ``labels`` column) with a peft LoRA
adapter, or full fine-tuning; checkpoints are TRL's (``--resume``).

:func:`build_feedback_mix` turns ``../shared/data/train`` into feedback rows (natural
feedback + preference pairs turned into a positive reaction after ``chosen`` and a
negative one after ``rejected``) and holds out pairs for the calibration fit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field

from flr_engine.chat import ContextTooLongError, InputError, normalize_conversation, normalize_reply
from flr_engine.chat_formats import FORMATS, make_renderer
from flr_engine.errors import ConfigError
from flr_engine.io import (
    InputFileError,
    OutputConflictError,
    RowError,
    atomic_write_text,
    lock_exclusive,
    read_jsonl,
)

log = logging.getLogger("flr_engine.feedback")

IGNORE = -100


# --------------------------------------------------------------------------------------
# rows and encoding
# --------------------------------------------------------------------------------------


@dataclass
class FeedbackRow:
    context: list[dict]
    response: str
    feedback: str
    line: int = 0
    source: str = ""


def parse_feedback_row(path: str, line: int, obj: dict) -> FeedbackRow:
    """Validate one ``{context, response, feedback}`` row (RowError names file:line:field)."""
    try:
        ctx = normalize_conversation(obj.get("context", obj.get("prompt")), "context")
        rep = normalize_reply(obj.get("response", obj.get("completion")), "response")
    except InputError as exc:
        raise RowError(path, line, exc.field, exc.message) from None
    fb = obj.get("feedback")
    if not isinstance(fb, str) or not fb.strip():
        raise RowError(path, line, "feedback", "must be a non-empty string")
    return FeedbackRow(ctx, rep, fb.strip(), line, str(obj.get("source", "")))


def load_feedback_rows(path: str, limit: int | None = None) -> list[FeedbackRow]:
    rows = []
    for line, obj in read_jsonl(path):
        rows.append(parse_feedback_row(path, line, obj))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise InputFileError(f"{path}: no feedback rows")
    return rows


def encode_row(renderer, row: FeedbackRow) -> dict:
    """``{"input_ids", "labels"}`` of one row: labels are the ids on the feedback's scored
    tokens (the renderer's targets) and -100 elsewhere."""
    seq = renderer.build(row.context, row.response, [row.feedback])[0]
    labels = [IGNORE] * len(seq.ids)
    for n in seq.targets:
        labels[n] = seq.ids[n]
    return {"input_ids": list(seq.ids), "labels": labels}


def encode_feedback(
    tokenizer, rows: list[FeedbackRow], fmt: str = "follow-up", max_length: int | None = None,
    path: str = "",
) -> tuple[list[dict], int]:  # fmt: skip
    """Encode rows in format ``fmt``; rows that cannot fit ``max_length`` (reply + feedback
    alone too long) are skipped and counted. Returns ``(encoded, skipped)``."""
    renderer = make_renderer(fmt, tokenizer, max_length=max_length)
    out, skipped = [], 0
    for r in rows:
        try:
            out.append(encode_row(renderer, r))
        except ContextTooLongError as exc:
            skipped += 1
            log.info("skipping %s:%d: %s", path, r.line, exc)
    if not out:
        raise InputFileError(f"{path}: no row fits max_length={max_length}")
    return out, skipped


# --------------------------------------------------------------------------------------
# training (TRL SFTTrainer + peft LoRA)
# --------------------------------------------------------------------------------------


@dataclass
class FeedbackTuneConfig:
    """Settings of ``flr feedback-tune`` (one CLI flag per field)."""

    format: str = field(
        default="follow-up",
        metadata={"help": "follow-up: feedback as the user's next turn (what FLR scores); "
                  "role-swapped: the paper's released fine-tuned scorer", "choices": FORMATS},
    )  # fmt: skip
    objective: str = field(
        default="sft",
        metadata={"help": "sft: the loss on the feedback tokens of feedback rows; pairwise: "
                  "preference pairs, -log sigmoid(beta * FLR margin) with --reactions "
                  "(flr_engine.pairwise_tune)", "choices": ["sft", "pairwise"]},
    )  # fmt: skip
    reactions: str = field(
        default="flr-helpfulness",
        metadata={"help": "pairwise: template set(s) the reactions are drawn from (names or "
                  "files, comma-separated; every dimension pooled)"},
    )  # fmt: skip
    reactions_per_reply: int = field(
        default=8, metadata={"help": "pairwise: k positive and k negative reactions per pair"}
    )
    beta: float = field(default=1.0, metadata={"help": "pairwise: scale of the margin in the loss"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_targets: str = field(
        default="all-linear", metadata={"help": "peft target_modules: all-linear or a comma list"}
    )
    lora_layers: int = field(
        default=0,
        metadata={"help": "adapt only the top N decoder layers (0: all); backward then stops "
                  "there, which makes a CPU step cheaper"},
    )  # fmt: skip
    max_seconds: float = field(
        default=0.0,
        metadata={"help": "stop (and save) after this much training time (0: no limit)"},
    )  # fmt: skip
    full: bool = field(default=False, metadata={"help": "full fine-tuning instead of LoRA", "type": bool})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate (linear decay, warm-up)"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "warm-up fraction of the steps"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the rows"})
    max_steps: int = field(default=-1, metadata={"help": "stop after N optimizer steps (-1: epochs)"})
    batch_size: int = field(default=8, metadata={"help": "rows per device step"})
    grad_accum: int = field(default=1, metadata={"help": "device steps per optimizer step"})
    max_length: int = field(
        default=512, metadata={"help": "token limit per row (context truncated first, as in scoring)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of shuffling and init"})
    save_steps: int = field(default=50, metadata={"help": "checkpoint every N steps"})
    logging_steps: int = field(default=5, metadata={"help": "log metrics every N steps"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (CPUs with avx512_bf16, GPUs)", "type": bool})
    adapter_dtype: str = field(
        default="float32",
        metadata={"help": "dtype the final LoRA weights are stored in (bfloat16 halves the size)",
                  "choices": ["float32", "bfloat16", "float16"]},
    )  # fmt: skip

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError(f"--format must be one of {FORMATS}, got {self.format!r}")
        if self.objective not in ("sft", "pairwise"):
            raise ConfigError(f"--objective must be sft or pairwise, got {self.objective!r}")
        if self.objective == "pairwise" and self.bf16:
            raise ConfigError("--bf16 is not supported with --objective pairwise (fp32 only)")
        if self.beta <= 0:
            raise ConfigError(f"--beta must be > 0, got {self.beta}")
        for name in ("lora_r", "reactions_per_reply", "batch_size", "grad_accum", "max_length", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lora_layers < 0 or self.max_seconds < 0:
            raise ConfigError("--lora-layers and --max-seconds must be >= 0")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.max_steps < 0 and self.epochs <= 0:
            raise ConfigError("give --epochs > 0 or --max-steps >= 1")


@dataclass
class TuneResult:
    out_dir: str
    steps: int
    start_step: int
    rows: int
    skipped: int
    seconds: float
    first_loss: float | None
    last_loss: float | None


def _last_checkpoint(out: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(out) if os.path.isdir(out) else None


def _shrink_adapter(folder: str, dtype: str) -> None:
    """Store the saved adapter's weights in ``dtype`` (peft casts them back on load)."""
    import torch
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, "adapter_model.safetensors")
    if dtype == "float32" or not os.path.exists(path):
        return
    sd = load_file(path)
    save_file({k: v.to(getattr(torch, dtype)).contiguous() for k, v in sd.items()}, path,
              metadata={"format": "pt"})  # fmt: skip


def train_feedback(
    model,
    tokenizer,
    encoded: list[dict],
    out: str,
    cfg: FeedbackTuneConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    settings: dict | None = None,
    skipped: int = 0,
    progress: bool = True,
    callbacks: list | None = None,
    collator=None,
) -> TuneResult:
    """SFT of ``model`` on pre-encoded rows (:func:`encode_feedback`) with TRL's SFTTrainer.

    ``out`` receives TRL's ``checkpoint-N/`` folders (resumable), ``metrics.jsonl`` (one
    line per logging step), the final model (LoRA: ``adapter_model.safetensors`` +
    ``adapter_config.json``; full: a plain model folder), the tokenizer, and
    ``flr_feedback.json`` (format, base model, data, settings, steps, time, losses), which
    :func:`flr_engine.models.load` reads to score in the right format.
    """
    os.makedirs(out, exist_ok=True)
    lock = lock_exclusive(os.path.join(os.path.realpath(out), "run"), what=out)  # one run per folder
    try:
        ckpt = _prepare_out(out, _run_identity(cfg, encoded, settings), resume, overwrite)
        return _train(model, tokenizer, encoded, out, cfg, ckpt, resume, settings, skipped,
                      progress, callbacks, collator)  # fmt: skip
    finally:
        if lock is not None:
            lock.close()


_RUN_FILE = "flr_feedback_run.json"  # written first: marks the folder as ours, keys a resume
_NOT_IDENTITY = ("resume", "overwrite", "quiet", "max_seconds")  # may change across a resume


def _run_identity(cfg: FeedbackTuneConfig, encoded: list[dict], settings: dict | None) -> dict:
    """What a resumed run must share with the first: config, settings, the encoded rows."""
    import hashlib

    rows = hashlib.sha256(json.dumps([e.get("input_ids", e) for e in encoded]).encode()).hexdigest()
    conf = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_IDENTITY}
    sets = dict(settings or {})
    sets["args"] = {k: v for k, v in sets.get("args", {}).items() if k not in _NOT_IDENTITY}
    return {"config": conf, "settings": sets, "rows_sha256": rows}


def _prepare_out(out: str, identity: dict, resume: bool, overwrite: bool) -> str | None:
    """Check ``out`` before training; return the checkpoint to resume from (or None).

    A non-empty folder that is not a feedback-tune run is never written into or removed;
    an earlier run needs ``--resume`` (same identity only) or ``--overwrite``."""
    import shutil

    run_file = os.path.join(out, _RUN_FILE)
    entries = [e for e in os.listdir(out) if e != "run.lock"]
    ours = os.path.exists(run_file)
    if entries and not ours:
        raise OutputConflictError(
            f"--out {out} is not empty and holds no feedback-tune run: choose a new or empty "
            "folder (nothing there was changed)"
        )
    if ours and overwrite:
        for e in entries:
            path = os.path.join(out, e)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        ours = False
    if ours and not resume:
        raise OutputConflictError(
            f"{out} holds a feedback-tune run: pass --resume to continue it or --overwrite to "
            "start over"
        )
    if ours:
        with open(run_file, encoding="utf-8") as fh:
            old = json.load(fh)
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        if diff:
            raise OutputConflictError(
                f"{out} was trained with other {', '.join(diff)}; resuming would mix two runs. "
                "Use another --out, or --overwrite to start over"
            )
    atomic_write_text(run_file, json.dumps(identity, indent=1, sort_keys=True))
    ckpt = _last_checkpoint(out) if resume else None
    metrics = os.path.join(out, "metrics.jsonl")
    if os.path.exists(metrics):  # keep only what the resumed checkpoint had logged
        step = 0
        if ckpt:
            with open(os.path.join(ckpt, "trainer_state.json"), encoding="utf-8") as fh:
                step = json.load(fh)["global_step"]
        with open(metrics, encoding="utf-8") as fh:
            kept = [x for x in fh if x.endswith("\n") and json.loads(x)["step"] <= step]
        atomic_write_text(metrics, "".join(kept))
    return ckpt


def _train(model, tokenizer, encoded, out, cfg, ckpt, resume, settings, skipped, progress,
           callbacks, collator) -> TuneResult:  # fmt: skip
    from datasets import Dataset
    from transformers import TrainerCallback

    metrics_path = os.path.join(out, "metrics.jsonl")

    class _Metrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                with open(metrics_path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    class _TimeBudget(TrainerCallback):
        def __init__(self):
            self.t0 = time.time()

        def on_step_end(self, args, state, control, **kw):
            if cfg.max_seconds and time.time() - self.t0 > cfg.max_seconds:
                log.warning("--max-seconds %.0f reached at step %d: stopping", cfg.max_seconds,
                            state.global_step)  # fmt: skip
                control.should_training_stop = True
                control.should_save = True

    peft_config = None
    if not cfg.full:
        from peft import LoraConfig

        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else cfg.lora_targets.split(",")
        layers = None
        if cfg.lora_layers:
            n = model.config.num_hidden_layers
            layers = list(range(max(0, n - cfg.lora_layers), n))
            if targets == "all-linear":  # peft needs module names with layers_to_transform
                import torch

                targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                                  if isinstance(m, torch.nn.Linear) and ".layers." in name})  # fmt: skip
        peft_config = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=targets, task_type="CAUSAL_LM", layers_to_transform=layers,
        )  # fmt: skip
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    common = dict(
        output_dir=out,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_ratio,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        save_total_limit=2,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.bf16,
        report_to="none",
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        use_cpu=next(model.parameters()).device.type == "cpu",
        save_only_model=False,
    )  # fmt: skip
    callbacks = [_Metrics(), _TimeBudget(), *(callbacks or [])]
    model.train()
    if cfg.objective == "pairwise":
        from transformers import TrainingArguments

        from flr_engine.pairwise_tune import trainer_class

        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        trainer = trainer_class()(
            model=model, args=TrainingArguments(remove_unused_columns=False, **common),
            train_dataset=Dataset.from_list(encoded), data_collator=collator,
            callbacks=callbacks, beta=cfg.beta,
        )  # fmt: skip
    else:
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(
            max_length=None,  # rows are already fitted by the renderer's truncation policy
            **_no_checkpointing(),  # TRL enables it by default; a 135M model does not need it
            **common,
        )  # fmt: skip
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(encoded),
            processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks,
        )  # fmt: skip
    start = 0
    if resume and ckpt:
        with open(os.path.join(ckpt, "trainer_state.json"), encoding="utf-8") as fh:
            start = json.load(fh)["global_step"]
        log.info("resuming from %s (step %d)", ckpt, start)
    t0 = time.time()
    trainer.train(resume_from_checkpoint=ckpt if (resume and ckpt) else None)
    seconds = time.time() - t0
    trainer.save_model(out)
    tokenizer.save_pretrained(out)
    if not cfg.full:
        _shrink_adapter(out, cfg.adapter_dtype)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    res = TuneResult(
        out, trainer.state.global_step, start, len(encoded), skipped, seconds,
        losses[0] if losses else None, losses[-1] if losses else None,
    )  # fmt: skip
    meta = {
        "format": cfg.format,
        "base": (settings or {}).get("model"),
        "kind": "full" if cfg.full else "lora",
        "config": dataclasses.asdict(cfg),
        "settings": settings or {},
        "rows": len(encoded),
        "skipped_rows": skipped,
        "steps": res.steps,
        "resumed_from_step": start,
        "train_seconds_this_run": round(seconds, 1),
        "first_logged_loss": res.first_loss,
        "last_logged_loss": res.last_loss,
        "versions": _versions(),
    }
    with open(os.path.join(out, "flr_feedback.json"), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1)
    return res


def _no_checkpointing() -> dict:
    """Activation checkpointing off, under the argument name this transformers uses."""
    from trl import SFTConfig

    names = {f.name for f in dataclasses.fields(SFTConfig)}
    return {k: False for k in ("activation_checkpointing", "gradient_checkpointing") if k in names}


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "trl", "peft", "flr-engine"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------------------
# training data from ../shared/data/train
# --------------------------------------------------------------------------------------

# Reactions written for the pair-derived rows. Deliberately in neither shipped template
# set's wording (flr-helpfulness, flr-mixed), so that evaluating with either set measures
# a learned preference, not memorised template strings (checked by tests/test_feedback.py).
PAIR_POSITIVE = (
    "Great, thank you, this helps a lot.",
    "Nice, that answers it.",
    "Perfect, this is really useful.",
    "Thanks! That makes sense to me now.",
    "Wow, that's a great answer.",
    "Got it, thanks for explaining it so well.",
    "Awesome, this is just right.",
    "This is great, thank you so much!",
    "Thanks, that solved my problem.",
    "Good answer, I appreciate it.",
    "Oh, that's helpful. Thanks!",
    "Brilliant, now I know what to do.",
    "Thank you, that was clear and to the point.",
    "That works for me, thanks a lot.",
    "Excellent, this covers everything.",
    "Great explanation, thanks.",
)
PAIR_NEGATIVE = (
    "Hmm, that doesn't help me at all.",
    "No, that's wrong.",
    "That isn't an answer to my question.",
    "Ugh, this is useless.",
    "That makes no sense.",
    "You missed the point completely.",
    "Can you try again? That was not helpful.",
    "This is incorrect, please check it.",
    "Why are you talking about that?",
    "That's a bad answer.",
    "No, that doesn't work.",
    "I asked something else.",
    "This is confusing and unhelpful.",
    "That's not right at all.",
    "Well, that was pointless.",
    "Please actually answer the question.",
)
FQA_POLARITY = {"Excellent": 1, "Acceptable": 1, "Could be Improved": -1, "Bad": -1}


def _read_all(path: str) -> list[dict]:
    return [row for _, row in read_jsonl(path)]


def _clip_words(text: str, n: int) -> str:
    """The first ``n`` words of ``text`` (whitespace kept inside), "..." marks a cut."""
    words = text.split()
    if len(words) <= n:
        return text
    return " ".join(words[:n]) + " ..."


def _shuffled_pairs(train_dir: str, rng: random.Random) -> list[dict]:
    """Every usable pair of ``train_dir/pairs/*`` (files in name order), shuffled by ``rng``."""
    pdir = os.path.join(train_dir, "pairs")
    pairs = []
    for name in sorted(os.listdir(pdir)):
        pairs += _read_all(os.path.join(pdir, name))
    pairs = [p for p in pairs if p.get("chosen", "").strip() and p.get("rejected", "").strip()
             and p["chosen"] != p["rejected"]]  # fmt: skip
    rng.shuffle(pairs)
    return pairs


def _clip_context(context: list[dict], words: int) -> list[dict]:
    """A copy of ``context`` whose last turn keeps its last ``words`` words."""
    c = [dict(m) for m in context]
    c[-1]["content"] = " ".join(c[-1]["content"].split()[-words:])
    return c


def build_pair_split(train_dir: str, cfg: MixConfig) -> tuple[list[dict], list[dict]]:
    """``(train_pairs, calib_pairs)`` for ``--objective pairwise``: the same shuffle and the
    same held-out calibration pairs as :func:`build_feedback_mix` (same seed), then *every*
    other pair, replies cut to ``reply_words`` and the last user turn to ``context_words``
    (pairs whose cut replies coincide are dropped)."""
    pairs = _shuffled_pairs(train_dir, random.Random(cfg.seed))
    calib, out = pairs[: cfg.calib_pairs], []
    for p in pairs[cfg.calib_pairs :]:
        ch, rj = _clip_words(p["chosen"], cfg.reply_words), _clip_words(p["rejected"], cfg.reply_words)
        if ch != rj:
            out.append({"id": p["id"], "source": p["source"], "context": _clip_context(p["context"], cfg.context_words),
                        "chosen": ch, "rejected": rj})  # fmt: skip
    return out, calib


def held_out_reactions(train_with: str, held_out: str) -> dict:
    """A template set (one dimension ``reaction``) of :data:`PAIR_POSITIVE` /
    :data:`PAIR_NEGATIVE` plus ``train_with``'s texts, minus every text of ``held_out``: train
    with it, and evaluating with ``held_out`` measures wording the model never saw."""
    from flr_engine.pairwise_tune import load_reactions
    from flr_engine.templates import load_templates

    banned = set(load_templates(held_out).unique_texts)
    pool = load_reactions(train_with)
    pos, neg = dict.fromkeys(PAIR_POSITIVE + pool.positive), dict.fromkeys(PAIR_NEGATIVE + pool.negative)
    return {
        "name": f"reactions ({train_with} + flr-engine's, without {held_out})",
        "source": f"flr_engine.feedback.PAIR_POSITIVE/NEGATIVE + {train_with}, minus {held_out}'s texts",
        "dimensions": {"reaction": {"positive": [t for t in pos if t not in banned],
                                    "negative": [t for t in neg if t not in banned]}},
    }  # fmt: skip


@dataclass
class MixConfig:
    pairs: int = 600  # training pairs (each gives 2 rows: chosen +, rejected -)
    calib_pairs: int = 120  # pairs held out (never trained on) for the calibration fit
    feedbackqa: int = 300  # natural feedback rows, half positive, half negative
    oasst: int = 100  # real OpenAssistant next user turns
    reply_words: int = 120  # replies / passages cut to this many words (CPU budget)
    context_words: int = 120  # the last user turn cut to its last N words
    seed: int = 0


def build_feedback_mix(train_dir: str, cfg: MixConfig) -> tuple[list[dict], list[dict], dict]:
    """Rows for ``flr feedback-tune`` and held-out calibration pairs from ``train_dir``.

    Returns ``(feedback_rows, calib_pairs, stats)``. Pairs of all four pair files are
    shuffled together (seeded); the first ``calib_pairs`` are held out; of the rest,
    ``pairs`` become two rows each: a :data:`PAIR_POSITIVE` reaction after ``chosen`` and a
    :data:`PAIR_NEGATIVE` one after ``rejected`` (picked at random per row). FeedbackQA rows
    are balanced by rating (Excellent/Acceptable vs Could be Improved/Bad), one feedback per
    (question, passage). OASST follow-ups are the users' real next turns.
    """
    rng = random.Random(cfg.seed)
    fdir = os.path.join(train_dir, "feedback")
    pairs = _shuffled_pairs(train_dir, rng)
    calib, train_pairs = pairs[: cfg.calib_pairs], pairs[cfg.calib_pairs :]

    def ctx(c):
        return _clip_context(c, cfg.context_words)

    rows, counts = [], {"pair+": 0, "pair-": 0, "feedbackqa+": 0, "feedbackqa-": 0, "oasst": 0}
    used = 0
    for p in train_pairs:
        if used >= cfg.pairs:
            break
        ch, rj = _clip_words(p["chosen"], cfg.reply_words), _clip_words(p["rejected"], cfg.reply_words)
        if ch == rj:
            continue
        used += 1
        for reply, pool, pol in ((ch, PAIR_POSITIVE, "+"), (rj, PAIR_NEGATIVE, "-")):
            rows.append({"id": f"{p['id']}{pol}", "source": f"pair:{p['source']}", "polarity": pol,
                         "context": ctx(p["context"]), "response": reply, "feedback": rng.choice(pool)})  # fmt: skip
            counts[f"pair{pol}"] += 1
    fqa = _read_all(os.path.join(fdir, "feedbackqa.jsonl.gz"))
    rng.shuffle(fqa)
    seen, want = set(), {1: cfg.feedbackqa // 2, -1: cfg.feedbackqa - cfg.feedbackqa // 2}
    for r in fqa:
        pol = FQA_POLARITY.get(r.get("rating"))
        key = (r["context"][-1]["content"], r["response"])
        if pol is None or want[pol] <= 0 or key in seen:
            continue
        seen.add(key)
        want[pol] -= 1
        sign = "+" if pol > 0 else "-"
        rows.append({"id": r["id"], "source": "feedbackqa", "polarity": sign, "rating": r["rating"],
                     "context": ctx(r["context"]), "response": _clip_words(r["response"], cfg.reply_words),
                     "feedback": r["feedback"]})  # fmt: skip
        counts[f"feedbackqa{sign}"] += 1
    oa = _read_all(os.path.join(fdir, "oasst1-en-validation-followups.jsonl.gz"))
    rng.shuffle(oa)
    for r in oa[: cfg.oasst]:
        rows.append({"id": r["id"], "source": "oasst-followup", "polarity": None,
                     "context": ctx(r["context"]), "response": _clip_words(r["response"], cfg.reply_words),
                     "feedback": _clip_words(r["feedback"], 60)})  # fmt: skip
        counts["oasst"] += 1
    rng.shuffle(rows)
    stats = {"config": dataclasses.asdict(cfg), "rows": len(rows), "counts": counts,
             "calib_pairs": len(calib), "pairs_available": len(pairs),
             "calib_ids": [p["id"] for p in calib]}  # fmt: skip
    return rows, calib, stats
