"""Reading evaluation sets: pairwise preferences and per-reply ratings.

An evaluation input is a ``.jsonl`` / ``.jsonl.gz`` file or a folder of them (searched
recursively, sorted). Each file is one *set*; its schema is detected from its rows and every
row of a file must have the same schema. Recognised schemas:

``pairwise`` (the project's, ``../shared/data/pairwise``)::

    {"context": [messages] | str, "chosen": str, "rejected": str, "tie": bool, "id": ...}

``rating`` (``../shared/data/rating``)::

    {"context": [messages] | str, "response": str, "score": float, "id": ...}

``trl`` (TRL preference, explicit prompt; strings or conversational message lists)::

    {"prompt": str | [messages], "chosen": str | [assistant message],
     "rejected": str | [assistant message]}

``trl-implicit`` (TRL preference, implicit prompt): ``chosen`` / ``rejected`` are whole
conversations (message lists); their longest common prefix of messages is the context and
each must continue it with exactly one assistant message.

``hh`` (Anthropic HH-RLHF raw transcripts): ``chosen`` / ``rejected`` are strings
``"\\n\\nHuman: ...\\n\\nAssistant: ..."``; all turns but the last assistant turn form the
context, which both transcripts must share; turn texts are stripped.

Handling of special rows (documented behaviour, not errors):

* ``tie: true`` (any pairwise schema), or ``chosen`` identical to ``rejected``: skipped and
  counted in :attr:`EvalSet.ties`. A set whose rows are all ties has no items; the report
  says "no non-tie pairs" for it.
* ``id`` is optional (the 1-based line number is used).

Errors (raised as :class:`~flr_engine.io.RowError` ``path:line: field 'f': message``): a
row of no known schema, a row whose schema differs from the file's first row (mixed
schemas), a missing or malformed field, an empty reply, a context that does not end with a
user turn, a non-numeric score. An empty file or a folder without ``.jsonl(.gz)`` files
raises :class:`EvalDataError`. With ``on_error="skip"`` bad rows are logged, counted in
:attr:`EvalSet.bad` and skipped instead (schema errors of the first row still raise).
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field

from flr_engine.chat import InputError, normalize_conversation, normalize_reply
from flr_engine.errors import ConfigError, FLRError, MissingFileError
from flr_engine.io import RowError, RowErrors, scan_jsonl

log = logging.getLogger(__name__)

SCHEMAS = ("pairwise", "rating", "trl", "trl-implicit", "hh")
PAIRWISE = ("pairwise", "trl", "trl-implicit", "hh")
EXTENSIONS = (".jsonl", ".jsonl.gz")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


class EvalDataError(FLRError, ValueError):
    """An evaluation input that cannot be used as a whole (empty, no files, ...)."""


@dataclass
class PairItem:
    """One preference pair: ``chosen`` is preferred over ``rejected`` as a reply to ``context``."""

    line: int
    id: object
    context: list[dict]
    chosen: str
    rejected: str


@dataclass
class RatingItem:
    """One rated reply: ``score`` is the (human) rating of ``response`` to ``context``."""

    line: int
    id: object
    context: list[dict]
    response: str
    score: float


@dataclass
class EvalSet:
    """The usable items of one file. ``kind`` is "pairwise" or "rating"; ``schema`` the
    detected row schema; ``rows`` the number of rows read; ``ties`` / ``bad`` the skipped ones."""

    name: str
    path: str
    schema: str
    items: list[PairItem | RatingItem]
    rows: int = 0
    ties: int = 0
    bad: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "pairwise" if self.schema in PAIRWISE else "rating"


def detect_schema(obj: dict) -> str | None:
    """The schema a row looks like (by its keys and value types), or None."""
    if "context" in obj:
        if "chosen" in obj or "rejected" in obj:
            return "pairwise"
        if "response" in obj or "score" in obj:
            return "rating"
        return None
    if "prompt" in obj and ("chosen" in obj or "rejected" in obj):
        return "trl"
    if "chosen" in obj or "rejected" in obj:
        sample = obj.get("chosen", obj.get("rejected"))
        if isinstance(sample, str):
            return "hh"
        if isinstance(sample, list):
            return "trl-implicit"
    return None


def _unknown(keys) -> str:
    return (
        f"unknown row format (keys {sorted(keys)}); expected one of: "
        "context+chosen+rejected[+tie] (pairwise), context+response+score (rating), "
        "prompt+chosen+rejected (TRL), chosen+rejected message lists (TRL implicit prompt), "
        "chosen+rejected HH transcripts ('\\n\\nHuman: ...\\n\\nAssistant: ...')"
    )


def _need(path: str, line: int, obj: dict, *keys: str) -> None:
    for k in keys:
        if k not in obj:
            raise RowError(path, line, k, "missing")


def _conv(path: str, line: int, value: object, fld: str) -> list[dict]:
    try:
        return normalize_conversation(value, fld)
    except InputError as exc:
        raise RowError(path, line, exc.field, exc.message) from None


def _reply(path: str, line: int, value: object, fld: str) -> str:
    try:
        return normalize_reply(value, fld)
    except InputError as exc:
        raise RowError(path, line, exc.field, exc.message) from None


def split_hh(text: object, path: str, line: int, fld: str) -> tuple[list[dict], str]:
    """Split an HH transcript into (context messages, final assistant reply)."""
    if not isinstance(text, str):
        raise RowError(path, line, fld, f"must be a string transcript, got {type(text).__name__}")
    body = text if text.startswith("\n\n") else "\n\n" + text.lstrip("\n")
    parts = _HH_TURN.split(body)
    if parts[0].strip() or len(parts) < 5:
        raise RowError(
            path, line, fld,
            "not an HH transcript: expected '\\n\\nHuman: ...\\n\\nAssistant: ...' turns",
        )
    msgs = [
        {"role": "user" if role == "Human" else "assistant", "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2])
    ]
    if msgs[-1]["role"] != "assistant":
        raise RowError(path, line, fld, "the transcript must end with an Assistant turn")
    context = _conv(path, line, msgs[:-1], fld)
    return context, _reply(path, line, msgs[-1]["content"], fld)


def _split_implicit(path: str, line: int, obj: dict) -> tuple[list[dict], str, str]:
    convs = {}
    for k in ("chosen", "rejected"):
        v = obj[k]
        if not isinstance(v, list) or not all(isinstance(m, dict) for m in v):
            raise RowError(path, line, k, "must be a list of messages (TRL implicit prompt)")
        convs[k] = v
    c, r = convs["chosen"], convs["rejected"]
    n = 0
    while n < min(len(c), len(r)) and c[n] == r[n]:
        n += 1
    for k, conv in convs.items():
        rest = conv[n:]
        if len(rest) != 1 or rest[0].get("role") != "assistant":
            raise RowError(
                path, line, k,
                "after the messages shared with the other reply, expected exactly one "
                f"assistant message, got {len(rest)} message(s)",
            )
    context = _conv(path, line, c[:n], "chosen")
    return context, _reply(path, line, [c[n]], "chosen"), _reply(path, line, [r[n]], "rejected")


def parse_row(path: str, line: int, obj: dict, schema: str) -> PairItem | RatingItem | None:
    """Parse one row of a known schema; None for a tie (to be skipped)."""
    rid = obj.get("id", line)
    if schema == "rating":
        _need(path, line, obj, "context", "response", "score")
        score = obj["score"]
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(
            score
        ):
            raise RowError(path, line, "score", f"must be a finite number, got {score!r}")
        return RatingItem(
            line, rid, _conv(path, line, obj["context"], "context"),
            _reply(path, line, obj["response"], "response"), float(score),
        )
    _need(path, line, obj, *(("prompt",) if schema == "trl" else ()), "chosen", "rejected")
    if schema == "pairwise":
        _need(path, line, obj, "context")
    tie = obj.get("tie", False)
    if not isinstance(tie, bool):
        raise RowError(path, line, "tie", f"must be true or false, got {tie!r}")
    if schema == "hh":
        ctx, chosen = split_hh(obj["chosen"], path, line, "chosen")
        ctx_r, rejected = split_hh(obj["rejected"], path, line, "rejected")
        if ctx_r != ctx:
            raise RowError(
                path, line, "rejected",
                "the transcript does not share the conversation of 'chosen' (all turns but "
                "the last assistant reply must be identical)",
            )
    elif schema == "trl-implicit":
        ctx, chosen, rejected = _split_implicit(path, line, obj)
    else:
        key = "context" if schema == "pairwise" else "prompt"
        ctx = _conv(path, line, obj[key], key)
        chosen = _reply(path, line, obj["chosen"], "chosen")
        rejected = _reply(path, line, obj["rejected"], "rejected")
    if tie or chosen == rejected:
        return None
    return PairItem(line, rid, ctx, chosen, rejected)


def set_name(path: str) -> str:
    base = os.path.basename(path)
    for ext in EXTENSIONS[::-1]:
        if base.endswith(ext):
            return base[: -len(ext)]
    return base


def read_set(path: str, name: str | None = None, on_error: str = "fail") -> EvalSet:
    """Read one file into an :class:`EvalSet` (see the module docstring for the rules)."""
    if on_error not in ("fail", "skip"):
        raise ConfigError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    schema, first = None, 0
    out = EvalSet(name or set_name(path), path, "", [])
    problems: list[RowError] = []
    for line, obj in scan_jsonl(path):  # the whole file, before any compute
        out.rows += 1
        try:
            if isinstance(obj, RowError):
                raise obj
            found = detect_schema(obj)
            if found is None:
                raise RowError(path, line, None, _unknown(obj))
            if schema is None:
                schema, first = found, line
            elif found != schema:
                raise RowError(
                    path, line, None,
                    f"mixed schemas in one file: this row looks like {found!r}, line {first} "
                    f"(the first row) like {schema!r}; put each schema in its own file",
                )
            item = parse_row(path, line, obj, schema)
        except RowError as exc:
            if on_error == "fail":
                problems.append(exc)
                continue
            if schema is None:
                raise
            log.warning("skipping %s", exc)
            out.bad += 1
            out.errors.append(str(exc))
            continue
        if item is None:
            out.ties += 1
        else:
            out.items.append(item)
    if problems:
        raise RowErrors(problems)
    if out.rows == 0:
        raise EvalDataError(f"{path}: empty: no rows to evaluate")
    out.schema = schema or ""
    return out


def find_files(path: str) -> list[str]:
    """``path`` itself if a file, else the ``.jsonl(.gz)`` files below it, sorted."""
    if not os.path.exists(path):
        raise MissingFileError(f"evaluation data {path} does not exist")
    if os.path.isfile(path):
        return [path]
    found = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if f.endswith(EXTENSIONS)]
    if not found:
        raise EvalDataError(f"{path}: no .jsonl or .jsonl.gz files in this folder")
    return found


def load_sets(paths: list[str] | str, on_error: str = "fail") -> list[EvalSet]:
    """Read every file of ``paths`` (files or folders). Set names are the file names without
    extension; when two files share a name, their parent folder is prepended."""
    if isinstance(paths, str):
        paths = [paths]
    files = list(dict.fromkeys(f for p in paths for f in find_files(p)))
    bases = [set_name(f) for f in files]
    names = list(bases)
    for i, f in enumerate(files):
        if bases.count(bases[i]) > 1:
            parent = os.path.basename(os.path.dirname(os.path.abspath(f)))
            names[i] = f"{parent}-{set_name(f)}"
    if len(set(names)) != len(names):
        raise EvalDataError(f"two evaluation files have the same name: {files}")
    return [read_set(f, n, on_error) for f, n in zip(files, names)]
