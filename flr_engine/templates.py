"""Follow-up template sets.

A template set is a mapping ``dimension -> {positive: [str], negative: [str]}``: the
follow-up utterances whose likelihood after a reply is the reward signal. Two sets from the
FLR paper ship with the package, byte-exact (see ``data/templates/LICENSE``):

* ``flr-helpfulness``: 6 dimensions x (10 positive + 10 negative), the released scorer's.
* ``flr-mixed``: one dimension ``overall`` with 20 + 20.

User sets are JSON or YAML files with the same schema::

    {"name": "...", "source": "...", "dimensions": {"dim": {"positive": [...], "negative": [...]}}}

Duplicates inside a list are kept: they weight the mean, as in the paper's released lists.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources

from flr_engine.errors import FLRError

BUILTIN = ("flr-helpfulness", "flr-mixed")
DEFAULT = "flr-helpfulness"


class TemplateError(FLRError, ValueError):
    """A template set that cannot be used; the message names the file and field."""


@dataclass(frozen=True)
class Dimension:
    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]


@dataclass(frozen=True)
class TemplateSet:
    """A validated template set. ``followups`` lists every (dimension, sign, text) once per
    occurrence, in a fixed order that all scorers share."""

    name: str
    dimensions: tuple[Dimension, ...]
    source: str = ""
    path: str | None = field(default=None, compare=False)

    @property
    def dimension_names(self) -> list[str]:
        return [d.name for d in self.dimensions]

    @property
    def followups(self) -> list[tuple[str, str, str]]:
        """(dimension, "positive"|"negative", text) for every template occurrence."""
        out = []
        for d in self.dimensions:
            out += [(d.name, "positive", t) for t in d.positive]
            out += [(d.name, "negative", t) for t in d.negative]
        return out

    @property
    def unique_texts(self) -> list[str]:
        """Distinct follow-up texts in first-seen order (each is scored once)."""
        return list(dict.fromkeys(t for _, _, t in self.followups))

    def select(self, dimensions: list[str] | None) -> TemplateSet:
        """The same set restricted to ``dimensions`` (None keeps all)."""
        if not dimensions:
            return self
        known = {d.name: d for d in self.dimensions}
        missing = [d for d in dimensions if d not in known]
        if missing:
            raise TemplateError(
                f"template set {self.name!r} has no dimension(s) {missing}; it has {sorted(known)}"
            )
        return TemplateSet(self.name, tuple(known[d] for d in dimensions), self.source, self.path)


def _validate(obj: object, where: str) -> TemplateSet:
    if not isinstance(obj, dict):
        raise TemplateError(
            f"{where}: expected a JSON object at top level, got {type(obj).__name__}"
        )
    dims = obj.get("dimensions")
    if not isinstance(dims, dict) or not dims:
        raise TemplateError(f"{where}: field 'dimensions' must be a non-empty object")
    out = []
    for dname, spec in dims.items():
        if not isinstance(spec, dict):
            raise TemplateError(f"{where}: field 'dimensions.{dname}' must be an object")
        lists = {}
        for sign in ("positive", "negative"):
            items = spec.get(sign)
            if not isinstance(items, list) or not items:
                raise TemplateError(
                    f"{where}: field 'dimensions.{dname}.{sign}' must be a non-empty list of strings"
                )
            for i, t in enumerate(items):
                if not isinstance(t, str) or not t.strip():
                    raise TemplateError(
                        f"{where}: field 'dimensions.{dname}.{sign}[{i}]' must be a non-empty "
                        f"string, got {t!r}"
                    )
            lists[sign] = tuple(items)
        extra = set(spec) - {"positive", "negative"}
        if extra:
            raise TemplateError(
                f"{where}: unknown field(s) {sorted(extra)} in 'dimensions.{dname}'"
            )
        out.append(Dimension(dname, lists["positive"], lists["negative"]))
    name = obj.get("name", "custom")
    if not isinstance(name, str):
        raise TemplateError(f"{where}: field 'name' must be a string")
    return TemplateSet(name, tuple(out), str(obj.get("source", "")))


def _read_file(path: str) -> object:
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TemplateError(f"{path}: not UTF-8 ({exc})") from None
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise TemplateError(f"{path}: invalid YAML: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TemplateError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None


def load_templates(name_or_path: str | TemplateSet = DEFAULT) -> TemplateSet:
    """Load a built-in set by name (``flr-helpfulness``, ``flr-mixed``) or a JSON/YAML file."""
    if isinstance(name_or_path, TemplateSet):
        return name_or_path
    if name_or_path in BUILTIN:
        ref = resources.files("flr_engine") / "data" / "templates" / f"{name_or_path}.json"
        return _validate(json.loads(ref.read_text(encoding="utf-8")), f"built-in {name_or_path}")
    if os.path.exists(name_or_path):
        ts = _validate(_read_file(name_or_path), name_or_path)
        return TemplateSet(ts.name, ts.dimensions, ts.source, name_or_path)
    raise TemplateError(
        f"unknown template set {name_or_path!r}: not a built-in ({', '.join(BUILTIN)}) "
        "and no such file"
    )
