"""Preference mining: sample replies from a policy, rank them with FLR, keep best vs worst.

For every prompt (a conversation ending with a user turn)::

    samples   y_1 .. y_K ~ pi(. | prompt)        K = num_samples, temperature T, top-p p
    distinct  Y = unique(y_k)                    (exact string duplicates dropped)
    rewards   r(y) = FLR reward of y as the reply to the prompt     (one scorer call for Y)
    chosen    y+ = argmax_{y in Y} r(y),  rejected  y- = argmin_{y in Y} r(y)
    margin    r(y+) - r(y-)

A prompt is *skipped* (written to ``OUT.skipped.jsonl``, counted) when it has fewer than 2
distinct non-empty samples, when ``margin < min_margin`` or the margin is 0 (all rewards
equal: no preference), or when FLR cannot score it (e.g. too long for the follow-up model).

Sampling is reproducible per prompt: the samples of the prompt on input line ``n`` depend on
``(seed, n)`` only, so a resumed run regenerates exactly what an uninterrupted run would.
``batch_prompts`` prompts (K rows each) share one ``generate`` call; each row draws with its own
seeded generator (:mod:`flr_engine.sampling`), so the batch does not change what is drawn.

Output rows are in TRL's conversational preference format, plus what was mined from::

    {"prompt": [messages], "chosen": [{"role": "assistant", "content": y+}],
     "rejected": [{"role": "assistant", "content": y-}], "scores": [r(y) for y in Y],
     "samples": Y, "margin": r(y+) - r(y-), "line": n, "id": ...}

written row by row with :class:`flr_engine.io.ResumableWriter` (a rerun skips finished
prompts, mined or skipped; a rerun with other settings is refused).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from flr_engine.chat import (
    InputError,
    end_of_turn_ids,
    generation_prompt,
    normalize_conversation,
    require_chat_template,
)
from flr_engine.control import control_tokens
from flr_engine.distributed import Ranks, ShardedOutput, chunks
from flr_engine.errors import ConfigError
from flr_engine.io import RowError, check_id, read_rows

log = logging.getLogger(__name__)



@dataclass
class MineConfig:
    """Sampling and selection settings of ``flr mine`` (the paper: 8 samples, T=0.7, p=0.9)."""

    num_samples: int = field(default=8, metadata={"help": "samples per prompt (K)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling mass"})
    max_new_tokens: int = field(default=256, metadata={"help": "max tokens per sample"})
    min_margin: float = field(
        default=0.0,
        metadata={"help": "skip prompts whose reward margin (best - worst) is below this"},
    )
    seed: int = field(
        default=0, metadata={"help": "sampling seed; each prompt uses hash(seed, line)"}
    )
    batch_prompts: int = field(
        default=4,
        metadata={"help": "prompts sampled together in one generate call (K rows each)"},
    )

    def __post_init__(self):
        if self.num_samples < 2:
            raise ConfigError(f"num_samples must be >= 2 (a pair needs two), got {self.num_samples}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_prompts < 1:
            raise ConfigError(f"batch_prompts must be >= 1, got {self.batch_prompts}")
        if not math.isfinite(self.min_margin):
            raise ConfigError(f"min_margin must be finite, got {self.min_margin}")


@dataclass
class PromptRow:
    line: int
    id: object
    messages: list[dict]


@dataclass
class MineStats:
    """What a run did. ``done_before``: prompts found finished in the output (resume)."""

    prompts: int = 0
    done_before: int = 0
    mined: int = 0
    skipped_few_distinct: int = 0
    skipped_margin: int = 0
    skipped_error: int = 0
    samples: int = 0
    distinct: int = 0
    seconds: float = 0.0

    @property
    def processed(self) -> int:
        return self.mined + self.skipped_few_distinct + self.skipped_margin + self.skipped_error

    def summary(self) -> str:
        rate = self.processed / self.seconds if self.seconds > 0 else float("nan")
        return (
            f"{self.processed} prompts in {self.seconds:.1f}s ({rate:.2f} prompts/s): "
            f"{self.mined} pairs written; skipped {self.skipped_few_distinct} with < 2 distinct "
            f"samples, {self.skipped_margin} with a margin below min-margin (or no preference), "
            f"{self.skipped_error} unscorable; {self.done_before} already done before; "
            f"{self.distinct} distinct of {self.samples} samples"
        )

    def to_dict(self) -> dict:
        return asdict(self) | {"processed": self.processed}


# --------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------


def parse_prompt_row(path: str, line: int, obj: dict) -> PromptRow:
    """Accept ``{"prompt": str | [messages]}``, ``{"messages": [...]}`` or ``{"context": [...]}``
    (the pairwise files of ../shared/data: their context). ``messages`` may end with assistant
    turns (a whole chat): those are dropped, the prompt ends at the last user turn."""
    for key in ("prompt", "context", "messages"):
        if key in obj:
            break
    else:
        raise RowError(path, line, None, "row needs 'prompt', 'messages' or 'context'")
    value = obj[key]
    if key == "messages" and isinstance(value, list):
        while value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
            value = value[:-1]
    try:
        msgs = normalize_conversation(value, key)
    except InputError as exc:
        raise RowError(path, line, exc.field, exc.message) from None
    return PromptRow(line, check_id(path, line, obj.get("id", line)), msgs)


def read_prompts(path: str, limit: int | None = None, skip: int = 0) -> list[PromptRow]:
    """All prompt rows of a JSONL(.gz) file (validated up front; a bad row raises RowError
    ``path:line: field``). ``skip``: leave out the first N rows; ``limit``: then keep N rows
    (``skip=200, limit=50`` gives a held-out slice disjoint from ``limit=200``)."""
    rows, _ = read_rows(path, parse_prompt_row)  # every bad row reported before any compute
    out = rows[skip:]
    if limit is not None:
        out = out[:limit]
    if not out:
        raise InputError(f"{path}: no prompts" + (f" after skipping {skip}" if skip else ""))
    return out


# --------------------------------------------------------------------------------------
# prompts for generation (the chat-template helpers live in flr_engine.chat)
# --------------------------------------------------------------------------------------


def stop_and_pad_ids(tokenizer) -> tuple[list[int], int]:
    """(end-of-turn ids, pad id): the tokenizer's pad token, else the first end-of-turn id."""
    eot = end_of_turn_ids(tokenizer)
    return eot, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot[0]


def prompt_ids(
    tokenizer, messages: list[dict], max_new_tokens: int, max_positions: int | None, line: int
) -> list[int]:
    """Token ids of :func:`generation_prompt`; cut to its last ``max_positions -
    max_new_tokens`` tokens (with a warning naming ``line``) when the reply would not fit."""
    guard = control_tokens(tokenizer)  # the injection policy: content is never a control token
    text = generation_prompt(tokenizer, messages)
    skeleton = generation_prompt(tokenizer, guard.mask_messages(messages)) if guard.any_in(messages) else text
    ids = guard.encode([text], [skeleton])["input_ids"][0]
    if max_positions and len(ids) + max_new_tokens > max_positions:
        keep = max(max_positions - max_new_tokens, 1)
        log.warning("line %d: prompt of %d tokens cut to its last %d", line, len(ids), keep)
        ids = ids[-keep:]
    return ids


def prompt_seed(seed: int, line: int) -> int:
    """A 63-bit seed from (seed, line): the samples of a prompt do not depend on the run."""
    digest = hashlib.sha256(f"flr-mine:{seed}:{line}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------------------
# sampling and mining
# --------------------------------------------------------------------------------------


class Miner:
    """Samples from ``policy`` and ranks the samples with ``scorer`` (an FLRScorer)."""

    def __init__(self, policy, tokenizer, scorer, config: MineConfig):
        require_chat_template(tokenizer)
        self.policy, self.tok, self.scorer, self.config = policy, tokenizer, scorer, config
        self.eot, self.pad = stop_and_pad_ids(tokenizer)
        self.max_positions = getattr(policy.config, "max_position_embeddings", None)

    def sample_many(self, rows: list[PromptRow]) -> list[list[str]]:
        """K samples for each prompt of ``rows``, all in one batched ``generate`` call (decoded,
        stripped). Prompt ``row``'s samples depend on ``(config.seed, row.line)`` only, not on
        the other rows (see :mod:`flr_engine.sampling`)."""
        from flr_engine.sampling import generate

        c = self.config
        out = generate(
            self.policy,
            [prompt_ids(self.tok, r.messages, c.max_new_tokens, self.max_positions, r.line)
             for r in rows],  # fmt: skip
            max_new_tokens=c.max_new_tokens, stop_ids=self.eot, pad_id=self.pad,
            num_samples=c.num_samples, temperature=c.temperature, top_p=c.top_p,
            seeds=[prompt_seed(c.seed, r.line) for r in rows],
        )  # fmt: skip
        return [
            [self.tok.decode(s, skip_special_tokens=True).strip() for s in samples]
            for samples in out
        ]

    def sample(self, messages: list[dict], line: int) -> list[str]:
        """K samples for one prompt (see :meth:`sample_many`)."""
        return self.sample_many([PromptRow(line, line, messages)])[0]

    def mine_one(
        self, row: PromptRow, stats: MineStats | None = None, samples: list[str] | None = None
    ) -> tuple[dict, str | None]:
        """(output row, None) for a mined pair, or (skip row, reason). ``samples``: already
        drawn ones (from :meth:`sample_many`), else drawn here."""
        stats = stats if stats is not None else MineStats()
        if samples is None:
            samples = self.sample(row.messages, row.line)
        distinct = list(dict.fromkeys(s for s in samples if s))
        stats.samples += len(samples)
        stats.distinct += len(distinct)
        base = {"line": row.line, "id": row.id}
        if len(distinct) < 2:
            stats.skipped_few_distinct += 1
            return base | {"reason": "fewer than 2 distinct samples", "samples": distinct}, "few"
        try:
            results = self.scorer.compare(row.messages, distinct)
        except InputError as exc:
            stats.skipped_error += 1
            return base | {"reason": f"cannot score: {exc}", "samples": distinct}, "error"
        scores = [float(r.reward) for r in results]
        best = max(range(len(scores)), key=scores.__getitem__)
        worst = min(range(len(scores)), key=scores.__getitem__)
        margin = scores[best] - scores[worst]
        if margin < self.config.min_margin or not margin > 0:
            stats.skipped_margin += 1
            reason = f"margin {margin:.4g} below min-margin {self.config.min_margin:g}"
            if not margin > 0:
                reason = "all rewards equal: no preference"
            return base | {"reason": reason, "samples": distinct, "scores": scores}, "margin"
        stats.mined += 1
        return {
            "prompt": row.messages,
            "chosen": [{"role": "assistant", "content": distinct[best]}],
            "rejected": [{"role": "assistant", "content": distinct[worst]}],
            "scores": scores,
            "samples": distinct,
            "margin": margin,
            **base,
        }, None


def mine(
    miner: Miner | Callable[[], Miner],
    prompts: list[PromptRow],
    out_path: str,
    settings: dict,
    *,
    resume: bool = True,
    progress: bool = True,
    inputs: Sequence[str] = (),
    ranks: Ranks | None = None,
) -> MineStats:
    """Mine every prompt not yet in ``out_path`` (or its ``.skipped.jsonl`` sidecar); rows are
    streamed to disk as they are made. ``settings`` and the content of the ``inputs`` files
    are checked against a previous run's. Under a launcher (``ranks``) each rank mines every
    ``world``-th chunk into its own shard (see :mod:`flr_engine.distributed`).

    ``miner`` may be a function that builds the Miner: it is called only after both outputs
    were checked, so a refused ``--out`` (other settings, changed inputs) costs no model load.
    """
    from tqdm import tqdm

    ranks = ranks or Ranks()
    skipped_path = out_path + ".skipped.jsonl"
    kw = dict(resume=resume, out_flag="--out", inputs=inputs)
    with (
        ShardedOutput(out_path, settings, ranks, **kw) as out,
        ShardedOutput(skipped_path, settings, ranks, **kw) as skipped,
    ):
        if not isinstance(miner, Miner):
            miner = miner()
        mine_chunks = ranks.take(chunks(prompts, miner.config.batch_prompts))
        stats = MineStats(prompts=sum(len(c) for c in mine_chunks))
        done = out.done | skipped.done
        stats.done_before = sum(p.line in done for c in mine_chunks for p in c)
        if stats.done_before:
            log.info("%sresuming: %d of %d prompts already done", ranks.tag, stats.done_before,
                     stats.prompts)  # fmt: skip
        t0 = time.time()
        bar = tqdm(
            total=stats.prompts, initial=stats.done_before, unit="prompt",
            desc=f"{ranks.tag}flr mine", disable=not progress or not ranks.is_main,
        )  # fmt: skip
        for chunk in mine_chunks:
            # chunks are fixed by input position, so a resumed run (or one on any number of
            # ranks) samples each prompt in the same batch as an uninterrupted one; finished
            # prompts of a chunk are not rewritten
            if all(p.line in done for p in chunk):
                continue
            samples = miner.sample_many(chunk)
            for p, drawn in zip(chunk, samples):
                if p.line in done:
                    continue
                result, reason = miner.mine_one(p, stats, drawn)
                (out if reason is None else skipped).write([result])
                bar.update(1)
                bar.set_postfix(pairs=stats.mined, skipped=stats.processed - stats.mined)
        bar.close()
        stats.seconds = time.time() - t0
    return stats
