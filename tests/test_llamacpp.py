"""llama.cpp as a bench provider (flr_engine.llamacpp): grouping, tolerances, the missing extra,
and, with llama-cpp-python installed and the default model (``-m slow``), its values.

On the Q4_1 GGUF llama.cpp's values move with the batch a sequence is decoded in (8-bit
activations: a tiny change upstream flips a rounding), so the exactness checks run on an F32
copy of the GGUF (:func:`dequantize_gguf`, the weights the engine runs) with an F32 KV cache.
"""

from __future__ import annotations

import sys

import pytest

from flr_engine import bench
from flr_engine.chat import ScoredSequence
from flr_engine.errors import DependencyError
from flr_engine.llamacpp import (
    VocabMismatchError,
    _picks,
    check_vocab,
    import_llama_cpp,
    logit_positions,
    plan_groups,
)
from flr_engine.scorer import sequence_scores


def _seq(ids, targets, logit_pos=0, logit_ids=(5,)):
    return ScoredSequence(ids=list(ids), targets=list(targets), logit_pos=logit_pos,
                          logit_ids=list(logit_ids), reply_targets=[])


# ------------------------------------------------------------------ pure helpers (no llama_cpp)


def test_logits_only_where_the_next_token_is_scored():
    s = _seq([1, 2, 3, 4, 5, 6], [3, 4, 5], logit_pos=2, logit_ids=[7, 8])
    assert logit_positions(s) == [2, 3, 4]
    assert _picks(s, False) == {2: (4,), 3: (5,), 4: (6,)}
    assert logit_positions(s, official=True) == [2] and _picks(s, True) == {2: (7, 8)}


def test_groups_share_the_longest_common_prefix_up_to_the_first_scored_token():
    conv_a = list(range(100, 120))  # conversation + reply A: 20 tokens, then the follow-up
    conv_b = list(range(100, 110)) + list(range(300, 315))  # same conversation, another reply
    seqs = [
        _seq(conv_a + [7, 8, 9], [20, 21, 22]),
        _seq(conv_a + [7, 5], [20, 21]),  # shares one more token: the prefix stays at 20
        _seq(conv_a + [6, 5, 4, 3], [20, 21, 22, 23]),
        _seq(conv_b + [7, 8], [25, 26]),  # a new reply: a new group
        _seq(conv_b + [9], [25]),
        _seq(conv_b + [9], list(range(10, 26))),  # Direct-like: scores the reply -> new group
        _seq([1, 2, 3], [1, 2]),  # something else entirely
    ]
    groups = plan_groups(seqs)
    assert [(g.members, g.prefix) for g in groups] == [
        ([0, 1, 2], 20), ([3, 4], 25), ([5], 10), ([6], 1)
    ]
    for g in groups:  # no member needs a logit inside its prefix except at the last token
        for i in g.members:
            assert min(logit_positions(seqs[i])) >= g.prefix - 1
            assert seqs[i].ids[: g.prefix] == seqs[g.members[0]].ids[: g.prefix]


def test_tolerance_per_provider_pair():
    tol = bench.pair_tolerance
    assert tol("engine", "reference") == bench.EXACT_ATOL
    assert tol("engine", "llamacpp") == tol("llamacpp", "reference") == bench.TOLERANCES["llamacpp"]
    assert tol("engine-bf16", "llamacpp") == bench.TOLERANCES["engine-bf16"] + bench.TOLERANCES["llamacpp"]
    rows = [{"provider": "engine", "scores": {"0": -1.0, "1": -2.0}},
            {"provider": "reference", "scores": {"1": -2.0005}},
            {"provider": "llamacpp", "scores": {"0": -1.1, "1": -1.95}}]
    assert bench.check_agreement(rows) == pytest.approx(5e-4)  # the exact providers' worst
    d = bench.deviations(rows, "engine")
    assert d["llamacpp"]["max"] == pytest.approx(0.1) and d["llamacpp"]["median"] == pytest.approx(0.075)
    rows[2]["scores"]["0"] = -1.5
    with pytest.raises(AssertionError, match="engine and llamacpp disagree"):
        bench.check_agreement(rows)
    rows[1]["scores"]["1"] = -2.01
    with pytest.raises(AssertionError, match="engine and reference disagree"):
        bench.check_agreement(rows, tolerances={"llamacpp": 1.0})


def test_vocab_check_names_the_difference():
    class Tok:
        def __len__(self):
            return 10

        def __call__(self, text, add_special_tokens=False):
            return type("E", (), {"input_ids": [1, 2, 3, 4]})()

    check_vocab(lambda t: [1, 2, 3, 4], 10, Tok())
    with pytest.raises(VocabMismatchError, match="first difference at token 2"):
        check_vocab(lambda t: [1, 2, 9, 4], 10, Tok())
    with pytest.raises(VocabMismatchError, match="has 8 tokens but the tokenizer 10"):
        check_vocab(lambda t: [1, 2, 3, 4], 8, Tok())


def test_missing_extra_is_a_project_error_naming_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    with pytest.raises(DependencyError, match=r'pip install -e "\.\[llamacpp\]"'):
        import_llama_cpp()
    with pytest.raises(DependencyError):
        bench.run_all(["engine", "llamacpp"], log=lambda m: None)  # before any worker runs
    from flr_engine.cli import main

    assert main(["bench", "--providers", "engine,llamacpp-naive"]) == 2
    assert '.[llamacpp]' in capsys.readouterr().err


def test_unknown_provider(capsys):
    from flr_engine.cli import main

    assert main(["bench", "--providers", "engine,llama"]) == 2
    assert "unknown provider 'llama'" in capsys.readouterr().err


# ------------------------------------------------------------------ with llama.cpp and the default model


@pytest.fixture(scope="module")
def llama():
    return pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def q4_gguf(llama):
    from flr_engine.models import default_gguf

    return str(default_gguf())


@pytest.fixture(scope="module")
def f32_gguf(q4_gguf, tmp_path_factory):
    from flr_engine.llamacpp import dequantize_gguf

    return dequantize_gguf(q4_gguf, tmp_path_factory.mktemp("gguf") / "smollm2-f32.gguf")


@pytest.fixture(scope="module")
def sequences(default_tokenizer):
    """Three (conversation, reply) pairs with different prefix lengths, follow-ups of
    different lengths, and a Direct-like sequence (scores the reply)."""
    from flr_engine.chat import ChatRenderer

    r = ChatRenderer(default_tokenizer)
    followups = ["Thanks!", "That's not what I asked.", "Can you explain that in more detail, please?",
                 "You misunderstood me completely; I wanted a recipe, not a history lesson."]
    pairs = [
        ([{"role": "user", "content": "How do I boil an egg?"}], "Put it in boiling water for 8 minutes."),
        ([{"role": "user", "content": "How do I boil an egg?"}], "I don't know."),
        ([{"role": "user", "content": "Tell me about Rome."},
          {"role": "assistant", "content": "Rome is the capital of Italy, founded, legend says, in 753 BC."},
          {"role": "user", "content": "And its food? Give me three dishes and how to cook one of them."}],
         "Carbonara, cacio e pepe and amatriciana. For carbonara: fry guanciale, mix eggs and pecorino, "
         "toss with hot pasta off the heat."),
    ]
    seqs = []
    for ctx, reply in pairs:
        built = r.build(ctx, reply, followups)
        seqs += built
        s = built[0]
        seqs.append(ScoredSequence(s.ids, s.reply_targets, 0, [], s.reply_targets))  # Direct
    return seqs


def _reference(default_model_dir, seqs, mode="likelihood", reduction="mean"):
    from flr_engine.models import load
    from flr_engine.reference import ReferenceBackend

    return sequence_scores(ReferenceBackend(load(str(default_model_dir)).model), seqs, mode, reduction)


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grouped_batches_equal_each_sequence_alone(f32_gguf, sequences, reduction):
    """The prefix / seq_cp / wave logic alone: small waves (n_seq_max=3) and decode calls of
    32 tokens (prefixes cut across calls) give what one sequence at a time gives."""
    from flr_engine.llamacpp import LlamaCppBackend

    b = LlamaCppBackend(f32_gguf, n_seq_max=3, n_batch=32, n_ubatch=32, kv_f32=True)
    grouped = sequence_scores(b, sequences, reduction=reduction)
    # pair 1's follow-ups | its Direct + pair 2 (same conversation, the prefix ends at the
    # reply) | pair 3's follow-ups | its Direct
    assert b.last_stats["groups"] == 4
    alone = [sequence_scores(b, [s], reduction=reduction)[0] for s in sequences]
    assert grouped == pytest.approx(alone, abs=1e-5)
    wide = sequence_scores(LlamaCppBackend(f32_gguf, kv_f32=True), sequences, reduction=reduction)
    assert wide == pytest.approx(alone, abs=1e-5)


@pytest.mark.slow
def test_batched_equals_naive_on_the_same_gguf(f32_gguf, sequences, default_tokenizer):
    from flr_engine.llamacpp import LlamaCppBackend, LlamaCppNaiveBackend

    batched = LlamaCppBackend(f32_gguf, default_tokenizer, kv_f32=True)
    naive = LlamaCppNaiveBackend(f32_gguf, default_tokenizer, kv_f32=True)
    official = [s for s in sequences if s.logit_ids]  # not the Direct ones
    assert sequence_scores(batched, sequences) == pytest.approx(sequence_scores(naive, sequences), abs=1e-4)
    assert sequence_scores(batched, official, "official") == pytest.approx(
        sequence_scores(naive, official, "official"), abs=1e-4)
    naive.close()


@pytest.mark.slow
def test_f32_gguf_equals_the_reference(f32_gguf, sequences, default_model_dir, default_tokenizer):
    """llama.cpp on the de-quantised weights the engine runs, F32 KV cache: the reference's
    values (measured 1.3e-5)."""
    from flr_engine.llamacpp import LlamaCppBackend

    b = LlamaCppBackend(f32_gguf, default_tokenizer, kv_f32=True)
    assert sequence_scores(b, sequences) == pytest.approx(_reference(default_model_dir, sequences), abs=1e-4)
    official = [s for s in sequences if s.logit_ids]  # raw logits, not log-probs
    assert sequence_scores(b, official, "official") == pytest.approx(
        _reference(default_model_dir, official, "official"), abs=1e-3)


@pytest.mark.slow
def test_q4_gguf_within_its_tolerance(q4_gguf, sequences, default_model_dir, default_tokenizer):
    """The shipped Q4_1 GGUF (8-bit activations, f16 KV): within the bench's tolerance."""
    from flr_engine.llamacpp import LlamaCppBackend, LlamaCppNaiveBackend

    ref = _reference(default_model_dir, sequences)
    for backend in (LlamaCppBackend(q4_gguf, default_tokenizer), LlamaCppNaiveBackend(q4_gguf, default_tokenizer)):
        assert sequence_scores(backend, sequences) == pytest.approx(ref, abs=bench.TOLERANCES["llamacpp"])
        backend.close()


@pytest.mark.slow
def test_vocab_of_another_tokenizer_is_refused(q4_gguf):
    from tiny import make_tokenizer

    from flr_engine.llamacpp import LlamaCppBackend

    with pytest.raises(VocabMismatchError):
        LlamaCppBackend(q4_gguf, make_tokenizer("chatml"))
