"""``flr feedback-tune``: fine-tune the follow-up model on natural-language feedback."""

from __future__ import annotations

import hashlib
import logging
import time

from flr_engine.cli.args import (
    RAW,
    add_config_args,
    add_load_args,
    add_resume_args,
    config_from_args,
    read_chat_template,
    report_summary,
    template_hash,
)

log = logging.getLogger("flr_engine")


FEEDBACK_TUNE_EXAMPLES = """examples:
  flr feedback-tune --model default --data feedback.jsonl --out runs/ft
  flr feedback-tune --model default --data feedback.jsonl --out runs/ft-rs --format role-swapped
  flr feedback-tune --model default --data feedback.jsonl --out runs/ft --resume  # continue
  flr feedback-tune --model default --data feedback.jsonl --out runs/ft-full --full --lr 1e-5
  flr feedback-tune --objective pairwise --data pairs.jsonl --reactions flr-helpfulness --out runs/ft-pw
  flr eval ../shared/data/pairwise --model runs/ft    # scores in the format it was tuned in

rows (JSONL, .gz ok): {"context": [messages] | "prompt", "response": str, "feedback": str}
(scripts/build_feedback_data.py builds them from ../shared/data/train). The loss covers the
feedback's tokens only, rendered exactly as FLR scores them (--format). Output in --out:
metrics.jsonl, checkpoint-N/ (TRL's, resumable), the LoRA adapter (or the full model with
--full), the tokenizer and flr_feedback.json (format, base model, data, steps, time).

--objective pairwise trains FLR's own margin instead (flr_engine.pairwise_tune): rows are
preference pairs (the formats flr eval and flr dpo read), k positive and k negative reactions
from --reactions follow each reply, loss = -log sigmoid(beta * (r(chosen) - r(rejected)))."""


def register(subparsers) -> None:
    from flr_engine.feedback import FeedbackTuneConfig

    p = subparsers.add_parser(
        "feedback-tune",
        help="fine-tune the follow-up model on natural-language feedback (TRL SFT, LoRA)",
        epilog=FEEDBACK_TUNE_EXAMPLES,
        formatter_class=RAW,
    )
    p.add_argument("--model", default="default", help="the follow-up model to tune: 'default', folder, .gguf")
    p.add_argument("--data", required=True, help="JSONL(.gz) feedback rows (pairwise: preference pairs)")
    p.add_argument("--out", required=True, help="output folder (checkpoints, metrics, adapter)")
    p.add_argument("--limit", type=int, default=None, help="use the first N rows (pairs) only")
    add_config_args(p, FeedbackTuneConfig)
    add_load_args(p)
    add_resume_args(p)
    p.set_defaults(func=cmd_feedback_tune)


def cmd_feedback_tune(args) -> int:
    import torch

    from flr_engine.chat import require_chat_template
    from flr_engine.feedback import (
        FeedbackTuneConfig,
        encode_feedback,
        load_feedback_rows,
        train_feedback,
    )  # fmt: skip
    from flr_engine.models import load

    cfg = config_from_args(args, FeedbackTuneConfig)
    pairwise = cfg.objective == "pairwise"
    # validate the data (and the reactions) before loading a model
    if pairwise:
        from flr_engine.dpo import load_pairs
        from flr_engine.pairwise_tune import load_reactions

        rows = load_pairs(args.data)[0][: args.limit]
        pool = load_reactions(cfg.reactions)
    else:
        rows = load_feedback_rows(args.data, args.limit)
    template = read_chat_template(args.chat_template)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    lm = load(args.model, dtype=args.dtype, device=args.device, chat_template=template)
    require_chat_template(lm.tokenizer, f"the model {args.model!r}")
    collator = None
    if pairwise:
        from flr_engine.pairwise_tune import PairwiseCollator, prepare_pairs

        encoded, kept, skipped = prepare_pairs(lm.tokenizer, rows, pool, cfg.reactions_per_reply,
                                               cfg.format, cfg.max_length, cfg.seed, args.data)  # fmt: skip
        collator = PairwiseCollator(lm.tokenizer, kept, pool, cfg.format, cfg.max_length)
        log.info("model loaded and %d pairs checked (%d skipped: too long; reactions: %d "
                 "positive, %d negative, %d + %d per pair) in %.1fs", len(encoded), skipped,
                 len(pool.positive), len(pool.negative), cfg.reactions_per_reply,
                 cfg.reactions_per_reply, time.time() - t0)  # fmt: skip
    else:
        encoded, skipped = encode_feedback(lm.tokenizer, rows, cfg.format, cfg.max_length, args.data)
        ntok = sum(sum(x != -100 for x in e["labels"]) for e in encoded)
        log.info("model loaded and %d rows encoded (%d skipped: too long; %d feedback tokens, "
                 "%d tokens in all) in %.1fs", len(encoded), skipped, ntok,
                 sum(len(e["input_ids"]) for e in encoded), time.time() - t0)  # fmt: skip
    settings = {
        "model": args.model,
        "data": args.data,
        "data_sha1": hashlib.sha1(open(args.data, "rb").read()).hexdigest(),
        "limit": args.limit,
        "dtype": args.dtype,
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "chat_template": template_hash(template),
    }
    if pairwise:
        settings["reactions"] = {"positive": list(pool.positive), "negative": list(pool.negative)}
    res = train_feedback(
        lm.model, lm.tokenizer, encoded, args.out, cfg, resume=args.resume,
        overwrite=args.overwrite, settings=settings, skipped=skipped, progress=not args.quiet,
        collator=collator,
    )  # fmt: skip
    summary = (
        f"{res.steps - res.start_step} steps ({res.start_step} done before) on {res.rows} rows "
        f"({res.skipped} too long, skipped) in {res.seconds:.1f}s; logged loss "
        f"{res.first_loss} -> {res.last_loss}; saved in {res.out_dir}"
    )
    report_summary("feedback-tune", summary, args.quiet)
    return 0
