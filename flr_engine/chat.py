"""Rendering ``C + [assistant: R] + [user: f]`` and locating the tokens to score.

Every sequence is tokenised *whole* (the rendered string of the full conversation), never as
a concatenation of separately tokenised pieces: a chat template or tokenizer that merges
tokens across a boundary cannot make a score silently wrong. The engine's prefix tree then
shares whatever token prefixes the full sequences really share.

The follow-up's scored tokens are found through the fast tokenizer's character offsets:
the tokens overlapping the follow-up content's character span in the rendered text.

Truncation policy (a conversation longer than ``max_length`` tokens): the reply and the
follow-up are always kept whole; the oldest context turns are dropped first, a user turn
together with the assistant turn after it (a system message is kept); if the last user turn
alone is still too long, its text is cut from the start. A reply + follow-up that cannot
fit raises :class:`ContextTooLongError`. ``Sequence.truncated`` records what was cut.

Injection policy (:mod:`flr_engine.control`): special-token strings inside message content
are tokenised as text; only the template's own markers are control tokens.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

from flr_engine.control import control_tokens
from flr_engine.errors import InputError

Message = dict  # {"role": "user"|"assistant"|"system", "content": str}
_SENTINEL = "\x1eFLRFOLLOWUP\x1e"


class ContextTooLongError(InputError):
    pass


@dataclass
class ScoredSequence:
    """One rendered (conversation, reply, follow-up) sequence and what to score in it.

    ``targets``: token indices ``n`` whose ``log p(ids[n] | ids[:n])`` is scored (the
    follow-up content, plus the end-of-turn token when asked). ``logit_pos`` / ``logit_ids``:
    the released scorer's "official" quantity ``mean_k logits[logit_pos, logit_ids[k]]``.
    ``reply_targets``: the reply's content tokens (for the Direct baseline).
    """

    ids: list[int]
    targets: list[int]
    logit_pos: int
    logit_ids: list[int]
    reply_targets: list[int]
    truncated: int = 0  # number of context messages dropped (+1 if the last turn was cut)


def normalize_conversation(conv: object, field: str = "context") -> list[Message]:
    """Accept a string (one user message) or a list of {role, content} dicts ending with a
    user turn; return a clean list of messages, or raise InputError naming the field."""
    if isinstance(conv, str):
        if not conv.strip():
            raise InputError("is an empty string", field)
        return [{"role": "user", "content": conv}]
    if not isinstance(conv, list) or not conv:
        raise InputError("must be a non-empty list of messages or a string", field)
    out = []
    for i, m in enumerate(conv):
        if not isinstance(m, dict):
            raise InputError(f"item {i} must be an object with role and content", field)
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant", "system"):
            raise InputError(
                f"item {i}: role must be user/assistant/system, got {role!r}", field
            )
        if not isinstance(content, str):
            raise InputError(f"item {i}: content must be a string", field)
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise InputError(
            "must end with a user turn (the reply answers it), "
            f"ends with {out[-1]['role']!r}",
            field,
        )
    return out


def normalize_reply(reply: object, field: str = "response") -> str:
    if isinstance(reply, list) and len(reply) == 1 and isinstance(reply[0], dict):
        role = reply[0].get("role", "assistant")  # TRL conversational completion
        if role != "assistant":
            raise InputError(f"the reply message must have role 'assistant', got {role!r}", field)
        reply = reply[0].get("content")
    if not isinstance(reply, str):
        raise InputError(f"must be a string, got {type(reply).__name__}", field)
    if not reply.strip():
        raise InputError("is empty: an empty reply cannot be scored", field)
    return reply


def _find_last(text: str, needle: str, end: int | None = None) -> tuple[int, int] | None:
    for cand in (needle, needle.strip()):
        i = text.rfind(cand, 0, end if end is not None else len(text))
        if cand and i >= 0:
            return i, i + len(cand)
    return None


def _tokens_in(offsets: Seq[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of tokens whose character span overlaps [start, end)."""
    return [n for n, (a, b) in enumerate(offsets) if b > start and a < end and b > a]


class ChatRenderer:
    """Renders and tokenises FLR sequences for one tokenizer (with a chat template)."""

    def __init__(self, tokenizer, max_length: int | None = None, score_eot: bool = False):
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(
                "the tokenizer has no chat template: pass chat_template= (a Jinja string) "
                "when loading the model, e.g. for a base model"
            )
        if not getattr(tokenizer, "is_fast", False):
            raise InputError("a fast (Rust) tokenizer is needed for character offsets")
        self.tok = tokenizer
        self.max_length = max_length
        self.score_eot = score_eot
        self._official_cache: dict[str, list[int]] = {}

    def render(self, messages: list[Message]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False)

    def _encode(self, texts: list[str], skeletons: list[str] | None = None):
        """Tokenise rendered texts under the injection policy (:mod:`flr_engine.control`):
        ``skeletons`` are the same renders with the content's special tokens masked."""
        return control_tokens(self.tok).encode(texts, skeletons)

    def _skeletons(self, base: list[Message], followups: Seq[str]) -> list[str] | None:
        """The renders of ``base + [user: f]`` with the content masked, or None when no
        content holds a special-token string (the plain tokenisation applies)."""
        guard = control_tokens(self.tok)
        if not guard.any_in(base) and not any(guard.contains(f) for f in followups):
            return None
        masked = guard.mask_messages(base)
        return [self.render(masked + [{"role": "user", "content": guard.mask(f)}]) for f in followups]

    def official_ids(self, followup: str) -> list[int]:
        """Token ids of the follow-up tokenised alone *with* special tokens (BOS), as the
        released scorer does."""
        if followup not in self._official_cache:
            self._official_cache[followup] = self.tok(followup).input_ids
        return self._official_cache[followup]

    def _fit(self, context: list[Message], reply: str, longest: str) -> tuple[list[Message], int]:
        """Apply the truncation policy with the longest follow-up; return (context, cut)."""
        if self.max_length is None:
            return context, 0

        def length(ctx):
            base = ctx + [{"role": "assistant", "content": reply}]
            text = self.render(base + [{"role": "user", "content": longest}])
            return len(self._encode([text], self._skeletons(base, [longest]))["input_ids"][0])

        if length(context) <= self.max_length:
            return context, 0
        system = [m for m in context[:1] if m["role"] == "system"]
        rest = context[len(system) :]
        cut = 0
        while len(rest) > 1 and length(system + rest) > self.max_length:
            drop = 2 if len(rest) > 2 and rest[1]["role"] == "assistant" else 1
            rest, cut = rest[drop:], cut + drop
            while len(rest) > 1 and rest[0]["role"] != "user":
                rest, cut = rest[1:], cut + 1
        ctx = system + rest
        if length(ctx) <= self.max_length:
            return ctx, cut
        last = ctx[-1]["content"]
        lo, hi = 0, len(last)  # binary search the largest kept suffix of the last turn
        while lo < hi:
            mid = (lo + hi + 1) // 2
            trial = ctx[:-1] + [{"role": "user", "content": last[len(last) - mid :]}]
            if length(trial) <= self.max_length:
                lo = mid
            else:
                hi = mid - 1
        if lo == 0:
            raise ContextTooLongError(
                f"reply + follow-up alone exceed the model's context of {self.max_length} tokens",
                "response",
            )
        return ctx[:-1] + [{"role": "user", "content": last[len(last) - lo :]}], cut + 1

    def build(
        self, context: list[Message], reply: str, followups: Seq[str]
    ) -> list[ScoredSequence]:
        """One ScoredSequence per follow-up, in order."""
        longest = max(followups, key=len)
        context, cut = self._fit(context, reply, longest)
        base = context + [{"role": "assistant", "content": reply}]
        texts = self._followup_texts(lambda f: base + [{"role": "user", "content": f}], followups)
        enc = self._encode(texts, self._skeletons(base, followups))
        return self._sequences(followups, texts, enc, reply, cut)

    def _followup_texts(self, messages_for, followups: Seq[str]) -> list[str]:
        """The rendered text of ``messages_for(f)`` for each follow-up ``f``: the template
        rendered once with a sentinel and filled in, unless the template transforms
        content (then each is rendered on its own)."""
        template = self.render(messages_for(_SENTINEL))
        if template.count(_SENTINEL) == 1:
            texts = [template.replace(_SENTINEL, f) for f in followups]
            if self.render(messages_for(followups[0])) == texts[0]:
                return texts
        return [self.render(messages_for(f)) for f in followups]

    def _sequences(self, followups: Seq[str], texts: list[str], enc, reply: str, cut: int) -> list[ScoredSequence]:
        """One ScoredSequence per rendered follow-up: its tokens found by character offsets
        (the last occurrence of the follow-up, then of the reply before it)."""
        out = []
        for f, text, ids, offs in zip(followups, texts, enc["input_ids"], enc["offset_mapping"]):
            fspan = _find_last(text, f)
            if fspan is None:
                raise InputError(
                    f"the chat template changed the follow-up text {f!r}: cannot locate it"
                )
            targets = _tokens_in(offs, *fspan)
            if not targets:
                raise InputError(f"follow-up {f!r} produced no tokens")
            if self.score_eot and targets[-1] + 1 < len(ids):
                targets.append(targets[-1] + 1)
            rspan = _find_last(text, reply, fspan[0])
            reply_targets = _tokens_in(offs, *rspan) if rspan else []
            off_ids = self.official_ids(f)
            logit_pos = max(len(ids) - len(off_ids), 0)
            # tokens after the last one any mode needs (end-of-turn markers) change nothing
            needed = max(targets[-1], logit_pos) + 1
            out.append(
                ScoredSequence(
                    ids=list(ids[:needed]),
                    targets=targets,
                    logit_pos=logit_pos,
                    logit_ids=off_ids,
                    reply_targets=reply_targets,
                    truncated=cut,
                )
            )
        return out


# --------------------------------------------------------------------------------------
# chat-template helpers for generation and training (flr mine, generate, dpo, feedback-tune)
# --------------------------------------------------------------------------------------

_REPLY_SENTINEL = "FLRREPLYSENTINEL7f3a"  # no whitespace / control characters: survives trim


def require_chat_template(tokenizer, what: str = "the policy") -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"{what} has no chat template: pass --chat-template FILE (a Jinja template), "
            "e.g. for a base model"
        )


def generation_prompt(tokenizer, messages: list[dict]) -> str:
    """The rendered text up to where the assistant reply starts.

    Rendered as ``messages + [assistant: SENTINEL]`` and cut at the sentinel, so templates
    without ``add_generation_prompt`` support work too; the result is exactly the prefix the
    reply sits behind in training data (:mod:`flr_engine.dpo` renders replies the same way).
    """
    full = tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": _REPLY_SENTINEL}], tokenize=False
    )
    if full.count(_REPLY_SENTINEL) == 1:
        return full[: full.index(_REPLY_SENTINEL)]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: ``eos_token_id`` plus the special token the chat
    template writes right after an assistant reply (``<|im_end|>``, ``<|eot_id|>``,
    ``<end_of_turn>``, ...), found by rendering a probe conversation."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    reply = "Hello there"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}],
        tokenize=False,
    )
    end = text.rfind(reply)
    if end >= 0:
        end += len(reply)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        special = set(tokenizer.all_special_ids) | set(
            getattr(tokenizer, "added_tokens_decoder", {})
        )
        after = [n for n, (a, b) in enumerate(enc["offset_mapping"]) if a >= end and b > a]
        for n in after[:3]:  # the first special token shortly after the reply
            tid = enc["input_ids"][n]
            if tid in special:
                if tid not in ids:
                    ids.append(int(tid))
                break
    if not ids:
        raise InputError("cannot tell the end-of-turn token: the tokenizer has no eos_token")
    return ids
