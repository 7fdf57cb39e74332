"""Reading evaluation sets: every schema, ties, and bad rows named by file, line and field."""

from __future__ import annotations

import gzip
import json

import pytest

from flr_engine.evaluation.data import EvalDataError, load_sets, read_set
from flr_engine.io import RowError

U = [{"role": "user", "content": "What is 2+2?"}]
MULTI = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
]


def write(path, rows, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_pairwise_schema_with_ties(tmp_path):
    p = write(tmp_path / "pw.jsonl.gz", [
        {"id": "a", "context": MULTI, "chosen": "4", "rejected": "5", "tie": False},
        {"id": "b", "context": U, "chosen": "4", "rejected": "four", "tie": True},
        {"context": "What is 3+3?", "chosen": "6", "rejected": "6"},  # identical: a tie
        {"context": U, "chosen": "Four.", "rejected": "No idea."},
    ], gz=True)
    es = read_set(p)
    assert (es.name, es.schema, es.kind, es.rows, es.ties) == ("pw", "pairwise", "pairwise", 4, 2)
    assert [(i.line, i.id) for i in es.items] == [(1, "a"), (4, 4)]
    assert es.items[0].context == MULTI and es.items[0].chosen == "4"


def test_rating_schema(tmp_path):
    p = write(tmp_path / "r.jsonl", [
        {"id": "x", "context": MULTI, "response": "4", "score": 4.5},
        {"context": "Hi", "response": "Hello", "score": 1},
    ])
    es = read_set(p)
    assert (es.schema, es.kind) == ("rating", "rating")
    assert [(i.response, i.score) for i in es.items] == [("4", 4.5), ("Hello", 1.0)]
    assert es.items[1].context == [{"role": "user", "content": "Hi"}]


def test_trl_explicit_prompt_strings_and_messages(tmp_path):
    p = write(tmp_path / "trl.jsonl", [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": MULTI, "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}]},
    ])
    es = read_set(p)
    assert es.schema == "trl" and es.kind == "pairwise"
    assert es.items[0].context == U and (es.items[0].chosen, es.items[0].rejected) == ("4", "5")
    assert es.items[1].context == MULTI and es.items[1].rejected == "5"


def test_trl_implicit_prompt(tmp_path):
    p = write(tmp_path / "imp.jsonl", [
        {"chosen": MULTI + [{"role": "assistant", "content": "4"}],
         "rejected": MULTI + [{"role": "assistant", "content": "22"}]},
        {"chosen": MULTI + [{"role": "assistant", "content": "4"}],
         "rejected": MULTI + [{"role": "assistant", "content": "5"}, {"role": "user", "content": "x"}]},
    ])
    with pytest.raises(RowError, match=r"imp.jsonl:2: field 'rejected': after the messages shared"):
        read_set(p)
    es = read_set(p, on_error="skip")
    assert es.schema == "trl-implicit" and es.bad == 1
    assert es.items[0].context == MULTI and (es.items[0].chosen, es.items[0].rejected) == ("4", "22")


def test_anthropic_hh_transcripts(tmp_path):
    ctx = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2+2?"
    p = write(tmp_path / "hh.jsonl", [
        {"chosen": ctx + "\n\nAssistant: It is 4.", "rejected": ctx + "\n\nAssistant: No clue."},
    ])
    es = read_set(p)
    assert es.schema == "hh"
    item = es.items[0]
    assert item.context == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    assert (item.chosen, item.rejected) == ("It is 4.", "No clue.")
    bad = write(tmp_path / "hh2.jsonl", [
        {"chosen": ctx + "\n\nAssistant: 4", "rejected": "\n\nHuman: Other\n\nAssistant: 5"},
    ])
    with pytest.raises(RowError, match="hh2.jsonl:1: field 'rejected': the transcript does not share"):
        read_set(bad)
    empty = write(tmp_path / "hh3.jsonl", [{"chosen": ctx + "\n\nAssistant:", "rejected": ctx + "\n\nAssistant: 5"}])
    with pytest.raises(RowError, match="hh3.jsonl:1: field 'chosen': is empty"):
        read_set(empty)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"context": U, "chosen": "4"}, "x.jsonl:2: field 'rejected': missing"),
        ({"context": U, "chosen": "4", "rejected": "  "}, "x.jsonl:2: field 'rejected': is empty"),
        ({"context": U + [{"role": "assistant", "content": "a"}], "chosen": "4", "rejected": "5"},
         "x.jsonl:2: field 'context': must end with a user turn"),
        ({"context": U, "chosen": "4", "rejected": "5", "tie": "no"}, "x.jsonl:2: field 'tie'"),
        ({"text": "hello"}, "x.jsonl:2: unknown row format"),
        ({"context": U, "response": "4", "score": 3}, "x.jsonl:2: mixed schemas in one file"),
        ("{broken", "x.jsonl:2: malformed JSON"),
    ],
)
def test_bad_rows_name_file_line_field(tmp_path, bad, message):
    p = write(tmp_path / "x.jsonl", [{"context": U, "chosen": "4", "rejected": "5"}, bad])
    with pytest.raises(RowError) as exc:
        read_set(p)
    assert message in str(exc.value)


def test_bad_rating_score(tmp_path):
    p = write(tmp_path / "r.jsonl", [{"context": U, "response": "4", "score": "high"}])
    with pytest.raises(RowError, match="r.jsonl:1: field 'score': must be a finite number"):
        read_set(p)


def test_skip_mode_counts_bad_rows(tmp_path):
    p = write(tmp_path / "x.jsonl", [
        {"context": U, "chosen": "4", "rejected": "5"},
        {"context": U, "chosen": "", "rejected": "5"},
        {"context": U, "response": "4", "score": 1},
        {"context": U, "chosen": "four", "rejected": "5"},
    ])
    es = read_set(p, on_error="skip")
    assert [i.line for i in es.items] == [1, 4] and es.bad == 2
    assert "x.jsonl:2: field 'chosen'" in es.errors[0] and "x.jsonl:3: mixed" in es.errors[1]


def test_empty_file_all_ties_and_folders(tmp_path):
    empty = write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(EvalDataError, match="empty.jsonl: empty: no rows"):
        read_set(empty)
    ties = write(tmp_path / "ties.jsonl", [{"context": U, "chosen": "4", "rejected": "5", "tie": True}] * 3)
    es = read_set(ties)  # documented: not an error, the report says "no non-tie pairs"
    assert (es.items, es.ties, es.kind) == ([], 3, "pairwise")
    d = tmp_path / "d"
    (d / "a").mkdir(parents=True)
    (d / "b").mkdir()
    write(d / "a" / "s.jsonl", [{"context": U, "chosen": "4", "rejected": "5"}])
    write(d / "b" / "s.jsonl.gz", [{"context": U, "response": "4", "score": 2}], gz=True)
    write(d / "notes.txt", ["ignored"])
    sets = load_sets(str(d))
    assert [(s.name, s.kind) for s in sets] == [("a-s", "pairwise"), ("b-s", "rating")]
    (tmp_path / "none").mkdir()
    with pytest.raises(EvalDataError, match="no .jsonl or .jsonl.gz files"):
        load_sets(str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError):
        load_sets(str(tmp_path / "missing.jsonl"))
