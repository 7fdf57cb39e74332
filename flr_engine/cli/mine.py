"""``flr mine``: sample replies from a policy, keep FLR's best vs worst as preference pairs."""

from __future__ import annotations

import dataclasses
import logging
import time

from flr_engine.cli.args import (
    RAW,
    add_config_args,
    add_load_args,
    add_prompt_job_args,
    add_reward_args,
    config_from_args,
    dimensions,
    read_chat_template,
    report_summary,
    template_hash,
)

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


def register(subparsers) -> None:
    from flr_engine.mining import MineConfig

    p = subparsers.add_parser(
        "mine",
        help="sample replies from a policy and keep FLR's best vs worst as preference pairs",
        epilog=MINE_EXAMPLES,
        formatter_class=RAW,
    )
    add_prompt_job_args(p, "JSONL pairs (resumable)")
    p.add_argument(
        "--model", default=None,
        help="the follow-up (reward) model: 'default', folder, hub id, .gguf (default: the policy)",
    )  # fmt: skip
    add_config_args(p, MineConfig)
    add_load_args(p)
    add_reward_args(p)
    p.set_defaults(func=cmd_mine)


def cmd_mine(args) -> int:
    from flr_engine.chat import require_chat_template
    from flr_engine.distributed import Ranks
    from flr_engine.io import input_files
    from flr_engine.mining import MineConfig, Miner, mine, read_prompts
    from flr_engine.models import load, model_files
    from flr_engine.scorer import FLRScorer
    from flr_engine.templates import load_templates

    config = config_from_args(args, MineConfig)
    load_templates(args.templates)  # fail fast, before loading a model
    prompts = read_prompts(args.prompts, args.limit, args.skip)
    template = read_chat_template(args.chat_template)
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
        "chat_template": template_hash(template),
    }
    ranks = Ranks.from_env()
    args.device = ranks.device(args.device)
    inputs = input_files(args.prompts, args.templates, args.chat_template)
    inputs += model_files(args.policy) + model_files(args.model or args.policy)

    def build_miner() -> Miner:  # called by mine() once --out is checked: a refusal costs no load
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
            dimensions=dimensions(args),
        )  # fmt: skip
        log.info("models loaded in %.1fs; scoring with the %s backend", time.time() - t0,
                 scorer.engine_name)  # fmt: skip
        return Miner(policy.model, policy.tokenizer, scorer, config)

    stats = mine(build_miner, prompts, args.out, settings, resume=not args.overwrite,
                 progress=not args.quiet, inputs=sorted(set(inputs)), ranks=ranks)  # fmt: skip
    report_summary("mine", stats.summary(), args.quiet)
    return 0
