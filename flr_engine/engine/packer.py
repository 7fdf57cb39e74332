"""Token-trie packer: many token sequences with shared prefixes -> a few packed tries.

A batch of scoring sequences (conversation prefix + reply + follow-up) shares long prefixes.
The packer stores every shared prefix once: each *pack* is the token trie (prefix tree) of a
run of consecutive input sequences, laid out in DFS pre-order (children in first-insertion
order), holding at most ``token_budget`` unique tokens.

Example: sequences ``A=[5, 6, 7]``, ``B=[5, 6, 8]``, ``C=[5, 9]``, ``D=[3, 4]`` pack into one
forest of two roots::

    trie                 packed index (pre-order)
    5 ── 6 ── 7          0 ── 1 ── 2
    │    └─── 8          │    └─── 3
    └─── 9               └─── 4
    3 ── 4               5 ── 6

    index          0   1   2   3   4   5   6
    input_ids      5   6   7   8   9   3   4
    position_ids   0   1   2   2   1   0   1     depth = position in every sequence through it
    parent        -1   0   1   1   0  -1   5     -1 marks a root
    subtree_end    5   4   3   4   5   7   7     one past the node's last descendant

    node_index: A -> [0, 1, 2]   B -> [0, 1, 3]   C -> [0, 4]   D -> [5, 6]

Ancestor invariant (what tree attention uses): node ``j`` is an ancestor-or-self of node ``i``
iff ``j <= i < subtree_end[j]``. E.g. the ancestors-or-self of node 3 are 0, 1 and 3 (node 2
fails: ``subtree_end[2] == 3``), exactly the path ``5, 6, 8`` of sequence B. So attending from
``i`` to every ``j`` satisfying the invariant is causal attention along the sequence through
``i``, and the logits at node ``i`` predict the token of any child of ``i``: the log-prob of
token ``k >= 1`` of sequence ``s`` is read at node ``nodes_of(s)[k - 1]`` for target ``s[k]``.

Packing policy: sequences are taken in input order; a sequence joins the current pack if the
pack's unique-token count after inserting it stays ``<= token_budget`` (new tokens = its length
minus the longest prefix already in the trie), else the pack is closed and a new one starts with
it. A single sequence longer than ``token_budget`` therefore gets a pack of its own, the only
case where a pack exceeds the budget. Identical sequences share all their nodes. Empty
sequences are rejected (``ValueError`` naming the index).

Two implementations with identical output: the C++ extension (``flr_engine._C``, used when
built) and :func:`pack_sequences_python`, a plain dict-based trie (fallback and test reference).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "PackedBatch",
    "PackResult",
    "cpp_available",
    "pack_flat",
    "pack_sequences",
    "pack_sequences_python",
]

Impl = Literal["auto", "cpp", "python"]

_BUILD_HINT = (
    "the C++ extension flr_engine._C is not built (or is stale and lacks pack_sequences); "
    "build it from the repository root with `python setup.py build_ext --inplace` "
    "(or `pip install -e . --no-build-isolation`), or pass impl='python'"
)


@dataclass
class PackedBatch:
    """One pack: the pre-order token trie of input sequences ``seq_start .. seq_end - 1``.

    All tensors are int64 of shape ``(num_unique,)`` on the CPU:

    * ``input_ids``: token of each node.
    * ``position_ids``: depth of each node (0 for a root).
    * ``parent``: packed index of the parent, -1 for a root.
    * ``subtree_end``: one past the last packed index of the node's subtree; node ``j`` is an
      ancestor-or-self of node ``i`` iff ``j <= i < subtree_end[j]``.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    parent: torch.Tensor
    subtree_end: torch.Tensor
    seq_start: int
    seq_end: int
    num_unique: int
    num_total: int

    @property
    def seq_indices(self) -> range:
        """Input indices of the sequences this pack holds (consecutive)."""
        return range(self.seq_start, self.seq_end)

    @property
    def num_seqs(self) -> int:
        return self.seq_end - self.seq_start

    def ancestor_mask(self) -> torch.Tensor:
        """Dense ``(T, T)`` bool mask, ``[i, j]`` true iff node j is an ancestor-or-self of i.

        O(T^2) memory: meant for small packs, tests and reference attention.
        """
        idx = torch.arange(self.num_unique)
        i = idx[:, None]
        return (idx[None, :] <= i) & (i < self.subtree_end[None, :])


@dataclass
class PackResult:
    """Packs of a batch plus where every token of every input sequence went.

    ``pack_of_seq`` (S,): pack holding each sequence. ``node_index`` (sum of lengths,) with
    ``seq_offsets`` (S + 1,): the packed indices, within its pack, of sequence ``s``'s tokens
    are ``node_index[seq_offsets[s]:seq_offsets[s + 1]]`` (see :meth:`nodes_of`).
    """

    packs: list[PackedBatch]
    pack_of_seq: torch.Tensor
    node_index: torch.Tensor
    seq_offsets: torch.Tensor
    token_budget: int
    impl: str  # "cpp" or "python": which packer produced it

    @property
    def num_sequences(self) -> int:
        return int(self.pack_of_seq.numel())

    @property
    def num_unique(self) -> int:
        return sum(p.num_unique for p in self.packs)

    @property
    def num_total(self) -> int:
        return sum(p.num_total for p in self.packs)

    def _check_seq(self, seq_idx: int) -> int:
        n = self.num_sequences
        s = operator.index(seq_idx)
        if s < 0:
            s += n
        if not 0 <= s < n:
            raise IndexError(f"sequence index {seq_idx} out of range for {n} sequences")
        return s

    def nodes_of(self, seq_idx: int) -> torch.Tensor:
        """Packed indices (LongTensor, a view) of sequence ``seq_idx``'s tokens in its pack."""
        s = self._check_seq(seq_idx)
        lo = int(self.seq_offsets[s])
        hi = int(self.seq_offsets[s + 1])
        return self.node_index[lo:hi]

    def pack_for(self, seq_idx: int) -> PackedBatch:
        """The pack holding sequence ``seq_idx``."""
        return self.packs[int(self.pack_of_seq[self._check_seq(seq_idx)])]


# ---------------------------------------------------------------------------------------------
# dispatch


def _load_ext() -> Any | None:
    try:
        from flr_engine import _C
    except ImportError:
        return None
    return _C if hasattr(_C, "pack_sequences") else None


def cpp_available() -> bool:
    """Whether the C++ packer (``flr_engine._C.pack_sequences``) is built and importable."""
    return _load_ext() is not None


def _resolve_impl(impl: str) -> Any | None:
    """The extension module for the C++ path, or None for the Python path."""
    if impl not in ("auto", "cpp", "python"):
        raise ValueError(f"impl must be 'auto', 'cpp' or 'python', got {impl!r}")
    if impl == "python":
        return None
    ext = _load_ext()
    if ext is None and impl == "cpp":
        raise RuntimeError(f"impl='cpp' requested but {_BUILD_HINT}")
    return ext


def _check_budget(token_budget: int) -> int:
    b = operator.index(token_budget)
    if b < 1:
        raise ValueError(f"token_budget must be >= 1, got {b}")
    return b


def _from_raw(raw: dict, token_budget: int, impl: str) -> PackResult:
    packs = [
        PackedBatch(
            input_ids=torch.from_numpy(p["input_ids"]),
            position_ids=torch.from_numpy(p["position_ids"]),
            parent=torch.from_numpy(p["parent"]),
            subtree_end=torch.from_numpy(p["subtree_end"]),
            seq_start=int(p["seq_start"]),
            seq_end=int(p["seq_end"]),
            num_unique=int(p["input_ids"].shape[0]),
            num_total=int(p["num_total"]),
        )
        for p in raw["packs"]
    ]
    return PackResult(
        packs=packs,
        pack_of_seq=torch.from_numpy(raw["pack_of_seq"]),
        node_index=torch.from_numpy(raw["node_index"]),
        seq_offsets=torch.from_numpy(raw["seq_offsets"]),
        token_budget=token_budget,
        impl=impl,
    )


def _tensor_to_numpy(x: torch.Tensor, what: str) -> np.ndarray:
    if x.dim() != 1:
        raise ValueError(f"{what} must be 1-D, got shape {tuple(x.shape)}")
    return x.detach().cpu().numpy()


def _for_cpp(sequences: Sequence[Sequence[int]]) -> Sequence[Any]:
    """A list for the extension: elements may be lists/tuples/numpy arrays; tensors -> numpy."""
    if isinstance(sequences, torch.Tensor):
        raise TypeError("sequences must be a sequence of 1-D token sequences, not one tensor")
    if isinstance(sequences, list) and not any(isinstance(s, torch.Tensor) for s in sequences):
        return sequences
    # anything else becomes a list: the extension reads a 2-tuple of arrays as (flat, offsets)
    return [
        _tensor_to_numpy(s, f"sequences[{i}]") if isinstance(s, torch.Tensor) else s
        for i, s in enumerate(sequences)
    ]


def pack_sequences(
    sequences: Sequence[Sequence[int]], token_budget: int, impl: Impl = "auto"
) -> PackResult:
    """Pack token sequences into pre-order token tries of at most ``token_budget`` unique tokens.

    ``sequences``: token id sequences (lists/tuples of ints, 1-D integer numpy arrays or 1-D
    tensors), each non-empty. ``impl``: ``"cpp"`` (the extension; ``RuntimeError`` with build
    instructions if it is not built), ``"python"`` (:func:`pack_sequences_python`) or ``"auto"``
    (C++ when built, else Python, quietly). Both give identical results; see the module
    docstring for the layout and packing policy.
    """
    budget = _check_budget(token_budget)
    ext = _resolve_impl(impl)
    if ext is None:
        return pack_sequences_python(sequences, budget)
    return _from_raw(ext.pack_sequences(_for_cpp(sequences), budget), budget, "cpp")


def pack_flat(
    tokens: np.ndarray | torch.Tensor,
    offsets: np.ndarray | torch.Tensor,
    token_budget: int,
    impl: Impl = "auto",
) -> PackResult:
    """:func:`pack_sequences` for the flat form: sequence ``s`` is ``tokens[offsets[s]:
    offsets[s + 1]]`` (1-D integer arrays, ``len(offsets) == S + 1``). The C++ path reads the
    tokens without converting Python ints, the fastest way in."""
    budget = _check_budget(token_budget)
    tok = _tensor_to_numpy(tokens, "tokens") if isinstance(tokens, torch.Tensor) else tokens
    off = _tensor_to_numpy(offsets, "offsets") if isinstance(offsets, torch.Tensor) else offsets
    tok = np.asarray(tok)
    off = np.asarray(off)
    ext = _resolve_impl(impl)
    if ext is not None:
        return _from_raw(ext.pack_flat(tok, off, budget), budget, "cpp")
    if tok.ndim != 1 or off.ndim != 1 or off.size < 1:
        raise ValueError("tokens and offsets must be 1-D and offsets must have S + 1 >= 1 entries")
    if tok.dtype.kind not in "iu" or off.dtype.kind not in "iu":
        raise TypeError("tokens and offsets must have an integer dtype")
    bounds = off.tolist()
    if bounds[0] != 0 or bounds[-1] != tok.size:
        raise ValueError(
            f"offsets must start at 0 and end at len(tokens) ({tok.size}), "
            f"got {bounds[0]} .. {bounds[-1]}"
        )
    if any(bounds[s + 1] < bounds[s] for s in range(len(bounds) - 1)):
        raise ValueError("offsets must be non-decreasing")
    flat = tok.tolist()
    seqs = [flat[bounds[s] : bounds[s + 1]] for s in range(len(bounds) - 1)]
    return pack_sequences_python(seqs, budget)


# ---------------------------------------------------------------------------------------------
# pure-Python reference


def _as_token_list(seq: Any, i: int) -> list[int]:
    if isinstance(seq, torch.Tensor):
        return _tensor_to_numpy(seq, f"sequences[{i}]").tolist()
    if isinstance(seq, np.ndarray):
        if seq.ndim != 1 or seq.dtype.kind not in "iu":
            raise TypeError(f"sequences[{i}] must be a 1-D integer array")
        return seq.tolist()
    try:
        return [operator.index(t) for t in seq]
    except TypeError as exc:
        raise TypeError(f"sequences[{i}] must be a sequence of int token ids ({exc})") from None


def _emit_pack(
    tok: list[int],
    par: list[int],
    dep: list[int],
    kids: list[list[int]],
    roots: list[int],
) -> tuple[dict[str, np.ndarray], list[int]]:
    """Pre-order arrays of the trie built so far, and ``pre`` (creation id -> packed index)."""
    n = len(tok)
    pre = [0] * n
    order: list[int] = []
    stack = roots[::-1]
    while stack:  # iterative DFS: sequences can be thousands of tokens deep
        v = stack.pop()
        pre[v] = len(order)
        order.append(v)
        stack.extend(reversed(kids[v]))
    size = [1] * n
    for v in range(n - 1, -1, -1):  # a parent is created before its children
        if par[v] >= 0:
            size[par[v]] += size[v]
    arrays = {
        "input_ids": np.array([tok[v] for v in order], dtype=np.int64),
        "position_ids": np.array([dep[v] for v in order], dtype=np.int64),
        "parent": np.array([pre[par[v]] if par[v] >= 0 else -1 for v in order], dtype=np.int64),
        "subtree_end": np.array([pre[v] + size[v] for v in order], dtype=np.int64),
    }
    return arrays, pre


def pack_sequences_python(sequences: Sequence[Sequence[int]], token_budget: int) -> PackResult:
    """Pure-Python packer (dict-keyed trie), same contract and output as the C++ one.

    The fallback when the extension is not built and the reference the tests compare against.
    """
    budget = _check_budget(token_budget)
    if isinstance(sequences, torch.Tensor):
        raise TypeError("sequences must be a sequence of 1-D token sequences, not one tensor")
    seqs = [_as_token_list(s, i) for i, s in enumerate(sequences)]
    for i, s in enumerate(seqs):
        if not s:
            raise ValueError(f"sequence {i} is empty; every sequence needs at least one token")

    packs: list[dict[str, Any]] = []
    pack_of_seq = np.zeros(len(seqs), dtype=np.int64)
    paths: list[list[int]] = []  # per sequence: creation ids, then packed indices

    child: dict[tuple[int, int], int] = {}
    tok: list[int] = []
    par: list[int] = []
    dep: list[int] = []
    kids: list[list[int]] = []
    roots: list[int] = []
    start = 0
    total = 0

    def close(end: int) -> None:
        arrays, pre = _emit_pack(tok, par, dep, kids, roots)
        for s in range(start, end):
            paths[s] = [pre[v] for v in paths[s]]
        packs.append({**arrays, "seq_start": start, "seq_end": end, "num_total": total})

    for s, seq in enumerate(seqs):
        path: list[int] = []
        cur = -1
        for t in seq:  # longest prefix already in the trie
            c = child.get((cur, t))
            if c is None:
                break
            path.append(c)
            cur = c
        if s > start and len(tok) + len(seq) - len(path) > budget:
            close(s)
            child.clear()
            tok, par, dep, kids, roots = [], [], [], [], []
            start, total = s, 0
            path, cur = [], -1
        for d in range(len(path), len(seq)):
            v = len(tok)
            tok.append(seq[d])
            par.append(cur)
            dep.append(d)
            kids.append([])
            (kids[cur] if cur >= 0 else roots).append(v)
            child[(cur, seq[d])] = v
            path.append(v)
            cur = v
        paths.append(path)
        total += len(seq)
        pack_of_seq[s] = len(packs)
    if seqs:
        close(len(seqs))

    lengths = np.array([len(p) for p in paths], dtype=np.int64)
    seq_offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=seq_offsets[1:])
    node_index = np.fromiter(
        (v for p in paths for v in p), dtype=np.int64, count=int(seq_offsets[-1])
    )
    raw = {
        "packs": packs,
        "pack_of_seq": pack_of_seq,
        "node_index": node_index,
        "seq_offsets": seq_offsets,
    }
    return _from_raw(raw, budget, "python")
