"""llama.cpp as a scoring backend: a CPU peer of the engine that nobody here wrote.

Optional (``pip install -e ".[llamacpp]"``: ``llama-cpp-python``); used by ``flr bench``'s
``llamacpp`` and ``llamacpp-naive`` providers. Both take the token ids the transformers
tokenizer rendered (so every provider scores identical tokens; the GGUF's vocabulary is
checked against the tokenizer on load) and implement the scoring-backend protocol
(:mod:`flr_engine.engine.protocol`) as the other backends do: ``logprob_sums`` (per sequence
the sum and count of ``log p(ids[n] | ids[:n])`` over ``targets``) and ``logit_sums`` (the
raw logits at ``logit_pos`` summed over ``logit_ids``).

* ``LlamaCppBackend`` (provider ``llamacpp``), llama.cpp used at its best through the
  low-level API: consecutive sequences that share a prefix (conversation + reply) form a
  group; the group's longest common prefix is decoded once into sequence 0 and
  ``llama_memory_seq_cp``-ed to sequences 1..k (a unified KV cache, so the cells are
  shared, not copied); then the follow-ups' suffixes go into one ``llama_batch`` per wave,
  each follow-up its own sequence id, with logits requested only at the positions whose
  next token is scored. Log-softmax in numpy (float64 sums). The sequences are removed
  between waves and groups; the prefix stays for the next wave.
* ``LlamaCppNaiveBackend`` (provider ``llamacpp-naive``), what a new user writes with the
  high-level API: ``Llama(..., logits_all=True)``, the prefix evaluated once per reply,
  ``n_tokens`` rewound to the prefix for each follow-up, log-probs read from all-position
  logits (``Llama.scores``).

Both multiply the GGUF's weights as stored: for the default model Q4_1 (the LM head Q8_0)
times activations quantised to 8 bits, so they differ from the engine, which runs the same
weights de-quantised to fp32, by more than rounding (see the README's Speed section).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from flr_engine.engine.protocol import LogitTargets, SpanSums, TokenTargets
from flr_engine.errors import ConfigError, DependencyError, FLRError

log = logging.getLogger(__name__)

EXTRA_HINT = 'pip install -e ".[llamacpp]"  (llama-cpp-python>=0.3.36,<0.4)'
# checked against the tokenizer on load: chat markup, spaces, digits, unicode, code
VOCAB_PROBE = (
    "<|im_start|>user\nHow do I bake bread? I've 2 cups of flour, 1.5 tsp of salt...<|im_end|>\n"
    "<|im_start|>assistant\nMix, knead (10 min), rest; bake at 230 °C — naïve café 👍\n"
    "def f(x):\n    return x ** 2  # done<|im_end|>\n"
)


class VocabMismatchError(FLRError, ValueError):
    """The GGUF's tokenizer does not give the transformers tokenizer's token ids."""


def import_llama_cpp():
    """``llama_cpp``, or a :class:`DependencyError` naming the extra to install."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise DependencyError(
            f"the llama.cpp providers need llama-cpp-python: {EXTRA_HINT}"
        ) from exc
    return llama_cpp


# --------------------------------------------------------------------------- pure helpers


def lcp(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def logit_positions(seq: TokenTargets | LogitTargets, official: bool = False) -> list[int]:
    """Positions whose logits the score needs: ``n - 1`` for each scored token ``n``
    (log-probs), or ``logit_pos`` (raw logits, ``official``). Sorted, unique."""
    if official:
        return [seq.logit_pos]
    return sorted({n - 1 for n in seq.targets})


@dataclass
class Group:
    """Consecutive sequences decoded over one shared prefix ``ids[:prefix]``; every
    position whose logits are needed is ``>= prefix - 1`` (``prefix - 1``: the prefix's
    last token, computed once for the whole group)."""

    members: list[int] = field(default_factory=list)
    prefix: int = 0


def plan_groups(seqs: Sequence[TokenTargets] | Sequence[LogitTargets], official: bool = False,
                slack: int = 8) -> list[Group]:
    """Group consecutive sequences by shared prefix (conversation + reply, many follow-ups).

    A group's prefix is the longest common prefix of its members, capped so that no member
    needs a logit inside it (except at its last token). A sequence joins the running group
    unless that would shorten the group's prefix by more than ``slack`` tokens (a new
    reply or conversation, or a Direct sequence scoring the reply tokens).
    """
    groups: list[Group] = []
    for i, s in enumerate(seqs):
        cap = min(len(s.ids), logit_positions(s, official)[0] + 1)
        if groups:
            g = groups[-1]
            p = min(g.prefix, lcp(seqs[g.members[0]].ids, s.ids), cap)
            if p >= max(g.prefix - slack, 1):
                g.members.append(i)
                g.prefix = p
                continue
        groups.append(Group([i], cap))
    return groups


def logsumexp_rows(x: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp of float32 logits (R, V): exps in float32 after the max shift
    (each term exact to 1e-7 relative), their sum and the log in float64."""
    m = x.max(axis=1, keepdims=True)
    s = np.exp(x - m).sum(axis=1, dtype=np.float64)
    return m[:, 0].astype(np.float64) + np.log(s)


def default_threads() -> int:
    try:
        import torch

        return max(1, torch.get_num_threads())
    except ImportError:
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- loading


def _quiet(verbose: bool) -> None:
    # llama-cpp-python routes llama.cpp's log through this logger (its level gates printing)
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)


def check_vocab(tokenize, n_vocab: int, tokenizer, probe: str = VOCAB_PROBE) -> None:
    """Raise :class:`VocabMismatchError` unless llama.cpp's tokenizer (``tokenize(text)`` ->
    ids, special tokens parsed) gives the transformers ``tokenizer``'s ids on ``probe``
    and the vocabularies have the same size."""
    if tokenizer is None:
        return
    if len(tokenizer) > n_vocab:
        raise VocabMismatchError(
            f"the GGUF has {n_vocab} tokens but the tokenizer {len(tokenizer)}: not the same model"
        )
    want = tokenizer(probe, add_special_tokens=False).input_ids
    got = tokenize(probe)
    if got != want:
        k = lcp(got, want)
        raise VocabMismatchError(
            "the GGUF's tokenizer and the transformers tokenizer give different token ids "
            f"(first difference at token {k}: {got[k:k + 4]} vs {want[k:k + 4]}); llama.cpp "
            "would score other tokens than the other providers: use the GGUF the model was "
            "converted from"
        )


class _LlamaModel:
    """A GGUF loaded with llama.cpp's low-level API (weights mmapped, CPU)."""

    def __init__(self, gguf_path: str | os.PathLike, verbose: bool = False):
        self.lib = import_llama_cpp()
        path = str(gguf_path)
        if not os.path.isfile(path):
            raise ConfigError(f"GGUF file {path} does not exist")
        _quiet(verbose)
        self.lib.llama_backend_init()
        mparams = self.lib.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.ptr = self.lib.llama_model_load_from_file(path.encode(), mparams)
        if not self.ptr:
            raise ConfigError(f"llama.cpp cannot load {path}")
        self.path = path
        self.vocab = self.lib.llama_model_get_vocab(self.ptr)
        self.n_vocab = self.lib.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = self.lib.llama_model_n_ctx_train(self.ptr)

    def tokenize(self, text: str) -> list[int]:
        raw = text.encode("utf-8")
        n_max = len(raw) + 16
        buf = (self.lib.llama_token * n_max)()
        n = self.lib.llama_tokenize(self.vocab, raw, len(raw), buf, n_max, False, True)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needs {-n} tokens")
        return list(buf[:n])

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self.lib.llama_model_free(self.ptr)
            self.ptr = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# --------------------------------------------------------------------------- batched


class LlamaCppBackend:
    """llama.cpp, batched over shared prefixes (see the module docstring).

    Args:
        gguf_path: the GGUF to run (for the default model: :func:`flr_engine.models.default_gguf`).
        tokenizer: the transformers tokenizer the sequences were rendered with; its ids are
            checked against the GGUF's vocabulary (``None`` skips the check).
        n_threads: default ``torch.get_num_threads()`` (else ``os.cpu_count()``).
        n_ctx: KV cells, shared by all sequences (unified cache): a group's prefix plus one
            wave of suffixes must fit; waves are cut to fit.
        n_batch: tokens per ``llama_decode`` call; ``n_ubatch``: per compute graph.
        n_seq_max: sequences in the cache at once (a wave holds ``n_seq_max - 1`` follow-ups).
        flash_attn: llama.cpp's flash attention on the CPU.
        kv_f32: an fp32 KV cache (default: llama.cpp's f16).
    """

    name = "llamacpp"

    def __init__(
        self,
        gguf_path: str | os.PathLike,
        tokenizer=None,
        *,
        n_threads: int | None = None,
        n_ctx: int = 8192,
        n_batch: int = 2048,
        n_ubatch: int = 512,
        n_seq_max: int = 128,
        flash_attn: bool = False,
        kv_f32: bool = False,
        verbose: bool = False,
    ):
        if n_batch < n_seq_max:  # llama.cpp reserves an output row per sequence (else it aborts)
            raise ConfigError(f"n_batch ({n_batch}) must be at least n_seq_max ({n_seq_max})")
        self.model = _LlamaModel(gguf_path, verbose)
        lib = self.lib = self.model.lib
        check_vocab(self.model.tokenize, self.model.n_vocab, tokenizer)
        self.n_threads = n_threads or default_threads()
        cp = lib.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, min(n_ubatch, n_batch), n_seq_max
        cp.n_threads = cp.n_threads_batch = self.n_threads
        if hasattr(cp, "kv_unified"):
            cp.kv_unified = True  # seq_cp shares cells across sequences instead of copying
        if hasattr(cp, "flash_attn_type"):
            cp.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if kv_f32:
            cp.type_k = cp.type_v = lib.GGML_TYPE_F32
        cp.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model.ptr, cp)
        if not self.ctx:
            raise ConfigError(f"llama.cpp cannot create a context (n_ctx={n_ctx}, n_seq_max={n_seq_max})")
        self.n_ctx = lib.llama_n_ctx(self.ctx)
        self.n_batch = lib.llama_n_batch(self.ctx)
        self.n_seq_max = lib.llama_n_seq_max(self.ctx)
        self.mem = lib.llama_get_memory(self.ctx)
        self.batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self.n_vocab = self.model.n_vocab
        self.last_stats: dict = {}

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.model.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _decode(self, entries: list[tuple]) -> dict:
        """Decode ``entries`` ``(seq_id, pos, token, pick)`` in ``llama_decode`` calls of
        ``n_batch`` tokens, logits only where ``pick`` (token ids) is given; returns
        ``(seq_id, pos) -> (logits[pick] float64, log-sum-exp)`` for those."""
        b, lib, V = self.batch, self.lib, self.n_vocab
        got = {}
        for c0 in range(0, len(entries), self.n_batch):
            chunk = entries[c0 : c0 + self.n_batch]
            for i, (sid, pos, tok, pick) in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = pos
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = sid
                b.logits[i] = pick is not None
            b.n_tokens = len(chunk)
            rc = lib.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc}) on {len(chunk)} tokens (n_ctx={self.n_ctx})")
            idx = [i for i, e in enumerate(chunk) if e[3] is not None]
            for r0 in range(0, len(idx), 256):  # log-sum-exp in row blocks (bounded memory)
                block = idx[r0 : r0 + 256]
                x = np.empty((len(block), V), dtype=np.float32)
                for r, i in enumerate(block):
                    x[r] = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, i), shape=(V,))
                for r, z in zip(range(len(block)), logsumexp_rows(x)):
                    sid, pos, _, pick = chunk[block[r]]
                    got[(sid, pos)] = (x[r, list(pick)].astype(np.float64), float(z))
        return got

    def logprob_sums(self, seqs: Sequence[TokenTargets]) -> SpanSums:
        return self._sums(seqs, official=False)

    def logit_sums(self, seqs: Sequence[LogitTargets]) -> SpanSums:
        return self._sums(seqs, official=True)

    def _sums(self, seqs, official: bool) -> SpanSums:
        lib, mem = self.lib, self.mem
        out = [(0.0, 0)] * len(seqs)
        decoded = 0
        groups = plan_groups(seqs, official)
        for g in groups:
            lib.llama_memory_clear(mem, True)
            members = [seqs[i] for i in g.members]
            p = g.prefix
            longest = max(len(s.ids) for s in members)
            if longest > self.n_ctx:
                raise ConfigError(f"a sequence of {longest} tokens does not fit n_ctx={self.n_ctx}")
            picks = [_picks(s, official) for s in members]  # pos -> token ids read at pos
            # the prefix, once, as sequence 0; logits at its last token if a member needs them
            shared = sorted({t for pk in picks for t in pk.get(p - 1, ())})
            pre = [(0, i, members[0].ids[i], None) for i in range(p)]
            if any(p - 1 in pk for pk in picks):
                pre[-1] = (0, p - 1, members[0].ids[p - 1], tuple(shared))
            last = self._decode(pre).get((0, p - 1))
            decoded += p
            # waves of follow-ups, each its own sequence 1.., sharing the prefix's cells
            k = 0
            while k < len(members):
                wave, cells = [], p
                while (k < len(members) and len(wave) < self.n_seq_max - 1
                       and (not wave or cells + len(members[k].ids) - p <= self.n_ctx)):
                    wave.append(k)
                    cells += len(members[k].ids) - p
                    k += 1
                entries = []
                for j, m in enumerate(wave):
                    lib.llama_memory_seq_cp(mem, 0, j + 1, -1, -1)
                    s, pk = members[m], picks[m]
                    entries += [(j + 1, n, s.ids[n], pk.get(n)) for n in range(p, len(s.ids))]
                got = self._decode(entries)
                decoded += len(entries)
                for j, m in enumerate(wave):
                    vals = {}
                    for pos, pick in picks[m].items():
                        if pos >= p:
                            vals[pos] = got[(j + 1, pos)]
                        else:  # the prefix's last token: its row, shared by the group
                            row, z = last
                            vals[pos] = (row[[shared.index(t) for t in pick]], z)
                    out[g.members[m]] = _sum(members[m], vals, official)
                    lib.llama_memory_seq_rm(mem, j + 1, -1, -1)
        lib.llama_memory_clear(mem, True)
        self.last_stats = {"decoded_tokens": decoded, "groups": len(groups)}
        return SpanSums([v for v, _ in out], [n for _, n in out])


def _picks(seq, official: bool) -> dict[int, tuple[int, ...]]:
    """``pos -> token ids`` whose logits the score reads at ``pos``."""
    if official:
        return {seq.logit_pos: tuple(seq.logit_ids)}
    return {n - 1: (seq.ids[n],) for n in seq.targets}


def _sum(seq, vals: dict, official: bool) -> tuple[float, int]:
    """One sequence's (sum, count) from ``pos -> (logits[picks] float64, log-sum-exp)``."""
    if official:
        row = vals[seq.logit_pos][0]
        return float(row.sum()), len(row)
    lp = [vals[n - 1][0][0] - vals[n - 1][1] for n in seq.targets]
    return float(np.sum(lp)), len(lp)


# --------------------------------------------------------------------------- naive


class LlamaCppNaiveBackend:
    """llama.cpp through the high-level ``Llama`` class, as a new user would: all-position
    logits, the prefix evaluated once per reply, ``n_tokens`` rewound per follow-up."""

    name = "llamacpp-naive"

    def __init__(self, gguf_path: str | os.PathLike, tokenizer=None, *, n_threads: int | None = None,
                 n_ctx: int = 2048, n_batch: int = 512, kv_f32: bool = False, verbose: bool = False):
        lib = import_llama_cpp()
        if not os.path.isfile(str(gguf_path)):
            raise ConfigError(f"GGUF file {gguf_path} does not exist")
        _quiet(verbose)
        self.n_threads = n_threads or default_threads()
        self.llm = lib.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_batch, logits_all=True,
                             n_threads=self.n_threads, n_threads_batch=self.n_threads, verbose=verbose,
                             **({"type_k": 0, "type_v": 0} if kv_f32 else {}))  # 0: GGML_TYPE_F32
        check_vocab(lambda t: self.llm.tokenize(t.encode(), add_bos=False, special=True),
                    self.llm.n_vocab(), tokenizer)
        self.n_ctx = self.llm.n_ctx()
        self.last_stats: dict = {}

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None

    def logprob_sums(self, seqs: Sequence[TokenTargets]) -> SpanSums:
        return self._sums(seqs, official=False)

    def logit_sums(self, seqs: Sequence[LogitTargets]) -> SpanSums:
        return self._sums(seqs, official=True)

    def _sums(self, seqs, official: bool) -> SpanSums:
        llm = self.llm
        out = [(0.0, 0)] * len(seqs)
        decoded = 0
        for g in plan_groups(seqs, official):
            p = g.prefix
            llm.reset()
            llm.eval(seqs[g.members[0]].ids[:p])
            decoded += p
            for i in g.members:
                s = seqs[i]
                if len(s.ids) > self.n_ctx:
                    raise ConfigError(f"a sequence of {len(s.ids)} tokens does not fit n_ctx={self.n_ctx}")
                llm.n_tokens = p  # rewind to the prefix
                llm.eval(s.ids[p:])
                decoded += len(s.ids) - p
                picks = _picks(s, official)
                pos = list(picks)
                x = np.asarray(llm.scores[pos], dtype=np.float32)  # (R, V) all-position logits
                vals = {q: (row[list(picks[q])].astype(np.float64), float(z))
                        for q, row, z in zip(pos, x, logsumexp_rows(x))}
                out[i] = _sum(s, vals, official)
        self.last_stats = {"decoded_tokens": decoded}
        return SpanSums([v for v, _ in out], [n for _, n in out])


def make_llamacpp_backend(provider: str, gguf_path, tokenizer=None, **kwargs):
    """The backend of a bench provider: ``llamacpp`` or ``llamacpp-naive``."""
    if provider == "llamacpp":
        return LlamaCppBackend(gguf_path, tokenizer, **kwargs)
    if provider == "llamacpp-naive":
        return LlamaCppNaiveBackend(gguf_path, tokenizer, **kwargs)
    raise ConfigError(f"unknown llama.cpp provider {provider!r}")


__all__ = [
    "LlamaCppBackend", "LlamaCppNaiveBackend", "VocabMismatchError", "import_llama_cpp",
    "logit_positions", "plan_groups", "make_llamacpp_backend",
]


def dequantize_gguf(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Write a copy of the GGUF ``src`` with every tensor de-quantised to F32 (the same
    metadata, ``general.file_type`` = all F32): the weights the engine runs after
    transformers' conversion, for llama.cpp runs free of weight quantisation (an F32
    weight is multiplied with F32 activations, no 8-bit activation rounding)."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue
        val_type = f.types[0]
        sub_type = f.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
        value = f.contents()
        if f.name == gguf.Keys.General.FILE_TYPE:
            value = int(gguf.LlamaFileType.ALL_F32)
        writer.add_key_value(f.name, value, val_type, sub_type=sub_type)
    arrays = []
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # numpy order: ggml's reversed
        arrays.append((t.name, w))
        writer.add_tensor_info(t.name, w.shape, w.dtype, w.nbytes, gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, w in arrays:
        writer.write_tensor_data(w)
    writer.close()
    return str(dst)
