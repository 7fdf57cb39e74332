from __future__ import annotations

import json
import os

import pytest

from flr_engine.templates import TemplateError, load_templates

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "templates")


@pytest.mark.parametrize("name", ["flr-helpfulness", "flr-mixed"])
def test_builtin_sets_are_byte_exact_copies(name):
    path = os.path.join(SHARED, f"{name}.json")
    if not os.path.exists(path):
        pytest.skip(f"{path} absent: cannot compare with the published file")
    from importlib import resources

    shipped = (resources.files("flr_engine") / "data" / "templates" / f"{name}.json").read_bytes()
    with open(path, "rb") as fh:
        assert shipped == fh.read()


def test_helpfulness_shape_and_duplicates_kept():
    ts = load_templates("flr-helpfulness")
    assert ts.dimension_names == [
        "understanding", "relevance", "correctness", "engagingness", "informativeness", "following",
    ]
    assert all(len(d.positive) == 10 and len(d.negative) == 10 for d in ts.dimensions)
    assert len(ts.followups) == 120
    assert len(ts.unique_texts) < 120  # the published lists repeat some utterances
    assert "That’s not really relevant here." in ts.unique_texts  # curly apostrophe as published
    assert load_templates("flr-mixed").dimension_names == ["overall"]


def test_select_dimensions():
    ts = load_templates("flr-helpfulness").select(["relevance"])
    assert ts.dimension_names == ["relevance"] and len(ts.followups) == 20
    with pytest.raises(TemplateError, match="no dimension"):
        load_templates().select(["nope"])


def test_user_sets_json_and_yaml(tmp_path):
    spec = {"name": "mine", "dimensions": {"d": {"positive": ["Great."], "negative": ["Bad."]}}}
    p = tmp_path / "t.json"
    p.write_text(json.dumps(spec))
    assert load_templates(str(p)).followups == [("d", "positive", "Great."), ("d", "negative", "Bad.")]
    y = tmp_path / "t.yaml"
    y.write_text("name: mine\ndimensions:\n  d:\n    positive: [Great.]\n    negative: [Bad.]\n")
    assert load_templates(str(y)).followups == load_templates(str(p)).followups


@pytest.mark.parametrize(
    "spec, field",
    [
        ({}, "'dimensions'"),
        ({"dimensions": {"d": {"positive": ["a"]}}}, "'dimensions.d.negative'"),
        ({"dimensions": {"d": {"positive": ["a", ""], "negative": ["b"]}}}, "'dimensions.d.positive[1]'"),
        ({"dimensions": {"d": {"positive": ["a"], "negative": ["b"], "neutral": []}}}, "unknown field"),
        ([1, 2], "top level"),
    ],
)
def test_validation_errors_name_file_and_field(tmp_path, spec, field):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(spec))
    with pytest.raises(TemplateError) as info:
        load_templates(str(p))
    assert str(p) in str(info.value) and field in str(info.value)


def test_unknown_set_and_bad_json(tmp_path):
    with pytest.raises(TemplateError, match="unknown template set 'nope'"):
        load_templates("nope")
    p = tmp_path / "bad.json"
    p.write_text('{"dimensions": ')
    with pytest.raises(TemplateError, match="invalid JSON at line 1"):
        load_templates(str(p))
