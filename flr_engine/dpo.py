"""Direct Preference Optimization on (prompt, chosen, rejected) pairs, with the fused log-prob.

The loss (Rafailov et al. 2023; IPO: Azar et al. 2023). For a pair with policy ``pi`` and the
frozen initial policy as reference ``ref``, and ``logp(y) = sum_t log p(y_t | x, y_<t)`` over
the completion tokens of ``y`` (the reply content and its end-of-turn token)::

    h = [logp_pi(y+) - logp_ref(y+)] - [logp_pi(y-) - logp_ref(y-)]

    sigmoid:  L = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
    ipo:      L = (h - 1 / (2 * beta))^2    with logp = the MEAN over completion tokens

``eps`` is the label smoothing (conservative DPO, Mitchell 2023; eps = 0 is plain DPO). From
``log sigmoid(z) = -log(1 + exp(-z))``: at h = 0, L = log 2 for every eps; as h -> +inf the
sigmoid loss tends to 0 (eps = 0) or grows like eps * beta * h (eps > 0: the optimum is
at finite h, ``beta * h* = log((1 - eps) / eps)``). dL/dh = -beta * ((1 - eps) * sigmoid(-beta h)
- eps * sigmoid(beta h)). IPO regresses h onto the target margin 1 / (2 beta); like TRL's
``loss_type="ipo"`` it uses per-token MEAN log-probs (the IPO paper's Eq. 17 averages over
tokens so that long replies do not dominate), while sigmoid DPO uses sums (the paper's
sequence log-likelihood).

How log-probs are computed (``forward``):

* ``"packed"`` (default): the sequences of a micro-batch (chosen and rejected of B pairs) go
  into one token trie (:mod:`flr_engine.engine.packer`): the prompt tokens they share are
  computed once; the engine's packed forward
  (:func:`~flr_engine.engine.forward.packed_hidden_states`: tree attention, the block-sparse
  torch path when a gradient is needed, soft-capping included) gives the final hidden states
  ``h`` (T, H); only the positions that predict completion tokens go through the fused LM
  head (:class:`~flr_engine.engine.forward.LMHead`,
  :func:`~flr_engine.ops.fused_logprob.flr_gathered_logprob`) (M, H) -> (M,) with a backward
  to ``h`` and the LM head: the (tokens, vocab) logits are never built.
* ``"padded"``: a right-padded batch (2B, L) through the decoder, then the same fused op.
* ``"plain"``: plain transformers (the comparison baseline): ``model(...).logits`` (2B, L, V),
  ``log_softmax``, ``gather``.

All three give the same values and gradients up to float rounding (tested).

Training: the reference log-probs of all pairs are computed ONCE before training (no grad)
and cached in ``DIR/reference_logps.pt``; AdamW; learning rate ``lr * f(s)`` at optimizer
step ``s`` (0-based) of ``S`` with ``W = ceil(warmup_ratio * S)`` warmup steps::

    f(s) = (s + 1) / (W + 1)          for s < W        (linear warmup, never 0)
    f(s) = (S - s) / (S - W)          for s >= W       (linear decay, 1 -> 1 / (S - W))

gradient clipping to ``max_grad_norm`` (global L2), seeded data order (a permutation per
epoch from ``seed``). Dropout is off (the model stays in eval mode, as TRL's
``disable_dropout``), so a step is deterministic. A step of ``batch_size * grad_accum`` pairs
averages the per-pair losses. Checkpoints ``DIR/checkpoint-N/state.pt`` hold the trainable
parameters, optimizer, scheduler, RNG states and the step; a resume continues from the last
one and gives the same parameters as an uninterrupted run (bitwise on the CPU). Per-step
metrics go to ``DIR/metrics.jsonl`` and ``DIR/metrics.png``; the final model (LoRA merged)
and tokenizer are saved as a plain transformers folder in ``DIR``.

Input rows: the formats of :mod:`flr_engine.evaluation.data` (TRL preference rows as written
by ``flr mine``, the project's pairwise files, TRL implicit-prompt rows, HH transcripts).
Rows with ``tie: true`` or chosen identical to rejected are skipped and counted (they carry
no preference: h = 0 for every policy); a bad row raises ``file:line: field 'f': message``.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
import types
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F

from flr_engine.chat import InputError
from flr_engine.control import encode_chat
from flr_engine.errors import ConfigError, DependencyError
from flr_engine.io import RowError, atomic_write_text, lock_exclusive

log = logging.getLogger(__name__)

LOSSES = ("sigmoid", "ipo")
FORWARDS = ("packed", "padded", "plain")
# settings that may change between a run and its resume (they do not change the result)
_RESUMABLE_FIELDS = ("save_every", "keep_checkpoints")


@dataclass
class DPOConfig:
    """Hyper-parameters of ``flr dpo`` (the CLI flags are these names with dashes)."""

    beta: float = field(default=0.1, metadata={"help": "DPO temperature beta (> 0)"})
    loss: str = field(
        default="sigmoid", metadata={"help": "sigmoid (DPO) or ipo", "choices": LOSSES}
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "conservative-DPO label smoothing eps in [0, 0.5)"}
    )
    lr: float = field(default=5e-6, metadata={"help": "peak learning rate (AdamW)"})
    epochs: int = field(default=1, metadata={"help": "passes over the pairs"})
    batch_size: int = field(default=2, metadata={"help": "pairs per forward (micro-batch)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    warmup_ratio: float = field(
        default=0.1, metadata={"help": "fraction of steps of linear warmup, then linear decay"}
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "clip the global gradient L2 norm (0: no clipping)"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    seed: int = field(default=0, metadata={"help": "seed of the data order and LoRA init"})
    lora_r: int = field(
        default=0, metadata={"help": "0: full fine-tune; > 0: peft LoRA rank (merged at the end)"}
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    save_every: int = field(
        default=100, metadata={"help": "checkpoint every N steps (0: only at the end)"}
    )
    keep_checkpoints: int = field(
        default=2, metadata={"help": "keep the last N checkpoints (0: all)"}
    )
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "max tokens per prompt + reply (default: the model's context); longer "
            "pairs lose prompt tokens from the start, then reply tokens from the end",
            "type": int,
        },
    )
    max_steps: int | None = field(
        default=None,
        metadata={"help": "stop after N optimizer steps (the schedule spans them)", "type": int},
    )
    forward: str = field(
        default="packed",
        metadata={"help": "packed (trie + fused log-prob), padded (+ fused), plain (full logits)",
                  "choices": FORWARDS},
    )  # fmt: skip
    logprob_impl: str = field(
        default="auto", metadata={"help": "fused log-prob impl: auto, torch, triton, cuda"}
    )

    def __post_init__(self):
        def bad(name, why):
            raise ConfigError(f"DPOConfig.{name} {why}, got {getattr(self, name)!r}")

        if not (self.beta > 0 and math.isfinite(self.beta)):
            bad("beta", "must be > 0")
        if self.loss not in LOSSES:
            bad("loss", f"must be one of {LOSSES}")
        if not 0 <= self.label_smoothing < 0.5:
            bad("label_smoothing", "must be in [0, 0.5)")
        if self.loss == "ipo" and self.label_smoothing:
            bad("label_smoothing", "does not apply to the ipo loss (must be 0)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", "must be > 0")
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if not 0 <= self.warmup_ratio < 1:
            bad("warmup_ratio", "must be in [0, 1)")
        if self.max_grad_norm < 0:
            bad("max_grad_norm", "must be >= 0")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        if self.lora_r < 0:
            bad("lora_r", "must be >= 0")
        if self.lora_r and self.lora_alpha <= 0:
            bad("lora_alpha", "must be > 0")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", "must be in [0, 1)")
        if self.save_every < 0 or self.keep_checkpoints < 0:
            bad("save_every" if self.save_every < 0 else "keep_checkpoints", "must be >= 0")
        if self.max_length is not None and self.max_length < 8:
            bad("max_length", "must be >= 8")
        if self.max_steps is not None and self.max_steps < 1:
            bad("max_steps", "must be >= 1")
        if self.forward not in FORWARDS:
            bad("forward", f"must be one of {FORWARDS}")


# --------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair DPO / IPO losses (B,) and the log-ratio margin ``h`` (B,).

    All inputs (B,): sequence log-probs (sums for "sigmoid", per-token means for "ipo")::

        h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
        sigmoid: -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)
        ipo:     (h - 1 / (2 * beta)) ** 2
    """
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss == "sigmoid":
        eps = label_smoothing
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ConfigError(f"loss must be one of {LOSSES}, got {loss!r}")
    return losses, h


# --------------------------------------------------------------------------------------
# encoding pairs
# --------------------------------------------------------------------------------------


@dataclass
class EncodedPair:
    """Token ids of the chosen / rejected sequences (prompt + reply + end-of-turn) and where
    their completion starts: completion tokens are ``ids[start:]``."""

    line: int
    chosen: list[int]
    chosen_start: int
    rejected: list[int]
    rejected_start: int
    truncated: bool = False


def encode_reply(
    tokenizer, messages: list[dict], reply: str, eot_ids: list[int]
) -> tuple[list[int], int]:
    """Render ``messages + [assistant: reply]`` whole, tokenise it, and return (ids, start):
    ``ids[start:]`` are the tokens overlapping the reply's characters plus the end-of-turn
    token after them; anything the template writes after that is dropped."""
    text, ids, offs = encode_chat(  # the injection policy: content is never a control token
        tokenizer,
        messages + [{"role": "assistant", "content": reply}],
        lambda msgs: tokenizer.apply_chat_template(msgs, tokenize=False),
    )
    span = None
    for cand in (reply, reply.strip()):
        i = text.rfind(cand)
        if cand and i >= 0:
            span = (i, i + len(cand))
            break
    if span is None:
        raise InputError("the chat template changed the reply text: cannot locate it", "chosen")
    comp = [n for n, (a, b) in enumerate(offs) if b > span[0] and a < span[1] and b > a]
    if not comp or comp[0] == 0:
        raise InputError("the reply produced no tokens after a prompt", "chosen")
    start, end = comp[0], comp[-1] + 1
    for n in range(end, min(end + 3, len(ids))):
        if ids[n] in eot_ids:
            end = n + 1
            break
    return list(ids[:end]), start


def _truncate(ids: list[int], start: int, keep_prompt: int, max_length: int):
    keep = min(start, keep_prompt)
    ids = ids[start - keep :][:max_length]
    return ids, keep


def encode_pairs(
    tokenizer, items, max_length: int | None = None, path: str = "pairs"
) -> list[EncodedPair]:
    """:class:`~flr_engine.evaluation.data.PairItem` list -> :class:`EncodedPair` list.

    Truncation to ``max_length`` tokens per sequence: the prompt keeps its last
    ``max(max_length - longest reply, max_length // 2)`` tokens, then replies are cut at the end.
    """
    from flr_engine.mining import end_of_turn_ids, require_chat_template

    require_chat_template(tokenizer)
    eot = end_of_turn_ids(tokenizer)
    out = []
    for it in items:
        try:
            c, cs = encode_reply(tokenizer, it.context, it.chosen, eot)
            r, rs = encode_reply(tokenizer, it.context, it.rejected, eot)
        except InputError as exc:
            raise RowError(path, it.line, exc.field, exc.message) from None
        truncated = False
        if max_length is not None and max(len(c), len(r)) > max_length:
            longest = max(len(c) - cs, len(r) - rs)
            keep_prompt = max(max_length - longest, max_length // 2)
            c, cs = _truncate(c, cs, keep_prompt, max_length)
            r, rs = _truncate(r, rs, keep_prompt, max_length)
            truncated = True
        out.append(EncodedPair(it.line, c, cs, r, rs, truncated))
    return out


def load_pairs(path: str):
    """(items, ties, rows) from a preference file (see the module docstring)."""
    from flr_engine.evaluation.data import read_set

    es = read_set(path, on_error="fail")
    if es.kind != "pairwise":
        raise InputError(f"{path}: looks like a {es.schema!r} file, not preference pairs")
    if not es.items:
        raise InputError(f"{path}: no usable pairs ({es.ties} ties / identical pairs skipped)")
    return es.items, es.ties, es.rows


# --------------------------------------------------------------------------------------
# sequence log-probs
# --------------------------------------------------------------------------------------


def completion_logprobs(
    model,
    seqs: list[list[int]],
    starts: list[int],
    *,
    forward: str = "packed",
    logprob_impl: str = "auto",
    attn_impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of ``log p(seqs[s][k] | seqs[s][:k])`` over ``k >= starts[s]``: (S,) fp32, and the
    token counts (S,) int64. Differentiable w.r.t. the model's parameters (when grad is on).

    ``forward``: "packed" | "padded" | "plain" (see the module docstring). The M scored
    positions predict targets ``t`` (M,) from hidden states ``h`` (M, H): the hidden state at
    position ``k - 1`` predicts token ``k``.
    """
    from flr_engine.engine.forward import LMHead, base_model, packed_hidden_states
    from flr_engine.ops.fused_logprob import segment_sum

    if forward not in FORWARDS:
        raise ValueError(f"forward must be one of {FORWARDS}, got {forward!r}")
    counts = torch.tensor([len(s) - st for s, st in zip(seqs, starts)], dtype=torch.long)
    if min(starts) < 1 or int(counts.min()) < 1:
        raise ValueError("every sequence needs >= 1 prompt token and >= 1 completion token")
    base = base_model(model)  # peft: the LoRA layers stay active
    head = LMHead.from_model(base)
    dev = head.device
    seg = torch.repeat_interleave(torch.arange(len(seqs)), counts).to(dev)  # (M,)
    targets = torch.tensor([t for s, st in zip(seqs, starts) for t in s[st:]], device=dev)
    if forward == "packed":
        from flr_engine.engine.packer import pack_sequences

        res = pack_sequences(seqs, token_budget=sum(len(s) for s in seqs))
        pack = res.packs[0]  # one pack: the budget holds every token
        rows = torch.cat([res.nodes_of(i)[st - 1 : len(s) - 1] for i, (s, st) in
                          enumerate(zip(seqs, starts))])  # (M,) packed index  # fmt: skip
        hidden = packed_hidden_states(base, pack, attn_impl=attn_impl)  # (T, H)
        h = hidden[rows.to(dev)]  # (M, H)
    else:
        L = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), L, dtype=torch.long)
        mask = torch.zeros(len(seqs), L, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        sidx = torch.repeat_interleave(torch.arange(len(seqs)), counts).to(dev)
        pidx = torch.tensor(
            [k - 1 for s, st in zip(seqs, starts) for k in range(st, len(s))], device=dev
        )
        if forward == "plain":
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits  # (S, L, V)
            logp_all = torch.log_softmax(logits.float(), dim=-1)
            lp = logp_all[sidx, pidx].gather(1, targets[:, None])[:, 0]  # (M,)
            return segment_sum(lp, seg, len(seqs)), counts
        hs = base.get_decoder()(
            input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False
        ).last_hidden_state  # (S, L, H)
        h = hs[sidx, pidx]  # (M, H)
    lp = head.logprobs(h, targets, impl=logprob_impl)  # (M,) fp32
    return segment_sum(lp, seg, len(seqs)), counts


def pair_logprobs(model, pairs: list[EncodedPair], cfg: DPOConfig, **kw):
    """(sums (B, 2), counts (B, 2)): column 0 chosen, 1 rejected."""
    seqs, starts = [], []
    for p in pairs:
        seqs += [p.chosen, p.rejected]
        starts += [p.chosen_start, p.rejected_start]
    sums, counts = completion_logprobs(
        model, seqs, starts, forward=cfg.forward, logprob_impl=cfg.logprob_impl, **kw
    )
    return sums.view(-1, 2), counts.view(-1, 2).to(sums.device)


@torch.no_grad()
def reference_logprobs(model, pairs: list[EncodedPair], cfg: DPOConfig, progress: bool = False):
    """Reference (frozen initial policy) log-prob sums (N, 2) fp32 and counts (N, 2), CPU."""
    from tqdm import tqdm

    sums, counts = [], []
    bs = max(cfg.batch_size, 1)
    for i in tqdm(range(0, len(pairs), bs), desc="reference log-probs", unit="batch",
                  disable=not progress):  # fmt: skip
        s, c = pair_logprobs(model, pairs[i : i + bs], cfg)
        sums.append(s.float().cpu())
        counts.append(c.cpu())
    return torch.cat(sums), torch.cat(counts)


# --------------------------------------------------------------------------------------
# schedule, checkpoints
# --------------------------------------------------------------------------------------


def make_plan(n_pairs: int, cfg: DPOConfig) -> list[list[list[int]]]:
    """Optimizer steps -> micro-batches -> pair indices. Epoch ``e`` visits the pairs in a
    permutation seeded from (seed, e); a step takes ``batch_size * grad_accum`` of them (the
    last step of an epoch may take fewer)."""
    per_step = cfg.batch_size * cfg.grad_accum
    steps = []
    for e in range(cfg.epochs):
        g = torch.Generator().manual_seed(
            int.from_bytes(
                hashlib.sha256(f"flr-dpo:{cfg.seed}:{e}".encode()).digest()[:7], "little"
            )
        )
        perm = torch.randperm(n_pairs, generator=g).tolist()
        for i in range(0, n_pairs, per_step):
            chunk = perm[i : i + per_step]
            steps.append(
                [chunk[j : j + cfg.batch_size] for j in range(0, len(chunk), cfg.batch_size)]
            )
    return steps[: cfg.max_steps] if cfg.max_steps else steps


def lr_factor(step: int, total: int, warmup: int) -> float:
    """The schedule ``f(s)`` of the module docstring."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(total - step, 0) / max(total - warmup, 1)


def _rng_state() -> dict:
    import numpy as np

    st = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [st[0], torch.from_numpy(st[1].copy()), int(st[2]), int(st[3]), float(st[4])],
    }


def _set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy(), n[2], n[3], n[4]))


def checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """Finished checkpoints in ``out_dir`` as (step, path), by step."""
    found = []
    for path in glob.glob(os.path.join(out_dir, "checkpoint-*")):
        m = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(path))
        if m and os.path.exists(os.path.join(path, "state.pt")):
            found.append((int(m.group(1)), path))
    return sorted(found)


def _save_checkpoint(out_dir, step, named, opt, sched, epoch, keep) -> str:
    path = os.path.join(out_dir, f"checkpoint-{step}")
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state = {
        "step": step,
        "params": {n: p.detach().cpu().clone() for n, p in named},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": _rng_state(),
    }
    torch.save(state, os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "trainer_state.json"), "w") as fh:
        json.dump({"step": step, "epoch": epoch}, fh)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # atomic: a checkpoint is either whole or absent
    if keep:
        for _, old in checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def _load_checkpoint(path, named, opt, sched) -> int:
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    params = dict(named)
    if set(params) != set(state["params"]):
        raise ConfigError(f"{path}: its parameters do not match this model / LoRA setting")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state["params"][n])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return int(state["step"])


# --------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------


@dataclass
class DPOResult:
    out_dir: str
    steps: int
    start_step: int
    pairs: int
    skipped_ties: int
    truncated: int
    seconds: float
    finished: bool
    last: dict = field(default_factory=dict)


def pairs_fingerprint(pairs: list[EncodedPair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.chosen, p.chosen_start, p.rejected, p.rejected_start]).encode())
    return h.hexdigest()[:16]


def _settings(cfg: DPOConfig, fingerprint: str, extra: dict | None) -> dict:
    s = {k: v for k, v in asdict(cfg).items() if k not in _RESUMABLE_FIELDS}
    return s | {"pairs_fingerprint": fingerprint} | (extra or {})


def _prepare_dir(out_dir: str, settings: dict, resume: bool, overwrite: bool) -> None:
    path = os.path.join(out_dir, "dpo_settings.json")
    if os.path.exists(path) and not overwrite:
        if not resume:
            raise ConfigError(
                f"{out_dir} already holds a DPO run: pass --resume to continue it or "
                "--overwrite to start over"
            )
        with open(path) as fh:
            old = json.load(fh)
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ConfigError(f"{out_dir} was trained with other settings ({lines}); cannot resume")
        return
    if overwrite:
        for _, ck in checkpoints(out_dir):
            shutil.rmtree(ck)
        for name in ("metrics.jsonl", "metrics.png", "reference_logps.pt"):
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(path, json.dumps(settings, indent=1, sort_keys=True))


def _wrap_lora(model, cfg: DPOConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - peft is in the [train] extra
        raise DependencyError("--lora-r > 0 needs peft: pip install 'flr-engine[train]'") from exc
    lcfg = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules="all-linear", task_type="CAUSAL_LM",
    )  # fmt: skip
    return get_peft_model(model, lcfg)


def train_dpo(
    model,
    tokenizer,
    pairs: list[EncodedPair],
    out_dir: str,
    cfg: DPOConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    settings: dict | None = None,
    skipped_ties: int = 0,
    progress: bool = True,
    stop_after: int | None = None,
) -> DPOResult:
    """Train ``model`` (in place) with DPO on ``pairs``; save the final model in ``out_dir``.

    ``settings``: extra run settings (model, data path, ...) stored with the config; a resume
    with different ones is refused. ``stop_after``: return after that many optimizer steps
    without saving a final model (an interruption; the run resumes from its checkpoints).
    A second run on the same folder (by any path) is refused while this one holds it.
    """
    os.makedirs(out_dir, exist_ok=True)
    lock = lock_exclusive(os.path.join(os.path.realpath(out_dir), "run"))  # one writer per folder
    try:
        return _train_dpo(model, tokenizer, pairs, out_dir, cfg, resume, overwrite, settings,
                          skipped_ties, progress, stop_after)  # fmt: skip
    finally:
        if lock is not None:
            lock.close()


def _train_dpo(model, tokenizer, pairs, out_dir, cfg, resume, overwrite, settings, skipped_ties,
               progress, stop_after) -> DPOResult:  # fmt: skip
    from tqdm import tqdm

    t0 = time.time()
    fp = pairs_fingerprint(pairs)
    _prepare_dir(out_dir, _settings(cfg, fp, settings), resume, overwrite)
    model.eval()  # no dropout: deterministic steps
    torch.manual_seed(cfg.seed)

    ref_path = os.path.join(out_dir, "reference_logps.pt")
    ref = None
    if os.path.exists(ref_path):
        saved = torch.load(ref_path, weights_only=True)
        if saved.get("fingerprint") == fp and saved.get("forward") == cfg.forward:
            ref = saved["sums"], saved["counts"]
    if ref is None:
        ref = reference_logprobs(model, pairs, cfg, progress=progress)
        torch.save(
            {"fingerprint": fp, "forward": cfg.forward, "sums": ref[0], "counts": ref[1]}, ref_path
        )
    ref_sums, ref_counts = ref

    if cfg.lora_r:
        model = _wrap_lora(model, cfg)
    else:
        model.requires_grad_(True)
    model.eval()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    plan = make_plan(len(pairs), cfg)
    total = len(plan)
    warmup = math.ceil(cfg.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))

    start = 0
    ckpts = checkpoints(out_dir) if resume else []
    if ckpts:
        start = _load_checkpoint(ckpts[-1][1], named, opt, sched)
        log.info("resuming from %s (step %d of %d)", ckpts[-1][1], start, total)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    kept = []
    if start and os.path.exists(metrics_path):
        with open(metrics_path) as fh:
            kept = [json.loads(x) for x in fh if x.endswith("\n")]  # a torn last line is redone
        kept = [m for m in kept if m["step"] <= start]
    atomic_write_text(metrics_path, "".join(json.dumps(m) + "\n" for m in kept))

    steps_per_epoch = max(math.ceil(len(pairs) / (cfg.batch_size * cfg.grad_accum)), 1)
    dev = next(iter(params)).device
    last: dict = kept[-1] if kept else {}
    bar = tqdm(total=total, initial=start, desc="flr dpo", unit="step", disable=not progress)
    mfh = open(metrics_path, "a")
    finished = True
    try:
        for step in range(start, total):
            ts = time.time()
            micro = plan[step]
            n_pairs = sum(len(mb) for mb in micro)
            acc = {"loss": 0.0, "margin": 0.0, "accuracy": 0.0, "chosen_drift": 0.0,
                   "rejected_drift": 0.0}  # fmt: skip
            opt.zero_grad(set_to_none=True)
            for mb in micro:
                pol, cnt = pair_logprobs(model, [pairs[i] for i in mb], cfg)  # (B, 2)
                rs = ref_sums[mb].to(dev)
                if cfg.loss == "ipo":  # per-token means (see the module docstring)
                    pol, rs = pol / cnt, rs / ref_counts[mb].to(dev)
                losses, h = dpo_loss(
                    pol[:, 0], pol[:, 1], rs[:, 0], rs[:, 1], cfg.beta, cfg.loss,
                    cfg.label_smoothing,
                )  # fmt: skip
                (losses.sum() / n_pairs).backward()
                with torch.no_grad():
                    acc["loss"] += float(losses.sum())
                    acc["margin"] += float((cfg.beta * h).sum())
                    acc["accuracy"] += float((h > 0).float().sum())
                    acc["chosen_drift"] += float((pol[:, 0] - rs[:, 0]).sum())
                    acc["rejected_drift"] += float((pol[:, 1] - rs[:, 1]).sum())
            clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            last = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4),
                    **{k: v / n_pairs for k, v in acc.items()}, "grad_norm": gnorm, "lr": lr,
                    "pairs": n_pairs, "seconds": round(time.time() - ts, 4)}  # fmt: skip
            mfh.write(json.dumps(last) + "\n")
            mfh.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['accuracy']:.2f}")
            if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == total:
                _save_checkpoint(out_dir, step + 1, named, opt, sched, last["epoch"],
                                 cfg.keep_checkpoints)  # fmt: skip
            if stop_after is not None and step + 1 >= stop_after and step + 1 < total:
                finished = False
                break
    finally:
        mfh.close()
        bar.close()
    try:
        plot_metrics(metrics_path, os.path.join(out_dir, "metrics.png"))
    except Exception as exc:  # a figure must never lose a trained model
        log.warning("could not draw metrics.png: %s", exc)
    if finished:
        final = model.merge_and_unload() if cfg.lora_r else model
        final.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return DPOResult(
        out_dir=out_dir, steps=total, start_step=start, pairs=len(pairs),
        skipped_ties=skipped_ties, truncated=sum(p.truncated for p in pairs),
        seconds=time.time() - t0, finished=finished, last=last,
    )  # fmt: skip


def plot_metrics(metrics_path: str, png_path: str) -> None:
    """Loss, reward margin, preference accuracy and log-prob drift per step (matplotlib Agg)."""
    from matplotlib.figure import Figure

    with open(metrics_path) as fh:
        rows = [json.loads(x) for x in fh if x.strip()]
    fig = Figure(figsize=(14, 3.2))
    axes = fig.subplots(1, 4)
    x = [r["step"] for r in rows]
    for ax, keys, title in zip(
        axes,
        (("loss",), ("margin",), ("accuracy",), ("chosen_drift", "rejected_drift")),
        ("loss", "reward margin beta*h", "preference accuracy", "log-prob drift vs reference"),
    ):
        for k in keys:
            ax.plot(x, [r[k] for r in rows], marker="." if len(rows) < 50 else None, label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.axhline(0, color="grey", lw=0.5)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)


def config_from_dict(values: dict) -> DPOConfig:
    names = {f.name for f in fields(DPOConfig)}
    return DPOConfig(**{k: v for k, v in values.items() if k in names})


# --------------------------------------------------------------------------------------
# TRL's DPOTrainer with the engine's packed forward
# --------------------------------------------------------------------------------------

# the keys the collator adds to TRL's batch; the patched backbone consumes them
PACK_KEYS = ("flr_pack_ids", "flr_pack_positions", "flr_pack_subtree_end", "flr_pack_node")


def pairs_rows(pairs: list[EncodedPair]) -> list[dict]:
    """TRL's pre-tokenised preference rows: ``prompt_ids`` is the longest start that both
    sequences share and that ends at or before both completions, ``chosen_ids`` /
    ``rejected_ids`` the rest (the tokens TRL scores)."""
    rows = []
    for p in pairs:
        n = 0
        limit = min(p.chosen_start, p.rejected_start)
        while n < limit and p.chosen[n] == p.rejected[n]:
            n += 1
        if n == 0:
            raise ValueError(f"pair at line {p.line}: chosen and rejected share no prompt token")
        rows.append({"prompt_ids": p.chosen[:n], "chosen_ids": p.chosen[n:],
                     "rejected_ids": p.rejected[n:]})  # fmt: skip
    return rows


def pairs_dataset(pairs: list[EncodedPair], folder: str):
    """The rows of :func:`pairs_rows` as a ``datasets.Dataset`` stored in ``folder`` (written
    by the main process, read by every rank): TRL caches the precomputed reference log-probs
    next to a dataset's files, which an in-memory dataset would put in each process's own
    temporary folder."""
    from accelerate import PartialState
    from datasets import Dataset, load_from_disk

    state = PartialState()
    with state.main_process_first():
        if state.is_main_process:
            Dataset.from_list(pairs_rows(pairs)).save_to_disk(folder)
    return load_from_disk(folder)


# --------------------------------------------------------------------------------------
# the packed batch and the packed backbone
# --------------------------------------------------------------------------------------


def pack_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """The token trie of a right-padded batch (S, L): ``flr_pack_ids``, ``_positions``,
    ``_subtree_end`` (T,) and ``flr_pack_node`` (S, L): the trie node of each token (0 on
    padding, which TRL's labels mask out)."""
    from flr_engine.engine.packer import pack_sequences

    lengths = attention_mask.sum(1)
    if not torch.equal(
        attention_mask.bool(), torch.arange(attention_mask.shape[1]) < lengths[:, None]
    ):
        raise ValueError("the packed forward needs right-padded rows (attention_mask 1...1 0...0)")
    lengths = lengths.tolist()
    seqs = [row[:n].tolist() for row, n in zip(input_ids, lengths)]
    res = pack_sequences(seqs, token_budget=max(sum(lengths), 1))
    pack = res.packs[0]  # the budget holds every token: one pack
    node = torch.zeros_like(input_ids, dtype=torch.long)
    for i, n in enumerate(lengths):
        node[i, :n] = res.nodes_of(i)
    return {"flr_pack_ids": pack.input_ids, "flr_pack_positions": pack.position_ids,
            "flr_pack_subtree_end": pack.subtree_end, "flr_pack_node": node}  # fmt: skip


class PackedPreferenceCollator:
    """TRL's ``DataCollatorForPreference`` output plus :func:`pack_batch` of it."""

    def __init__(self, **kwargs):
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        self.inner = DataCollatorForPreference(**kwargs)

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.inner(examples)
        return {**batch, **pack_batch(batch["input_ids"], batch["attention_mask"])}


def backbone_of(model):
    """The transformer body the causal LM's forward calls (``model.base_model``), under a
    peft wrapper too."""
    from flr_engine.engine.forward import base_model

    base = base_model(model)
    return base.base_model


def add_packed_backbone(model, attn_impl: str = "auto") -> None:
    """Patch ``model``'s backbone so that a call carrying the :data:`PACK_KEYS` runs the
    packed trie (see the module docstring); any other call is the original forward.
    Idempotent. Call it on the policy before TRL wraps it (peft keeps the backbone object)."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    from flr_engine.engine.attention import TreeContext, packed_forward, route_tree_attention

    body = backbone_of(model)
    if getattr(body.forward, "_flr_packed", False):
        return
    original = body.forward

    def forward(self, *args, flr_pack_ids=None, flr_pack_positions=None,
                flr_pack_subtree_end=None, flr_pack_node=None, **kwargs):  # fmt: skip
        if flr_pack_node is None:
            return original(*args, **kwargs)
        if args:
            raise TypeError("the packed forward takes keyword arguments only")
        for k in ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "cache_position"):
            kwargs.pop(k, None)
        kwargs["use_cache"] = False
        route_tree_attention(self)  # once per model; a no-op when routed
        ctx = TreeContext(flr_pack_subtree_end, flr_pack_positions, impl=attn_impl)
        with packed_forward():
            out = original(input_ids=flr_pack_ids[None], position_ids=flr_pack_positions[None],
                           flr_tree=ctx, **kwargs)  # fmt: skip
        hidden = out.last_hidden_state[0]  # (T, H)
        return BaseModelOutputWithPast(last_hidden_state=hidden[flr_pack_node])  # (S, L, H)

    forward._flr_packed = True
    body.forward = types.MethodType(forward, body)


# --------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------


@functools.cache
def _trainer_class():
    from trl import DPOTrainer

    class FLRDPOTrainer(DPOTrainer):
        """``trl.DPOTrainer`` with the engine's packed forward (see :mod:`flr_engine.dpo`).
        The same arguments; ``model`` must be a causal LM instance; ``train_dataset`` rows
        either TRL's (text or conversational, tokenised by TRL) or pre-tokenised
        (``prompt_ids``, ``chosen_ids``, ``rejected_ids``: :func:`pairs_dataset`).
        ``attn_impl``: the tree attention ("auto": the differentiable torch path when
        training, Triton for a no-grad forward on CUDA)."""

        def __init__(self, model, ref_model=None, args=None, data_collator=None,
                     train_dataset=None, eval_dataset=None, processing_class=None,
                     attn_impl: str = "auto", **kwargs):  # fmt: skip
            if isinstance(model, str):
                raise TypeError("FLRDPOTrainer needs a model instance (load it first)")
            if args is None or processing_class is None:
                raise ValueError("FLRDPOTrainer needs args (a trl.DPOConfig) and processing_class")
            add_packed_backbone(model, attn_impl)
            if ref_model is not None:
                add_packed_backbone(ref_model, attn_impl)
            self._flr_attn_impl = attn_impl
            if data_collator is None:
                tok = getattr(processing_class, "tokenizer", processing_class)
                if tok.pad_token is None:
                    tok.pad_token = tok.eos_token
                data_collator = PackedPreferenceCollator(
                    pad_token_id=tok.pad_token_id, max_length=args.max_length,
                    truncation_mode=args.truncation_mode, pad_to_multiple_of=args.pad_to_multiple_of,
                )  # fmt: skip
            super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                             train_dataset=train_dataset, eval_dataset=eval_dataset,
                             processing_class=processing_class, **kwargs)  # fmt: skip

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            first = next(iter(dataset))
            if "prompt_ids" in first and "prompt" not in first:  # pre-tokenised: TRL's columns
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def _packed_models(self) -> None:
            # a reference model TRL built itself (no precompute, or FSDP) is packed too
            if self.ref_model is not None:
                add_packed_backbone(self.accelerator.unwrap_model(self.ref_model),
                                    self._flr_attn_impl)  # fmt: skip

        def compute_ref_log_probs(self, model, inputs):
            self._packed_models()
            return super().compute_ref_log_probs(model, inputs)

        def _compute_loss(self, model, inputs, return_outputs):
            self._packed_models()
            return super()._compute_loss(model, inputs, return_outputs)

    FLRDPOTrainer.__module__ = __name__
    return FLRDPOTrainer


def __getattr__(name: str):
    if name == "FLRDPOTrainer":  # built on first use: importing this module does not import TRL
        return _trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
