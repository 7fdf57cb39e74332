"""``FLRScorer``: the Python API for scoring replies with Follow-up Likelihood as Reward.

    >>> scorer = FLRScorer.from_pretrained("default")
    >>> res = scorer.score([[{"role": "user", "content": "Hi!"}]], ["Hello! How can I help?"])
    >>> res[0].reward, res[0].per_dimension["relevance"]

The scorer renders each (conversation, reply, follow-up), hands all sequences to a backend
("engine": the packed prefix-tree engine; "reference": one forward per sequence;
"hf-prefix-cache": the plain-transformers baseline), which returns raw per-sequence sums and
token counts (:mod:`flr_engine.engine.protocol`), and decides everything above them here::

    likelihood, mean:  lp(f) = sum_{n in targets} log p(ids[n] | ids[:n]) / len(targets)
    likelihood, sum:   lp(f) = sum_{n in targets} log p(ids[n] | ids[:n])
    official:          lp(f) = sum_k logits[logit_pos, logit_ids[k]] / len(logit_ids)
    Direct:            sum_{n in reply} log p(ids[n] | ids[:n]) / len(reply)     (always a mean)

then aggregates per-template scores into :class:`~flr_engine.reward.ScoreResult`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from flr_engine.chat import ScoredSequence, normalize_conversation, normalize_reply
from flr_engine.chat_formats import DEFAULT_FORMAT, make_renderer
from flr_engine.engine.protocol import SpanSums, TokenTargets
from flr_engine.errors import ConfigError, InputError
from flr_engine.reward import MODES, REDUCTIONS, RewardConfig, ScoreResult, aggregate
from flr_engine.templates import DEFAULT, TemplateSet, load_templates

log = logging.getLogger(__name__)

ENGINES = ("auto", "engine", "reference", "hf-prefix-cache")


def make_backend(model, engine: str = "auto", **engine_kwargs):
    """Pick a scoring backend. "auto" uses the packed engine and quietly falls back to the
    reference if the engine cannot run; an explicit choice fails loudly with the cause."""
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine in ("auto", "engine"):
        try:
            from flr_engine.engine.backend import EngineBackend

            return EngineBackend(model, **engine_kwargs)
        except Exception as exc:
            if engine == "engine":
                raise RuntimeError(f"engine='engine' cannot run: {exc}") from exc
            log.info("engine unavailable (%s); using the reference scorer", exc)
    if engine == "hf-prefix-cache":
        from flr_engine.baselines import PrefixCacheBackend

        return PrefixCacheBackend(model, **engine_kwargs)
    from flr_engine.reference import ReferenceBackend

    return ReferenceBackend(model)


def _means(raw: SpanSums) -> list[float]:
    """``sums / counts`` per sequence (NaN without scored tokens)."""
    return [s / n if n else math.nan for s, n in zip(raw.sums, raw.counts)]


def _raw(backend, seqs: Sequence, mode: str) -> SpanSums:
    """One backend call: raw logits (official) or log-probs (likelihood), summed."""
    return backend.logit_sums(seqs) if mode == "official" else backend.logprob_sums(seqs)


def _reduce(raw: SpanSums, mode: str, reduction: str) -> list[float]:
    return list(raw.sums) if mode == "likelihood" and reduction == "sum" else _means(raw)


def sequence_scores(
    backend, seqs: Sequence, mode: str = "likelihood", reduction: str = "mean"
) -> list[float]:
    """Each sequence's ``lp(f)`` (the module docstring's formulas) from one backend call
    (``seqs``: :class:`~flr_engine.chat.ScoredSequence` or the protocol's types)."""
    if mode not in MODES or reduction not in REDUCTIONS:
        raise ConfigError(f"mode must be one of {MODES} and reduction one of {REDUCTIONS}, "
                          f"got {mode!r}, {reduction!r}")  # fmt: skip
    return _reduce(_raw(backend, seqs, mode), mode, reduction)


class FLRScorer:
    """Scores replies by the likelihood of positive vs negative user follow-ups.

    Args:
        model, tokenizer: a transformers causal LM and its (fast) tokenizer with a chat template.
        templates: a built-in set name, a JSON/YAML path, or a TemplateSet.
        config: a RewardConfig (or pass its fields as keyword arguments).
        engine: "auto" | "engine" | "reference" | "hf-prefix-cache" (the plain-transformers baseline).
        max_length: context limit for the truncation policy (default: the model's).
        format: "follow-up" (DESIGN.md's rendering) or "role-swapped" (the paper's released
            fine-tuned scorer; see :mod:`flr_engine.chat_formats`).
    """

    def __init__(
        self,
        model,
        tokenizer,
        templates: str | TemplateSet = DEFAULT,
        config: RewardConfig | None = None,
        engine: str = "auto",
        max_length: int | None = None,
        engine_kwargs: dict | None = None,
        format: str = "follow-up",
        **config_kwargs,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or RewardConfig(**config_kwargs)
        self.templates = load_templates(templates).select(self.config.dimensions)
        if max_length is None:
            max_length = getattr(model.config, "max_position_embeddings", None)
        self.format = format
        self.renderer = make_renderer(
            format, tokenizer, max_length=max_length, score_eot=self.config.score_eot
        )
        self.backend = make_backend(model, engine, **(engine_kwargs or {}))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = "default",
        *,
        dtype: str = "float32",
        device: str = "auto",
        chat_template: str | None = None,
        format: str | None = None,
        **kwargs,
    ) -> FLRScorer:
        """Load ``default`` (SmolLM2-135M-Instruct), ``default-ft`` (the shipped feedback-tuned
        judge), a model folder (or a ``flr feedback-tune`` output), a hub id or a .gguf;
        ``device="auto"``: CUDA when there is one, else the CPU. ``format=None``: the format a
        feedback-tuned judge was trained in, else "follow-up"."""
        from flr_engine.models import load

        lm = load(name_or_path, dtype=dtype, device=device, chat_template=chat_template)
        fmt = format or getattr(lm, "format", None) or DEFAULT_FORMAT
        return cls(lm.model, lm.tokenizer, format=fmt, **kwargs)

    @property
    def engine_name(self) -> str:
        return self.backend.name

    def score(
        self,
        conversations: Sequence[object],
        replies: Sequence[object],
    ) -> list[ScoreResult]:
        """Score ``replies[i]`` as the answer to ``conversations[i]``.

        A conversation is a string (one user turn) or a list of {role, content} messages
        ending with a user turn. Returns one ScoreResult per pair.
        """
        if len(conversations) != len(replies):
            raise InputError(
                f"conversations and replies must have the same length, got "
                f"{len(conversations)} and {len(replies)}"
            )
        pairs = [
            (normalize_conversation(c, f"conversations[{i}]"), normalize_reply(r, f"replies[{i}]"))
            for i, (c, r) in enumerate(zip(conversations, replies))
        ]
        return self._score_pairs(pairs)

    def compare(self, conversation: object, replies: Sequence[object]) -> list[ScoreResult]:
        """Score several candidate replies to one conversation (they share its prefix).
        ``max(range(len(r)), key=lambda i: r[i].reward)`` is the preferred reply."""
        return self.score([conversation] * len(replies), replies)

    def prepare(self, context: object, reply: object, where: str = "") -> PreparedPair:
        """Validate and render one pair (raises InputError naming the field)."""
        ctx = normalize_conversation(context, f"{where}context" if where else "context")
        rep = normalize_reply(reply, f"{where}response" if where else "response")
        return PreparedPair(self.renderer.build(ctx, rep, self.templates.unique_texts))

    def score_prepared(self, prepared: Sequence[PreparedPair]) -> list[ScoreResult]:
        """Score already rendered pairs in one backend call (the engine packs them together)."""
        return self.score_prepared_with_direct(prepared, direct=False)[0]

    def score_prepared_with_direct(
        self, prepared: Sequence[PreparedPair], direct: bool = True
    ) -> tuple[list[ScoreResult], list[float] | None]:
        """FLR results and, with ``direct``, the paper's Direct baseline of each pair::

            direct = mean_{n in reply} log p(ids[n] | ids[:n])      (NaN: no reply tokens)

        In likelihood mode Direct comes from the same backend call: its sequence is the
        first follow-up's sequence with the reply tokens as targets, placed right after the
        pair's follow-ups, so the engine's trie shares every token and only the reply
        tokens' log-probs are extra. The official mode needs a second (likelihood) call.
        """
        texts = self.templates.unique_texts
        mode, reduction = self.config.mode, self.config.reduction
        seqs: list = []  # the main call: follow-ups (+ Direct in likelihood mode)
        extra: list[TokenTargets] = []  # Direct sequences for a second call (official mode)
        first: list[int] = []  # index in ``seqs`` of each pair's first follow-up
        where: list[int | None] = []  # index of each pair's Direct in its call
        for p in prepared:
            first.append(len(seqs))
            seqs += p.sequences
            d = _direct_sequence(p.sequences[0]) if direct else None
            call = seqs if mode == "likelihood" else extra
            where.append(None if d is None else len(call))
            if d is not None:
                call.append(d)
        raw = _raw(self.backend, seqs, mode)
        values = _reduce(raw, mode, reduction)
        direct_raw = self.backend.logprob_sums(extra) if mode == "official" and extra else raw
        results = []
        for p, i in zip(prepared, first):
            if mode == "official":
                ntok = {t: len(s.logit_ids) for t, s in zip(texts, p.sequences)}
            else:
                ntok = {t: len(s.targets) for t, s in zip(texts, p.sequences)}
            scores = dict(zip(texts, values[i : i + len(texts)]))
            results.append(aggregate(self.templates, scores, ntok, mode, p.sequences[0].truncated))
        if not direct:
            return results, None
        means = _means(direct_raw)  # Direct is a mean whatever the FLR reduction
        return results, [math.nan if w is None else means[w] for w in where]

    def _score_pairs(self, pairs: Iterable[tuple[list, str]]) -> list[ScoreResult]:
        texts = self.templates.unique_texts
        return self.score_prepared(
            [PreparedPair(self.renderer.build(c, r, texts)) for c, r in pairs]
        )


def _direct_sequence(seq: ScoredSequence) -> TokenTargets | None:
    """``seq`` scored on its reply tokens (the Direct baseline), or None without any."""
    if not seq.reply_targets:
        return None
    return TokenTargets(ids=seq.ids, targets=seq.reply_targets)


@dataclass
class PreparedPair:
    """The rendered sequences of one (conversation, reply), one per unique template text."""

    sequences: list[ScoredSequence]
