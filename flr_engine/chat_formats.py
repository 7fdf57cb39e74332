"""Conversation formats a follow-up model can be scored (and feedback-tuned) in.

* ``follow-up`` (DESIGN.md's definition, the default): ``C + [assistant: R] + [user: f]``;
  rendered by :class:`flr_engine.chat.ChatRenderer`.
* ``role-swapped``: the FLR paper's released fine-tuned scorer (``run_llama3_ft.py``): the
  model plays the *user*, who asked the question and now gives feedback on the answer::

      user:      "Please ask me a question and provide feedback to my answer."
      assistant: <the last user query of C>
      user:      R
      assistant: f

  Only the last query/reply pair is kept (earlier turns of ``C`` are dropped, as the
  released script does). ``lp(f)`` is the mean log-probability of ``f``'s content tokens in
  the assistant turn, exactly as in the follow-up format.

Both renderers return :class:`~flr_engine.chat.ScoredSequence` objects, so the backends,
the reward aggregation and feedback fine-tuning (:mod:`flr_engine.feedback`) use them the
same way: the tokens trained on are the tokens scored.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

from flr_engine.chat import (
    ChatRenderer,
    ContextTooLongError,
    InputError,
    Message,
    ScoredSequence,
)

FORMATS = ("follow-up", "role-swapped")
DEFAULT_FORMAT = "follow-up"
ROLE_SWAP_INSTRUCTION = "Please ask me a question and provide feedback to my answer."


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise InputError(f"format must be one of {FORMATS}, got {fmt!r}", "format")
    return fmt


def last_query(context: list[Message]) -> str:
    """The content of the last user turn (a normalised context always ends with one)."""
    return next(m["content"] for m in reversed(context) if m["role"] == "user")


def role_swapped_messages(context: list[Message], reply: str, feedback: str) -> list[Message]:
    """The paper's role-swapped conversation for (last query of ``context``, reply, feedback)."""
    return [
        {"role": "user", "content": ROLE_SWAP_INSTRUCTION},
        {"role": "assistant", "content": last_query(context)},
        {"role": "user", "content": reply},
        {"role": "assistant", "content": feedback},
    ]


class RoleSwappedRenderer(ChatRenderer):
    """Renders the role-swapped format; the scored tokens are the feedback (assistant turn).

    Truncation: the instruction, the reply and the follow-up are kept whole; a query too
    long for ``max_length`` is cut from its start (``ScoredSequence.truncated`` = 1). The
    Direct baseline's tokens (``reply_targets``) are the reply's, here inside a user turn.
    """

    def _fit_query(self, query: str, reply: str, longest: str) -> tuple[str, int]:
        if self.max_length is None:
            return query, 0

        def length(q: str) -> int:
            text = self.render(role_swapped_messages([{"role": "user", "content": q}], reply, longest))
            return len(self._encode([text])["input_ids"][0])

        if length(query) <= self.max_length:
            return query, 0
        lo, hi = 0, len(query)  # the largest kept suffix of the query
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if length(query[len(query) - mid :]) <= self.max_length:
                lo = mid
            else:
                hi = mid - 1
        if lo == 0:
            raise ContextTooLongError(
                f"reply + follow-up alone exceed the model's context of {self.max_length} tokens",
                "response",
            )
        return query[len(query) - lo :], 1

    def build(
        self, context: list[Message], reply: str, followups: Seq[str]
    ) -> list[ScoredSequence]:
        """One ScoredSequence per follow-up, in order (the role-swapped rendering)."""
        query, cut = self._fit_query(last_query(context), reply, max(followups, key=len))
        ctx = [{"role": "user", "content": query}]
        texts = self._followup_texts(lambda f: role_swapped_messages(ctx, reply, f), followups)
        return self._sequences(followups, texts, self._encode(texts), reply, cut)


def make_renderer(
    fmt: str, tokenizer, max_length: int | None = None, score_eot: bool = False
) -> ChatRenderer:
    """The renderer of format ``fmt`` ("follow-up" | "role-swapped")."""
    cls = RoleSwappedRenderer if check_format(fmt) == "role-swapped" else ChatRenderer
    return cls(tokenizer, max_length=max_length, score_eot=score_eot)
