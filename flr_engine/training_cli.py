"""``flr mine``, ``flr dpo`` and ``flr generate``: preference mining with FLR, DPO on the mined
pairs, and a policy's replies to held-out prompts (to score and compare before/after).

Wire them into the main parser with ``add_mine_parser(subparsers)``,
``add_dpo_parser(subparsers)``, ``add_generate_parser(subparsers)`` and
``add_feedback_tune_parser(subparsers)`` (``flr feedback-tune``, feedback fine-tuning); ``main(argv)`` runs
them standalone (``python -m flr_engine.training_cli mine ...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
import time

from flr_engine.errors import ConfigError

log = logging.getLogger("flr_engine")

MINE_EXAMPLES = """examples:
  flr mine --policy default --prompts ../shared/data/pairwise/hh-rlhf-helpful-base.jsonl.gz \\
      --out pairs.jsonl --limit 500
  flr mine --policy ./sft-model --model ./judge --prompts prompts.jsonl --out pairs.jsonl \\
      --num-samples 8 --temperature 0.7 --top-p 0.9 --min-margin 0.05

prompt rows (JSONL, .gz ok): {"prompt": "..." | [messages]}, {"messages": [...]} (trailing
assistant turns dropped) or {"context": [...]} (the pairwise files of ../shared/data).
Output rows (TRL preference format): {"prompt": [messages], "chosen": [{"role": "assistant",
"content": ...}], "rejected": [...], "scores": [...], "samples": [...], "margin": x, "line": n}.
Skipped prompts (< 2 distinct samples, margin below --min-margin, unscorable) go to
OUT.skipped.jsonl. A rerun with the same --out resumes (samples are seeded per prompt, so
they are the same as in an uninterrupted run); other settings are refused."""

DPO_EXAMPLES = """examples:
  flr dpo --policy default --pairs pairs.jsonl --out runs/dpo
  flr dpo --policy default --pairs pairs.jsonl --out runs/dpo-lora --lora-r 16 --lr 1e-4
  flr dpo --policy default --pairs pairs.jsonl --out runs/dpo --resume   # after an interruption
  flr score --model runs/dpo ...      # the result is a plain transformers folder

pair rows: as written by `flr mine` (TRL format), or {"context", "chosen", "rejected"}
(../shared/data pairwise), TRL implicit-prompt rows, HH transcripts. Ties and pairs whose
chosen equals rejected are skipped and counted. Output in --out: metrics.jsonl,
metrics.png, checkpoint-N/ (resumable), and the final model + tokenizer."""


def _add_config_args(p: argparse.ArgumentParser, cls) -> None:
    """One --flag per dataclass field (help, choices and type from its metadata)."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        md = f.metadata
        typ = md.get("type") or type(f.default)
        if typ is bool:
            p.add_argument(flag, action="store_true", help=md.get("help"))
            continue
        default = f.default
        help_ = md.get("help", "") + (f" (default: {default})" if default is not None else "")
        p.add_argument(flag, type=typ, default=default, choices=md.get("choices"), help=help_)


def _config_from_args(args, cls):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _read_template(path: str | None) -> str | None:
    from flr_engine.cli import read_chat_template

    return read_chat_template(path)


def _add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--device", default="auto", help="auto (CUDA when there is one, else cpu), cpu, cuda, cuda:1, ..."
    )
    p.add_argument(
        "--chat-template", default=None,
        help="file with a Jinja chat template, for a policy (or follow-up model) without one",
    )  # fmt: skip


def _add_prompt_job_args(p: argparse.ArgumentParser, out_help: str) -> None:
    """--policy, --prompts, --out, --skip, --limit, --overwrite: a resumable job over prompts."""
    p.add_argument("--policy", required=True, help="'default', a model folder, hub id or .gguf")
    p.add_argument("--prompts", required=True, help="JSONL(.gz) prompts: {\"prompt\"|\"messages\"|\"context\"} rows")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--skip", type=int, default=0,
                   help="leave out the first N prompts (shards: --skip 100 --limit 100)")  # fmt: skip
    p.add_argument("--limit", type=int, default=None, help="then use N prompts only")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming")


# --------------------------------------------------------------------------------------
# flr mine
# --------------------------------------------------------------------------------------


def add_mine_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``mine`` on an ``argparse`` subparsers object; returns its parser."""
    from flr_engine.cli import _add_reward_args
    from flr_engine.mining import MineConfig

    p = subparsers.add_parser(
        "mine",
        help="sample replies from a policy and keep FLR's best vs worst as preference pairs",
        epilog=MINE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_prompt_job_args(p, "JSONL pairs (resumable)")
    p.add_argument(
        "--model", default=None,
        help="the follow-up (reward) model: 'default', folder, hub id, .gguf (default: the policy)",
    )  # fmt: skip
    _add_config_args(p, MineConfig)
    _add_load_args(p)
    _add_reward_args(p)
    p.set_defaults(func=cmd_mine)
    return p


def cmd_mine(args) -> int:
    from flr_engine.mining import MineConfig, Miner, mine, read_prompts, require_chat_template
    from flr_engine.models import load
    from flr_engine.scorer import FLRScorer
    from flr_engine.templates import load_templates

    config = _config_from_args(args, MineConfig)
    load_templates(args.templates)  # fail fast, before loading a model
    prompts = read_prompts(args.prompts, args.limit, args.skip)
    template = _read_template(args.chat_template)
    settings = {
        "prompts": args.prompts,
        "policy": args.policy,
        "model": args.model or args.policy,
        **dataclasses.asdict(config),
        "templates": args.templates,
        "mode": args.mode,
        "reduction": args.reduction,
        "score_eot": args.score_eot,
        "dimensions": args.dimensions,
        "dtype": args.dtype,
        "chat_template": hashlib.sha256(template.encode()).hexdigest()[:16] if template else None,
    }
    t0 = time.time()
    policy = load(args.policy, dtype=args.dtype, device=args.device, chat_template=template)
    require_chat_template(policy.tokenizer, f"the policy {args.policy!r}")
    if args.model is None or args.model == args.policy:
        judge = policy
    else:
        judge = load(args.model, dtype=args.dtype, device=args.device)
        if not getattr(judge.tokenizer, "chat_template", None) and template:
            judge.tokenizer.chat_template = template
        require_chat_template(judge.tokenizer, f"the follow-up model {args.model!r}")
    scorer = FLRScorer(
        judge.model, judge.tokenizer, templates=args.templates, engine=args.engine,
        mode=args.mode, reduction=args.reduction, score_eot=args.score_eot,
        dimensions=args.dimensions.split(",") if args.dimensions else None,
    )  # fmt: skip
    log.info("models loaded in %.1fs; scoring with the %s backend", time.time() - t0,
             scorer.engine_name)  # fmt: skip
    miner = Miner(policy.model, policy.tokenizer, scorer, config)
    from flr_engine.io import input_files
    from flr_engine.models import model_files

    inputs = input_files(args.prompts, args.templates, args.chat_template)
    inputs += model_files(args.policy) + model_files(args.model or args.policy)
    stats = mine(miner, prompts, args.out, settings, resume=not args.overwrite,
                 progress=not args.quiet, inputs=sorted(set(inputs)))  # fmt: skip
    log.info("flr mine: %s", stats.summary())
    if args.quiet:
        print(f"flr mine: {stats.summary()}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------
# flr generate
# --------------------------------------------------------------------------------------

GENERATE_EXAMPLES = """examples:
  # greedy replies of a policy to 50 held-out prompts (those after the first 200)
  flr generate --policy runs/dpo --prompts ../shared/data/pairwise/hh-rlhf-helpful-base.jsonl.gz \\
      --skip 200 --limit 50 --out tuned.replies.jsonl
  flr score --input tuned.replies.jsonl --output tuned.scores.jsonl     # then flr compare

Output rows: {"line", "id", "context": [messages], "response": str, "tokens": n,
"finished": bool (ended with the end-of-turn token, not cut by --max-new-tokens)}, which
`flr score` reads. Resumable: a rerun with the same --out continues (batches are fixed by
input position and sampling is seeded per prompt, so the result is the same)."""


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``generate`` on an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "generate",
        help="a policy's replies to prompts (greedy by default), in the input format of flr score",
        epilog=GENERATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_prompt_job_args(p, "JSONL replies (resumable)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="max tokens per reply (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass when sampling")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (per prompt: hash(seed, line))")
    p.add_argument("--batch-prompts", type=int, default=8, help="prompts per generate call (default: 8)")
    _add_load_args(p)
    p.set_defaults(func=cmd_generate)
    return p


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from flr_engine.io import ResumableWriter, input_files
    from flr_engine.mining import (
        prompt_ids,
        prompt_seed,
        read_prompts,
        require_chat_template,
        stop_and_pad_ids,
    )  # fmt: skip
    from flr_engine.models import load
    from flr_engine.sampling import generate

    if args.max_new_tokens < 1 or args.batch_prompts < 1 or args.temperature < 0:
        raise ConfigError("--max-new-tokens and --batch-prompts must be >= 1, --temperature >= 0")
    prompts = read_prompts(args.prompts, args.limit, args.skip)
    template = _read_template(args.chat_template)
    settings = {
        k: getattr(args, k)
        for k in ("prompts", "policy", "max_new_tokens", "temperature", "top_p", "seed",
                  "batch_prompts", "dtype")
    } | {"skip": args.skip, "chat_template": hashlib.sha256(template.encode()).hexdigest()[:16]
         if template else None}  # fmt: skip
    t0 = time.time()
    lm = load(args.policy, dtype=args.dtype, device=args.device, chat_template=template)
    tok = lm.tokenizer
    require_chat_template(tok, f"the policy {args.policy!r}")
    eot, pad = stop_and_pad_ids(tok)
    max_pos = getattr(lm.model.config, "max_position_embeddings", None)
    log.info("policy %s loaded in %.1fs", args.policy, time.time() - t0)
    written = 0
    from flr_engine.models import model_files

    inputs = input_files(args.prompts, args.chat_template) + model_files(args.policy)
    with ResumableWriter(
        args.out, settings, resume=not args.overwrite, out_flag="--out", inputs=inputs
    ) as out:
        bar = tqdm(total=len(prompts), initial=sum(p.line in out.done for p in prompts),
                   unit="prompt", desc="flr generate", disable=args.quiet)  # fmt: skip
        for start in range(0, len(prompts), args.batch_prompts):
            chunk = prompts[start : start + args.batch_prompts]
            if all(p.line in out.done for p in chunk):
                continue
            ids = [prompt_ids(tok, p.messages, args.max_new_tokens, max_pos, p.line) for p in chunk]
            replies = generate(
                lm.model, ids, max_new_tokens=args.max_new_tokens, stop_ids=eot, pad_id=pad,
                temperature=args.temperature, top_p=args.top_p,
                seeds=[prompt_seed(args.seed, p.line) for p in chunk],
            )  # fmt: skip
            rows = [
                {"line": p.line, "id": p.id, "context": p.messages,
                 "response": tok.decode(r, skip_special_tokens=True).strip(), "tokens": len(r),
                 "finished": len(r) < args.max_new_tokens}  # fmt: skip
                for p, (r,) in zip(chunk, replies)
                if p.line not in out.done
            ]
            out.write(rows)
            written += len(rows)
            bar.update(len(rows))
        bar.close()
    log.info("flr generate: %d replies written to %s in %.1fs", written, args.out, time.time() - t0)
    return 0


# --------------------------------------------------------------------------------------
# flr dpo
# --------------------------------------------------------------------------------------


def add_dpo_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``dpo`` on an ``argparse`` subparsers object; returns its parser."""
    from flr_engine.dpo import DPOConfig

    p = subparsers.add_parser(
        "dpo",
        help="DPO (or IPO) fine-tuning on preference pairs, e.g. from `flr mine`",
        epilog=DPO_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--policy", required=True, help="'default', a model folder, hub id or .gguf")
    p.add_argument("--pairs", required=True, help="JSONL(.gz) preference pairs")
    p.add_argument("--out", required=True, help="output folder (checkpoints, metrics, model)")
    _add_config_args(p, DPOConfig)
    _add_load_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="discard a previous run in --out")
    p.set_defaults(func=cmd_dpo)
    return p


def cmd_dpo(args) -> int:
    from flr_engine.dpo import DPOConfig, encode_pairs, load_pairs, train_dpo
    from flr_engine.mining import require_chat_template
    from flr_engine.models import load

    cfg = _config_from_args(args, DPOConfig)
    items, ties, rows = load_pairs(args.pairs)  # validate the data before loading a model
    if ties:
        log.info("%s: skipped %d tie / identical pairs of %d rows", args.pairs, ties, rows)
    template = _read_template(args.chat_template)
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
        "chat_template": hashlib.sha256(template.encode()).hexdigest()[:16] if template else None,
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


# --------------------------------------------------------------------------------------
# flr feedback-tune
# --------------------------------------------------------------------------------------

FEEDBACK_TUNE_EXAMPLES = """examples:
  flr feedback-tune --model default --data feedback.jsonl --out runs/ft
  flr feedback-tune --model default --data feedback.jsonl --out runs/ft-rs --format role-swapped
  flr feedback-tune --model default --data feedback.jsonl --out runs/ft --resume  # continue
  flr feedback-tune --model default --data feedback.jsonl --out runs/ft-full --full --lr 1e-5
  flr eval ../shared/data/pairwise --model runs/ft    # scores in the format it was tuned in

rows (JSONL, .gz ok): {"context": [messages] | "prompt", "response": str, "feedback": str}
(scripts/build_feedback_data.py builds them from ../shared/data/train). The loss covers the
feedback's tokens only, rendered exactly as FLR scores them (--format). Output in --out:
metrics.jsonl, checkpoint-N/ (TRL's, resumable), the LoRA adapter (or the full model with
--full), the tokenizer and flr_feedback.json (format, base model, data, steps, time)."""


def add_feedback_tune_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``feedback-tune`` on an ``argparse`` subparsers object; returns its parser."""
    from flr_engine.feedback import FeedbackTuneConfig

    p = subparsers.add_parser(
        "feedback-tune",
        help="fine-tune the follow-up model on natural-language feedback (TRL SFT, LoRA)",
        epilog=FEEDBACK_TUNE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="default", help="the follow-up model to tune: 'default', folder, .gguf")
    p.add_argument("--data", required=True, help="JSONL(.gz) feedback rows")
    p.add_argument("--out", required=True, help="output folder (checkpoints, metrics, adapter)")
    p.add_argument("--limit", type=int, default=None, help="use the first N rows only")
    _add_config_args(p, FeedbackTuneConfig)
    _add_load_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="discard a previous run in --out")
    p.set_defaults(func=cmd_feedback_tune)
    return p


def cmd_feedback_tune(args) -> int:
    import torch

    from flr_engine.feedback import (
        FeedbackTuneConfig,
        encode_feedback,
        load_feedback_rows,
        train_feedback,
    )  # fmt: skip
    from flr_engine.mining import require_chat_template
    from flr_engine.models import load

    cfg = _config_from_args(args, FeedbackTuneConfig)
    rows = load_feedback_rows(args.data, args.limit)  # validate the data before loading a model
    template = _read_template(args.chat_template)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    lm = load(args.model, dtype=args.dtype, device=args.device, chat_template=template)
    require_chat_template(lm.tokenizer, f"the model {args.model!r}")
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
        "chat_template": hashlib.sha256(template.encode()).hexdigest()[:16] if template else None,
    }
    res = train_feedback(
        lm.model, lm.tokenizer, encoded, args.out, cfg, resume=args.resume,
        overwrite=args.overwrite, settings=settings, skipped=skipped, progress=not args.quiet,
    )  # fmt: skip
    summary = (
        f"{res.steps - res.start_step} steps ({res.start_step} done before) on {res.rows} rows "
        f"({res.skipped} too long, skipped) in {res.seconds:.1f}s; logged loss "
        f"{res.first_loss} -> {res.last_loss}; saved in {res.out_dir}"
    )
    log.info("flr feedback-tune: %s", summary)
    if args.quiet:
        print(f"flr feedback-tune: {summary}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------
# standalone entry point
# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``flr mine`` / ``flr dpo`` on their own: the main ``flr`` entry point."""
    from flr_engine.cli import main as flr_main

    return flr_main(argv)


if __name__ == "__main__":
    sys.exit(main())
