"""How far two `flr eval` runs of the same sets agree, row by row (e.g. bf16 vs fp32).

    python scripts/eval_agreement.py runs/eval-fp32 runs/eval-bf16

For every set with rows in both ``--out`` folders, on the rows both have:

- pairwise: how often FLR and Direct pick the same reply; the largest and median
  ``|reward_A - reward_B|``; and over all of B's rows (A may hold only a slice) the expected
  number of FLR choices that A would make differently: with ``d_j`` the margin differences
  ``m_A - m_B`` on the common rows (``m = r_chosen - r_rejected``), pair ``i`` of B flips
  with probability ``mean_j [(m_i + d_j) * m_i < 0]``;
- rating: Spearman between A's and B's rewards, and the same reward differences.
"""

from __future__ import annotations

import argparse
import glob
import os

import numpy as np
from scipy.stats import spearmanr

from flr_engine.io import read_output_rows


def read_rows(path: str) -> dict[int, dict]:
    """The scored rows of an eval rows file (a torn last line of a running eval is skipped)."""
    return {n: r for n, r in read_output_rows(path).items() if "error" not in r}


def compare_set(a: dict[int, dict], b: dict[int, dict]) -> dict:
    common = sorted(set(a) & set(b))
    pairwise = "chosen" in next(iter(b.values()))
    sides = ("chosen", "rejected") if pairwise else ("response",)
    diffs = [abs(a[n][s]["reward"] - b[n][s]["reward"]) for n in common for s in sides]
    out = {"common": len(common), "max_diff": max(diffs), "median_diff": float(np.median(diffs))}
    if pairwise:
        for key, name in (("reward", "flr"), ("direct", "direct")):
            same = sum(
                (a[n]["chosen"][key] > a[n]["rejected"][key]) == (b[n]["chosen"][key] > b[n]["rejected"][key])
                for n in common
                if a[n]["chosen"][key] is not None and b[n]["chosen"][key] is not None
            )
            out[f"same_{name}"] = same
        def margin(r):
            return r["chosen"]["reward"] - r["rejected"]["reward"]

        d = np.array([margin(a[n]) - margin(b[n]) for n in common])  # (common,)
        m = np.array([margin(r) for r in b.values()])  # (B rows,)
        flips = ((m[:, None] + d[None, :]) * m[:, None] < 0).mean(axis=1)  # (B rows,)
        out["b_rows"] = len(m)
        out["expected_flips"] = float(flips.sum())
    else:
        out["spearman"] = float(
            spearmanr([a[n]["response"]["reward"] for n in common], [b[n]["response"]["reward"] for n in common])[0]
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="an flr eval --out folder")
    ap.add_argument("b", help="another flr eval --out folder over the same data")
    args = ap.parse_args()
    for path_b in sorted(glob.glob(os.path.join(args.b, "sets", "*.rows.jsonl"))):
        path_a = os.path.join(args.a, "sets", os.path.basename(path_b))
        if not os.path.exists(path_a):
            continue
        name = os.path.basename(path_b)[: -len(".rows.jsonl")]
        r = compare_set(read_rows(path_a), read_rows(path_b))
        if not r["common"]:
            continue
        line = (
            f"{name}: {r['common']} common rows; |reward diff| median {r['median_diff']:.4f}, "
            f"max {r['max_diff']:.4f}"
        )
        if "same_flr" in r:
            line += (
                f"; same FLR choice {r['same_flr']}/{r['common']}, same Direct choice "
                f"{r['same_direct']}/{r['common']}; expected FLR choices to differ over B's "
                f"{r['b_rows']} pairs: {r['expected_flips']:.1f}"
            )
        else:
            line += f"; Spearman(A, B) {r['spearman']:.4f}"
        print(line)


if __name__ == "__main__":
    main()
