"""``flr generate``: a policy's replies to prompts, in the input format of ``flr score``."""

from __future__ import annotations

import logging
import time

from flr_engine.cli.args import (
    RAW,
    add_load_args,
    add_prompt_job_args,
    read_chat_template,
    template_hash,
)
from flr_engine.errors import ConfigError

log = logging.getLogger("flr_engine")


GENERATE_EXAMPLES = """examples:
  # greedy replies of a policy to 50 held-out prompts (those after the first 200)
  flr generate --policy runs/dpo --prompts ../shared/data/pairwise/hh-rlhf-helpful-base.jsonl.gz \\
      --skip 200 --limit 50 --out tuned.replies.jsonl
  flr score --input tuned.replies.jsonl --output tuned.scores.jsonl     # then flr compare

Output rows: {"line", "id", "context": [messages], "response": str, "tokens": n,
"finished": bool (ended with the end-of-turn token, not cut by --max-new-tokens)}, which
`flr score` reads. Resumable: a rerun with the same --out continues (batches are fixed by
input position and sampling is seeded per prompt, so the result is the same)."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="a policy's replies to prompts (greedy by default), in the input format of flr score",
        epilog=GENERATE_EXAMPLES,
        formatter_class=RAW,
    )
    add_prompt_job_args(p, "JSONL replies (resumable)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="max tokens per reply (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass when sampling")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (per prompt: hash(seed, line))")
    p.add_argument("--batch-prompts", type=int, default=8, help="prompts per generate call (default: 8)")
    add_load_args(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from flr_engine.chat import require_chat_template
    from flr_engine.distributed import Ranks, ShardedOutput, chunks
    from flr_engine.io import input_files
    from flr_engine.mining import prompt_ids, prompt_seed, read_prompts, stop_and_pad_ids
    from flr_engine.models import load
    from flr_engine.sampling import generate

    if args.max_new_tokens < 1 or args.batch_prompts < 1 or args.temperature < 0:
        raise ConfigError("--max-new-tokens and --batch-prompts must be >= 1, --temperature >= 0")
    prompts = read_prompts(args.prompts, args.limit, args.skip)
    template = read_chat_template(args.chat_template)
    settings = {
        k: getattr(args, k)
        for k in ("prompts", "policy", "max_new_tokens", "temperature", "top_p", "seed",
                  "batch_prompts", "dtype")
    } | {"skip": args.skip, "chat_template": template_hash(template)}  # fmt: skip
    ranks = Ranks.from_env()
    t0 = time.time()
    written = 0
    from flr_engine.models import model_files

    inputs = input_files(args.prompts, args.chat_template) + model_files(args.policy)
    # the output is checked (and held) before the policy loads: a refusal costs no load
    with ShardedOutput(
        args.out, settings, ranks, resume=not args.overwrite, out_flag="--out", inputs=inputs
    ) as out:
        lm = load(args.policy, dtype=args.dtype, device=ranks.device(args.device), chat_template=template)
        tok = lm.tokenizer
        require_chat_template(tok, f"the policy {args.policy!r}")
        eot, pad = stop_and_pad_ids(tok)
        max_pos = getattr(lm.model.config, "max_position_embeddings", None)
        log.info("policy %s loaded in %.1fs", args.policy, time.time() - t0)
        # batches fixed by input position (seeded per prompt): the same replies for any
        # number of ranks, and after a resume
        mine = ranks.take(chunks(prompts, args.batch_prompts))
        total = sum(len(c) for c in mine)
        bar = tqdm(total=total, initial=sum(p.line in out.done for c in mine for p in c),
                   unit="prompt", desc=f"{ranks.tag}flr generate",
                   disable=args.quiet or not ranks.is_main)  # fmt: skip
        for chunk in mine:
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
