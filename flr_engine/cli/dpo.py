"""``flr dpo``: DPO (or IPO) fine-tuning on preference pairs, e.g. from ``flr mine``."""

from __future__ import annotations

import json
import logging
import sys
import time

from flr_engine.cli.args import (
    RAW,
    add_config_args,
    add_load_args,
    add_resume_args,
    config_from_args,
    read_chat_template,
    template_hash,
)

log = logging.getLogger("flr_engine")

DPO_EXAMPLES = """examples:
  flr dpo --policy default --pairs pairs.jsonl --out runs/dpo
  flr dpo --policy default --pairs pairs.jsonl --out runs/dpo-lora --lora-r 16 --lr 1e-4
  flr dpo --policy default --pairs pairs.jsonl --out runs/dpo --resume   # after an interruption
  flr score --model runs/dpo ...      # the result is a plain transformers folder

pair rows: as written by `flr mine` (TRL format), or {"context", "chosen", "rejected"}
(../shared/data pairwise), TRL implicit-prompt rows, HH transcripts. Ties and pairs whose
chosen equals rejected are skipped and counted. Output in --out: metrics.jsonl,
metrics.png, checkpoint-N/ (resumable), and the final model + tokenizer."""





def register(subparsers) -> None:
    from flr_engine.dpo import DPOConfig

    p = subparsers.add_parser(
        "dpo",
        help="DPO (or IPO) fine-tuning on preference pairs, e.g. from `flr mine`",
        epilog=DPO_EXAMPLES,
        formatter_class=RAW,
    )
    p.add_argument("--policy", required=True, help="'default', a model folder, hub id or .gguf")
    p.add_argument("--pairs", required=True, help="JSONL(.gz) preference pairs")
    p.add_argument("--out", required=True, help="output folder (checkpoints, metrics, model)")
    add_config_args(p, DPOConfig)
    add_load_args(p)
    add_resume_args(p)
    p.set_defaults(func=cmd_dpo)


def cmd_dpo(args) -> int:
    from flr_engine.dpo import DPOConfig, encode_pairs, load_pairs, train_dpo
    from flr_engine.mining import require_chat_template
    from flr_engine.models import load

    cfg = config_from_args(args, DPOConfig)
    items, ties, rows = load_pairs(args.pairs)  # validate the data before loading a model
    if ties:
        log.info("%s: skipped %d tie / identical pairs of %d rows", args.pairs, ties, rows)
    template = read_chat_template(args.chat_template)
    t0 = time.time()
    lm = load(args.policy, dtype=args.dtype, device=args.device, chat_template=template)
    require_chat_template(lm.tokenizer, f"the policy {args.policy!r}")
    max_len = cfg.max_length or getattr(lm.model.config, "max_position_embeddings", None)
    pairs = encode_pairs(lm.tokenizer, items, max_len, path=args.pairs)
    log.info("policy loaded and %d pairs encoded in %.1fs", len(pairs), time.time() - t0)
    settings = {
        "policy": args.policy,
        "pairs": args.pairs,
        "dtype": args.dtype,
        "chat_template": template_hash(template),
    }
    res = train_dpo(
        lm.model, lm.tokenizer, pairs, args.out, cfg, resume=args.resume,
        overwrite=args.overwrite, settings=settings, skipped_ties=ties, progress=not args.quiet,
    )  # fmt: skip
    summary = (
        f"{res.steps - res.start_step} steps ({res.start_step} done before) on {res.pairs} pairs "
        f"({res.skipped_ties} ties skipped, {res.truncated} truncated) in {res.seconds:.1f}s; "
        f"last step: {json.dumps(res.last)}; model saved in {res.out_dir}"
    )
    log.info("flr dpo: %s", summary)
    if args.quiet:
        print(f"flr dpo: {summary}", file=sys.stderr)
    return 0
