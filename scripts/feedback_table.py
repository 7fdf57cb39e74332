"""One table from two `flr eval` runs on the same rows: the base judge's run (FLR, Direct,
Length, Random) and the tuned judge's run (FLR; FLR-cal with --calibration).

    python scripts/feedback_table.py --base runs/eval-base runs/eval-base-rating \\
        --tuned runs/eval-ft runs/eval-ft-rating > table.md

Refuses to compare sets whose rows differ (the same lines must have been scored).
"""

from __future__ import annotations

import argparse
import json
import os


def _load(dirs: list[str]) -> tuple[dict, dict]:
    sets, cal = {}, {}
    for d in dirs:
        with open(os.path.join(d, "results.json"), encoding="utf-8") as fh:
            res = json.load(fh)
        for name, r in res["sets"].items():
            with open(os.path.join(d, "sets", f"{name}.rows.jsonl"), encoding="utf-8") as fh:
                lines = {json.loads(x)["line"] for x in fh if x.strip()}
            sets[name] = r | {"_dir": d, "_lines": lines}
        cal.update((res.get("calibration") or {}).get("transfer", {}))
    return sets, cal


def _f(m: dict | None, pct: bool = True) -> str:
    if not m or m.get("value") is None:
        return "–"
    f, nd = (100.0, 1) if pct else (1.0, 3)
    lo, hi = m["ci"]
    if lo is None:
        return f"{m['value'] * f:.{nd}f}"
    return f"{m['value'] * f:.{nd}f} [{lo * f:.{nd}f}, {hi * f:.{nd}f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", nargs="+", required=True, help="flr eval --out folders, base judge")
    ap.add_argument("--tuned", nargs="+", required=True, help="flr eval --out folders, tuned judge")
    a = ap.parse_args()
    base, _ = _load(a.base)
    tuned, tcal = _load(a.tuned)
    common = [n for n in base if n in tuned]
    for n in common:
        if base[n]["n"] != tuned[n]["n"] or base[n]["limit"] != tuned[n]["limit"]:
            raise SystemExit(f"set {n}: base n={base[n]['n']} vs tuned n={tuned[n]['n']}: not the same rows")
    cols = ["base FLR", "tuned FLR", "tuned+cal", "Direct", "Length", "Random"]

    def cells(n, metric, pct):
        b, t = base[n]["methods"], tuned[n]["methods"]
        return [_f(b["flr"].get(metric), pct), _f(t["flr"].get(metric), pct),
                _f(tcal.get(n, {}).get(metric), pct), _f(b["direct"].get(metric), pct),
                _f(b["length"].get(metric), pct), _f(b["random"].get(metric), pct)]  # fmt: skip

    pw = [n for n in common if base[n]["kind"] == "pairwise"]
    out = []
    if pw:
        out += ["### Pairwise accuracy (%, 95% bootstrap interval)", "",
                "| set | n | " + " | ".join(cols) + " |", "|---|---:|" + "---|" * len(cols)]  # fmt: skip
        avg = {c: [] for c in cols}
        for n in pw:
            cs = cells(n, "accuracy", True)
            out.append(f"| {n} | {base[n]['n']} | " + " | ".join(cs) + " |")
            for c, v in zip(cols, cs):
                if v != "–":
                    avg[c].append(float(v.split()[0]))
        out.append("| **average** | | " + " | ".join(
            f"{sum(v) / len(v):.1f}" if len(v) == len(pw) else "–" for v in avg.values()) + " |")  # fmt: skip
        out += ["", "### Length-controlled accuracy (%, replies differ in length by < 20%)", "",
                "| set | n | " + " | ".join(cols) + " |", "|---|---:|" + "---|" * len(cols)]  # fmt: skip
        for n in pw:
            out.append(f"| {n} | {base[n].get('n_lc', '?')} | " + " | ".join(cells(n, "accuracy_lc", True)) + " |")
        out.append("")
    rt = [n for n in common if base[n]["kind"] == "rating"]
    if rt:
        out += ["### Rating sets: Spearman with the score (95% bootstrap interval)", "",
                "| set | n | " + " | ".join(cols) + " |", "|---|---:|" + "---|" * len(cols)]  # fmt: skip
        for n in rt:
            out.append(f"| {n} | {base[n]['n']} | " + " | ".join(cells(n, "spearman", False)) + " |")
        out.append("")
    print("\n".join(out))


if __name__ == "__main__":
    main()
