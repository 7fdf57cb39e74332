"""Flags shared by the subcommands, generated from dataclasses where they describe a config.

``add_config_args(parser, Config)`` adds one ``--flag`` per dataclass field (type, choices
and help from the field's metadata; a bool is a switch) and ``config_from_args(args,
Config)`` builds the config back. The reward flags (:class:`RewardFlags`) and the model
loading flags (:class:`LoadFlags`) are such dataclasses, shared by score, eval and mine.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import sys
from dataclasses import dataclass, field

from flr_engine.errors import MissingFileError

RAW = argparse.RawDescriptionHelpFormatter

log = logging.getLogger("flr_engine")


def add_config_args(p: argparse.ArgumentParser, cls) -> None:
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


def config_from_args(args, cls):
    """The dataclass ``cls`` from the parsed flags :func:`add_config_args` added."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _opt(default, help: str, choices=None, type=None):
    return field(default=default, metadata={"help": help, "choices": choices, "type": type})


@dataclass
class LoadFlags:
    """How a model is loaded."""

    dtype: str = _opt("float32", "weights dtype", ["float32", "bfloat16", "float16"])
    device: str = _opt("auto", "auto (CUDA when there is one, else cpu), cpu, cuda, cuda:1, ...")
    chat_template: str = _opt(None, "file with a Jinja chat template (for models without one)", type=str)


@dataclass
class RewardFlags:
    """What the FLR reward is (the options of :class:`~flr_engine.scorer.FLRScorer`)."""

    templates: str = _opt("flr-helpfulness", "flr-helpfulness | flr-mixed | path to a JSON/YAML set")
    mode: str = _opt("likelihood", "official = the paper's released scorer", ["likelihood", "official"])
    reduction: str = _opt("mean", "per follow-up: mean or sum of token log-probs", ["mean", "sum"])
    score_eot: bool = _opt(False, "also score the end-of-turn token")
    dimensions: str = _opt(None, "comma-separated subset of dimensions", type=str)
    engine: str = _opt("auto", "scoring backend", ["auto", "engine", "reference", "hf-prefix-cache"])


def add_load_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p, LoadFlags)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, the load flags and --format: the follow-up model of score and eval."""
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct), default-ft (the feedback-tuned "
                   "judge), a model folder, hub id or .gguf file")  # fmt: skip
    add_load_args(p)
    p.add_argument(
        "--format", default=None, choices=["follow-up", "role-swapped"],
        help="conversation format to score in (default: the one a feedback-tuned judge was "
        "tuned in, else follow-up); role-swapped = the paper's fine-tuned scorer",
    )  # fmt: skip


def add_reward_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p, RewardFlags)


def add_prompt_job_args(p: argparse.ArgumentParser, out_help: str) -> None:
    """--policy, --prompts, --out, --skip, --limit, --overwrite: a resumable job over prompts."""
    p.add_argument("--policy", required=True, help="'default', a model folder, hub id or .gguf")
    p.add_argument("--prompts", required=True, help="JSONL(.gz) prompts: {\"prompt\"|\"messages\"|\"context\"} rows")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--skip", type=int, default=0,
                   help="leave out the first N prompts (shards: --skip 100 --limit 100)")  # fmt: skip
    p.add_argument("--limit", type=int, default=None, help="then use N prompts only")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming")


def add_resume_args(p: argparse.ArgumentParser) -> None:
    """--resume / --overwrite of a training run's output folder."""
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="discard a previous run in --out")


def scoring_settings(args) -> dict:
    """The options that change scores: a resumed job must have the same ones."""
    keys = ("model", "templates", "mode", "reduction", "score_eot", "dimensions", "dtype", "chat_template")
    out = {k: getattr(args, k) for k in keys}
    if getattr(args, "format", None):  # only when given: older outputs stay resumable
        out["format"] = args.format
    return out


def read_chat_template(path: str | None) -> str | None:
    """The Jinja text of ``--chat-template FILE`` (None without one)."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        raise MissingFileError(f"{path}: --chat-template file does not exist") from None


def template_hash(template: str | None) -> str | None:
    """A short fingerprint of a chat template, for a job's settings."""
    return hashlib.sha256(template.encode()).hexdigest()[:16] if template else None


def dimensions(args) -> list[str] | None:
    return args.dimensions.split(",") if args.dimensions else None


def scorer_from_args(args):
    """The :class:`~flr_engine.scorer.FLRScorer` that ``--model`` and the reward flags describe."""
    from flr_engine.scorer import FLRScorer

    return FLRScorer.from_pretrained(
        args.model,
        dtype=args.dtype,
        device=args.device,
        chat_template=read_chat_template(args.chat_template),
        format=getattr(args, "format", None),
        templates=args.templates,
        engine=args.engine,
        mode=args.mode,
        reduction=args.reduction,
        score_eot=args.score_eot,
        dimensions=dimensions(args),
    )


def report_summary(command: str, summary: str, quiet: bool) -> None:
    """Log a finished run's ``summary`` as ``flr COMMAND: ...``; under ``--quiet`` (which
    hides INFO logs) also print it to stderr."""
    log.info("flr %s: %s", command, summary)
    if quiet:
        print(f"flr {command}: {summary}", file=sys.stderr)
