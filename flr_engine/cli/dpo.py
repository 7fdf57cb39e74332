"""``flr dpo``: DPO fine-tuning on preference pairs (e.g. from ``flr mine``) with TRL's
``DPOTrainer`` and the engine's packed forward (:mod:`flr_engine.dpo`).

The flags are parsed by TRL's ``TrlParser``: this command's own (:class:`DPOArguments`)
plus every field of ``trl.DPOConfig`` (transformers' ``TrainingArguments`` included) under
its Hugging Face name (``--learning_rate``, ``--per_device_train_batch_size``,
``--report_to``, ...; dashes work too), and ``--config run.yaml`` for any of them (the
command line wins over the file).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field

from flr_engine.cli.args import RAW, read_chat_template, report_summary, template_hash

log = logging.getLogger("flr_engine")

DPO_EXAMPLES = """examples:
  flr dpo --policy default --pairs pairs.jsonl --output_dir runs/dpo
  flr dpo --policy default --pairs pairs.jsonl --output_dir runs/dpo-lora --lora_r 16 --learning_rate 1e-4
  flr dpo --config dpo.yaml --pairs pairs.jsonl --resume_from_checkpoint last   # after an interruption
  torchrun --nproc-per-node 8 -m flr_engine.cli dpo --config dpo.yaml             # data parallel (DDP)
  flr score --model runs/dpo ...      # the result is a plain transformers folder

flr's defaults that differ from trl.DPOConfig's (each can be set like any flag):
  --precompute_ref_log_probs true (the reference is the initial policy, computed once)
  --bf16 false (fp32 unless asked)  --gradient_checkpointing false  --save_total_limit 2
  --use_cpu true where there is no CUDA (a torchrun on CPUs then trains over gloo)

pair rows: as written by `flr mine` (TRL format), or {"context", "chosen", "rejected"}
(../shared/data pairwise), TRL implicit-prompt rows, HH transcripts. Ties and pairs whose
chosen equals rejected are skipped and counted. In --output_dir: checkpoint-N/ (TRL's,
resumable), flr_dpo_pairs/ (the tokenised pairs, TRL's cached reference log-probs), the
final model + tokenizer. Metrics go where --report_to says and to each trainer_state.json."""

FLR_DEFAULTS = {
    "precompute_ref_log_probs": True,
    "bf16": False,
    "save_total_limit": 2,
}


@dataclass
class DPOArguments:
    """``flr dpo``'s own flags (the training flags are ``trl.DPOConfig``'s)."""

    policy: str = field(
        default=None,
        metadata={"help": "the policy: 'default', a model folder, hub id or .gguf (required)"},
    )
    pairs: str = field(default=None, metadata={"help": "JSONL(.gz) preference pairs (required)"})
    dtype: str = field(
        default="float32",
        metadata={"help": "weights dtype", "choices": ["float32", "bfloat16", "float16"]},
    )
    chat_template: str = field(
        default=None, metadata={"help": "file with a Jinja chat template (for models without one)"}
    )
    lora_r: int = field(
        default=0, metadata={"help": "0: full fine-tune; > 0: peft LoRA rank (merged at the end)"}
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    overwrite: bool = field(
        default=False, metadata={"help": "start over in an --output_dir that holds a run"}
    )
    attn_impl: str = field(
        default="auto",
        metadata={
            "help": "tree attention: auto, torch, triton, dense",
            "choices": ["auto", "torch", "triton", "dense"],
        },
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _no_checkpointing(config_cls) -> dict:
    """Activation checkpointing off (TRL turns it on), under the name this transformers uses."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    name = (
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else "gradient_checkpointing"
    )
    return {name: False}


def register(subparsers) -> None:
    # the flags are TrlParser's: everything after `dpo` goes to cmd_dpo unparsed
    p = subparsers.add_parser(
        "dpo",
        help="DPO fine-tuning on preference pairs (TRL's DPOTrainer + the packed forward)",
        add_help=False,
        prefix_chars="\0",  # no option of its own: `flr dpo --help` is TrlParser's
    )
    p.add_argument("trl_argv", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_dpo)


def parser():
    from trl import DPOConfig, TrlParser

    parse = TrlParser(
        (DPOArguments, DPOConfig),
        prog="flr dpo",
        usage="flr dpo --policy P --pairs FILE --output_dir DIR [--config run.yaml] [--flag value ...]",
        description=__doc__.split("\n\n")[0].replace("``", "`"),
        epilog=DPO_EXAMPLES,
        formatter_class=RAW,
    )
    # on a machine without CUDA say so before TrainingArguments sets up the (gloo) process group
    parse.set_defaults(**FLR_DEFAULTS, **_no_checkpointing(DPOConfig), use_cpu=not _cuda())
    return parse


def parse_args(argv: list[str]):
    """(DPOArguments, trl.DPOConfig) from ``flr dpo``'s arguments."""
    from flr_engine.errors import ConfigError

    flr_args, cfg = parser().parse_args_and_config(argv)
    missing = [n for n in ("policy", "pairs") if not getattr(flr_args, n)]
    if cfg.output_dir in (None, "trainer_output"):  # transformers' name for "not given"
        missing.append("output_dir")
    if missing:
        raise ConfigError(f"flr dpo needs {', '.join('--' + n for n in missing)} (flr dpo --help)")
    if flr_args.lora_r < 0:
        raise ConfigError(f"--lora_r must be >= 0, got {flr_args.lora_r}")
    return flr_args, cfg


def cmd_dpo(args) -> int:
    from flr_engine.chat import require_chat_template
    from flr_engine.dpo import encode_pairs, load_pairs, run_dpo
    from flr_engine.models import load

    flr_args, cfg = parse_args(args.trl_argv)
    if args.quiet:
        cfg.disable_tqdm = True
    items, ties, rows = load_pairs(flr_args.pairs)  # validate the data before loading a model
    if ties:
        log.info("%s: skipped %d tie / identical pairs of %d rows", flr_args.pairs, ties, rows)
    template = read_chat_template(flr_args.chat_template)
    t0 = time.time()
    # loaded on the CPU: the Trainer places it (each rank on its own device)
    lm = load(flr_args.policy, dtype=flr_args.dtype, device="cpu", chat_template=template)
    require_chat_template(lm.tokenizer, f"the policy {flr_args.policy!r}")
    max_len = cfg.max_length or getattr(lm.model.config, "max_position_embeddings", None)
    pairs = encode_pairs(lm.tokenizer, items, max_len, path=flr_args.pairs)
    log.info("policy loaded and %d pairs encoded in %.1fs", len(pairs), time.time() - t0)
    peft_config = None
    if flr_args.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=flr_args.lora_r, lora_alpha=flr_args.lora_alpha, lora_dropout=flr_args.lora_dropout,
            target_modules="all-linear", task_type="CAUSAL_LM",
        )  # fmt: skip
    settings = {"policy": flr_args.policy, "pairs": flr_args.pairs, "dtype": flr_args.dtype,
                "chat_template": template_hash(template), "lora_r": flr_args.lora_r,
                "lora_alpha": flr_args.lora_alpha, "lora_dropout": flr_args.lora_dropout}  # fmt: skip
    res = run_dpo(
        lm.model, lm.tokenizer, pairs, cfg, peft_config=peft_config,
        resume=cfg.resume_from_checkpoint, overwrite=flr_args.overwrite, skipped_ties=ties,
        settings=settings,
    )  # fmt: skip
    summary = (
        f"{res.steps - res.start_step} steps ({res.start_step} done before) on {res.pairs} pairs "
        f"({res.skipped_ties} ties skipped, {res.truncated} truncated) in {res.seconds:.1f}s; "
        f"last step: {json.dumps(res.last)}; model saved in {res.out_dir}"
    )
    report_summary("dpo", summary, args.quiet)
    return 0
