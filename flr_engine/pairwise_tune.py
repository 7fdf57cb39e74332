"""Pairwise tuning of the follow-up model: train FLR's own reward margin on preference pairs.

``flr feedback-tune --objective pairwise``. Supervised fine-tuning on feedback rows (the
``sft`` objective, :mod:`flr_engine.feedback`) teaches *which* reactions follow replies; the
signal FLR needs is *which polarity* follows which reply, about one bit per row. This
objective trains that bit directly. For a pair ``(C, chosen, rejected)`` and reactions
``P`` (positive) and ``N`` (negative), ``k`` of each sampled per pair from a template set::

    lp(f | C, R) = mean over f's tokens of log p(token | C, R, f's earlier tokens)
    r(R)         = mean_{f in P} lp(f | C, R) - mean_{f in N} lp(f | C, R)     # FLR, one dimension
    loss         = -log sigmoid(beta * (r(chosen) - r(rejected)))               # Bradley-Terry

so the model learns to make positive reactions likelier after the preferred reply and
negative ones likelier after the other, i.e. FLR's own difference, not the reactions' wording.
The ``4 k`` sequences of a pair share ``C`` (and each reply is shared by its ``2 k``
reactions): a batch is one token trie (:mod:`flr_engine.engine.packer`), run once with tree
attention and a backward (:func:`~flr_engine.engine.forward.packed_hidden_states`), and only
the reactions' tokens go through the LM head (:class:`~flr_engine.engine.forward.LMHead`).

Sequences are rendered by the scorer's renderer (:func:`flr_engine.chat_formats.make_renderer`),
so the trained tokens are exactly the tokens FLR scores afterwards. The loop is
``transformers.Trainer`` (:class:`PairwiseTrainer` overrides ``compute_loss`` only): optimizer,
schedule, checkpoints, resume and logging are the library's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from flr_engine.chat import ContextTooLongError, InputError
from flr_engine.chat_formats import make_renderer
from flr_engine.io import InputFileError, RowError

log = logging.getLogger("flr_engine.pairwise_tune")


@dataclass(frozen=True)
class ReactionPool:
    """Positive and negative reaction texts (each distinct text once)."""

    positive: tuple[str, ...]
    negative: tuple[str, ...]


def load_reactions(names: str) -> ReactionPool:
    """The reactions of one or more template sets (``"a,b"``: names or files), every
    dimension pooled, duplicates dropped."""
    from flr_engine.templates import load_templates

    pos, neg = {}, {}
    for name in (n.strip() for n in names.split(",") if n.strip()):
        for _, sign, text in load_templates(name).followups:
            (pos if sign == "positive" else neg)[text] = None
    if not pos or not neg:
        raise InputFileError(f"--reactions {names}: needs positive and negative texts")
    return ReactionPool(tuple(pos), tuple(neg))


def prepare_pairs(tokenizer, items, pool: ReactionPool, k: int, fmt: str = "follow-up",
                  max_length: int | None = None, seed: int = 0, path: str = "pairs"):  # fmt: skip
    """Check every pair renders (``max_length``: the context is cut first, as in scoring)
    and draw its reactions: ``k`` positive and ``k`` negative indices into ``pool``, seeded
    per run, fixed per pair (a resumed run sees the same sequences).

    Returns ``(rows, kept_items, skipped)``: ``rows[i] = {"idx": i, "pos", "neg", "sha"}``
    (``sha`` keys the pair's text, for the run identity)."""
    if k > min(len(pool.positive), len(pool.negative)):
        raise InputFileError(f"--reactions-per-reply {k} exceeds the pool "
                             f"({len(pool.positive)} positive, {len(pool.negative)} negative)")  # fmt: skip
    renderer = make_renderer(fmt, tokenizer, max_length=max_length)
    longest = max(pool.positive + pool.negative, key=len)
    rng = random.Random(seed)
    rows, kept, skipped = [], [], 0
    for it in items:
        try:
            for reply in (it.chosen, it.rejected):
                renderer.build(it.context, reply, [longest])
        except ContextTooLongError as exc:
            skipped += 1
            log.info("skipping %s:%d: %s", path, it.line, exc)
            continue
        except InputError as exc:
            raise RowError(path, it.line, exc.field, exc.message) from None
        text = json.dumps([it.context, it.chosen, it.rejected], ensure_ascii=False)
        rows.append({"idx": len(kept), "pos": rng.sample(range(len(pool.positive)), k),
                     "neg": rng.sample(range(len(pool.negative)), k),
                     "sha": hashlib.sha1(text.encode()).hexdigest()})  # fmt: skip
        kept.append(it)
    if not rows:
        raise InputFileError(f"{path}: no pair fits max_length={max_length}")
    return rows, kept, skipped


class PairwiseCollator:
    """Rows of :func:`prepare_pairs` -> one packed trie of the batch's sequences.

    Sequence order: for pair ``b``, chosen then rejected, each with its ``k`` positive then
    ``k`` negative reactions: sequence ``s = ((b * 2 + reply) * 2 + sign) * k + j``. Output:
    the pack (``ids``, ``positions``, ``subtree_end``; (T,)), the scored tokens (``rows``:
    the trie node that predicts each, ``targets``, ``seq``: its sequence; (M,)) and ``k``.
    """

    def __init__(self, tokenizer, items, pool: ReactionPool, fmt: str = "follow-up",
                 max_length: int | None = None):  # fmt: skip
        self.items, self.pool = items, pool
        self.renderer = make_renderer(fmt, tokenizer, max_length=max_length)

    def __call__(self, rows: list[dict]) -> dict:
        from flr_engine.engine.packer import pack_sequences

        seqs = []
        for row in rows:
            it = self.items[row["idx"]]
            texts = [self.pool.positive[i] for i in row["pos"]] + [self.pool.negative[i] for i in row["neg"]]
            for reply in (it.chosen, it.rejected):
                seqs += self.renderer.build(it.context, reply, texts)
        res = pack_sequences([s.ids for s in seqs], token_budget=sum(len(s.ids) for s in seqs))
        pack = res.packs[0]  # the budget holds every token: one pack
        node_rows, targets, seq_of = [], [], []
        for i, s in enumerate(seqs):
            nodes = res.nodes_of(i)
            t = torch.tensor(s.targets)
            node_rows.append(nodes[t - 1])  # the node before a token predicts it
            targets.append(torch.tensor([s.ids[n] for n in s.targets]))
            seq_of.append(torch.full((len(s.targets),), i))
        return {"ids": pack.input_ids, "positions": pack.position_ids,
                "subtree_end": pack.subtree_end, "rows": torch.cat(node_rows),
                "targets": torch.cat(targets), "seq": torch.cat(seq_of),
                "k": len(rows[0]["pos"])}  # fmt: skip


def margins(model, batch: dict) -> torch.Tensor:
    """``r(chosen) - r(rejected)`` per pair, (B,), differentiable (see the module docstring)."""
    from flr_engine.engine.forward import LMHead, packed_hidden_states
    from flr_engine.ops.fused_logprob import segment_mean

    pack = SimpleNamespace(input_ids=batch["ids"], position_ids=batch["positions"],
                           subtree_end=batch["subtree_end"])  # what packed_hidden_states reads
    hidden = packed_hidden_states(model, pack, grad=torch.is_grad_enabled())  # (T, H)
    head = LMHead.from_model(model)
    lp = head.logprobs(hidden, batch["targets"].to(hidden.device), rows=batch["rows"].to(hidden.device))
    seq = batch["seq"].to(lp.device)
    per_seq = segment_mean(lp, seq, int(seq.max()) + 1)  # lp(f), (S,)
    per = per_seq.view(-1, 2, 2, batch["k"]).mean(-1)  # (B, reply, sign)
    reward = per[..., 0] - per[..., 1]  # (B, 2): r(chosen), r(rejected)
    return reward[:, 0] - reward[:, 1]


def pairwise_loss(model, batch: dict, beta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean_b -log sigmoid(beta * margin_b), margins)``."""
    m = margins(model, batch)
    return -torch.nn.functional.logsigmoid(beta * m).mean(), m


def trainer_class():
    """:class:`transformers.Trainer` whose loss is :func:`pairwise_loss`; it also logs the
    batch accuracy (margin > 0) and mean margin over each logging window."""
    from transformers import Trainer

    class PairwiseTrainer(Trainer):
        def __init__(self, *args, beta: float = 1.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.beta = beta
            self._window: list[torch.Tensor] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, m = pairwise_loss(model, inputs, self.beta)
            self._window.append(m.detach().float().cpu())
            return (loss, {"margins": m}) if return_outputs else loss

        def log(self, logs: dict, *args, **kwargs):
            if self._window and "loss" in logs:
                m = torch.cat(self._window)
                logs["pair_accuracy"] = round(float((m > 0).float().mean()), 4)
                logs["margin"] = round(float(m.mean()), 5)
                self._window = []
            super().log(logs, *args, **kwargs)

    return PairwiseTrainer
