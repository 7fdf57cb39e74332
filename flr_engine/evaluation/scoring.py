"""Scoring the rows of an evaluation set: one backend pass per batch, both replies of a pair
together (the engine packs their shared conversation once).

Per reply, :func:`score_batch` records ``reward``, ``dims`` (per-dimension rewards), ``lp``
(every template's ``lp(f)``, in the template set's unique-text order), ``direct`` (the
model's own mean log-probability of the reply, the paper's Direct baseline), ``length``
(characters) and ``truncated``. :class:`RewardModelScorer` adds a sequence-classification
reward model as another column.
"""

from __future__ import annotations

import logging

from flr_engine.chat import InputError
from flr_engine.evaluation.data import EvalSet, PairItem
from flr_engine.evaluation.results import num
from flr_engine.io import RowError

log = logging.getLogger("flr_engine.eval")


def _record(res, direct: float, reply: str, texts: list[str]) -> dict:
    return {
        "reward": res.reward,
        "dims": {d: v["reward"] for d, v in res.per_dimension.items()},
        "lp": [res.template_logprobs[t] for t in texts],
        "direct": num(direct),
        "length": len(reply),
        "truncated": res.truncated,
    }


def replies(item) -> list[tuple[str, str]]:
    if isinstance(item, PairItem):
        return [("chosen", item.chosen), ("rejected", item.rejected)]
    return [("response", item.response)]


def score_batch(scorer, items: list, es: EvalSet, on_error: str) -> list[dict]:
    """Per-row records for ``items`` (all replies of the batch in one backend call)."""
    texts = scorer.templates.unique_texts
    rows, prepared, ok = [], [], []
    for it in items:
        try:
            pp = []
            for fld, reply in replies(it):
                try:
                    pp.append(scorer.prepare(it.context, reply))
                except InputError as exc:
                    f = fld if exc.field == "response" else exc.field
                    raise RowError(es.path, it.line, f, exc.message) from None
        except RowError as exc:
            if on_error == "fail":
                raise
            log.warning("skipping %s", exc)
            rows.append({"line": it.line, "id": it.id, "error": str(exc)})
            continue
        prepared += pp
        ok.append(it)
    if not ok:
        return rows
    results, direct = scorer.score_prepared_with_direct(prepared)
    k = 0
    for it in ok:
        row = {"line": it.line, "id": it.id}
        for fld, reply in replies(it):
            row[fld] = _record(results[k], direct[k], reply, texts)
            k += 1
        if not isinstance(it, PairItem):
            row["score"] = it.score
        rows.append(row)
    return sorted(rows, key=lambda r: r["line"])


class RewardModelScorer:
    """A local transformers sequence-classification model as a reward column.

    The score of a reply is the logit when the model has one label, ``logit[1] - logit[0]``
    with two, else ``log_softmax(logits)[-1]``. The text is the conversation + reply rendered
    with the tokenizer's chat template, or ``"User: ...\\n\\nAssistant: ..."`` without one;
    too long inputs are cut from the left (the reply is kept).
    """

    def __init__(self, path: str, device: str = "cpu", dtype: str = "float32"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(path)
        self.tok.truncation_side = "left"
        self.model = (
            AutoModelForSequenceClassification.from_pretrained(path, dtype=getattr(torch, dtype))
            .to(device)
            .eval()
        )
        limit = getattr(self.model.config, "max_position_embeddings", None) or 4096
        self.max_length = min(limit, self.tok.model_max_length or limit)

    def text(self, context: list[dict], reply: str) -> str:
        msgs = context + [{"role": "assistant", "content": reply}]
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(msgs, tokenize=False)
        names = {"user": "User", "assistant": "Assistant", "system": "System"}
        return "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in msgs)

    def score(self, context: list[dict], reply: str) -> float:
        enc = self.tok(
            self.text(context, reply),
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.model.device)
        with self.torch.no_grad():
            logits = self.model(**enc).logits[0].float()
        if logits.numel() == 1:
            return float(logits[0])
        if logits.numel() == 2:
            return float(logits[1] - logits[0])
        return float(self.torch.log_softmax(logits, -1)[-1])
