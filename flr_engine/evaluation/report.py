"""The evaluation report: markdown tables (pairwise accuracy, length-controlled accuracy,
rating correlations, FLR per dimension, the templates carrying the most signal, the
calibration) and the figure ``eval.png``, both made from ``run_eval``'s results.
"""

from __future__ import annotations

import numpy as np

from flr_engine.evaluation.results import num
from flr_engine.evaluation.set_metrics import LC_RATIO, primary

METHODS = ("flr", "direct", "length", "random")
LABELS = {
    "flr": "FLR",
    "direct": "Direct",
    "length": "Length",
    "random": "Random",
    "rm": "RM",
    "flr-cal": "FLR-cal",
}
CORRS = ("pearson", "spearman", "kendall")


def _fmt(m: dict | None, pct: bool) -> str:
    if not m or num(m.get("value")) is None:
        return "–"
    f = 100.0 if pct else 1.0
    nd = 1 if pct else 3
    v, (lo, hi) = m["value"] * f, m["ci"]
    if num(lo) is None:
        return f"{v:.{nd}f}"
    return f"{v:.{nd}f} [{lo * f:.{nd}f}, {hi * f:.{nd}f}]"


def _columns(res: dict) -> list[str]:
    cols = [
        m for m in (*METHODS, "rm") if any(m in r.get("methods", {}) for r in res["sets"].values())
    ]
    if "transfer" in (res.get("calibration") or {}):
        cols.append("flr-cal")
    return cols


def markdown_report(res: dict) -> str:
    """Markdown tables: pairwise accuracy, rating correlations, FLR per dimension, and the
    templates that carry the most signal."""
    sets = res["sets"]
    cal = res.get("calibration") or {}
    transfer = cal.get("transfer", {})
    cols = _columns(res)
    level = int(round(100 * res["settings"]["level"]))
    lines = []

    def method_metric(name, r, m, metric):
        if m == "flr-cal":
            return transfer.get(name, {}).get(metric)
        return r["methods"].get(m, {}).get(metric)

    def cell(name, r, m, metric, pct):
        if m == "flr-cal" and name == cal.get("fit_on"):
            return "(fit set)"
        return _fmt(method_metric(name, r, m, metric), pct)

    pw = {k: r for k, r in sets.items() if r["kind"] == "pairwise"}
    if pw:
        lines += [
            f"### Pairwise accuracy (%, {level}% bootstrap interval; score ties count 0.5)",
            "",
            "| set | n | ties | bad | " + " | ".join(LABELS[c] for c in cols) + " |",
            "|---|---:|---:|---:|" + "---|" * len(cols),
        ]
        means: dict[str, list[float]] = {c: [] for c in cols}
        for name, r in pw.items():
            if r.get("note"):
                lines.append(
                    f"| {name} | 0 | {r['ties']} | {r['bad']} | {r['note']} |"
                    + " |" * (len(cols) - 1)
                )
                continue
            cells = []
            for c in cols:
                m = method_metric(name, r, c, "accuracy")
                cells.append(cell(name, r, c, "accuracy", True))
                if m and num(m.get("value")) is not None:
                    means[c].append(m["value"])
            lines.append(
                f"| {name} | {r['n']} | {r['ties']} | {r['bad']} | " + " | ".join(cells) + " |"
            )
        if len([r for r in pw.values() if not r.get("note")]) > 1:
            avg = [f"{100 * np.mean(v):.1f}" if v else "–" for v in means.values()]
            lines.append("| **average** | | | | " + " | ".join(avg) + " |")
        lines.append("")
        lc_sets = {k: r for k, r in pw.items() if "n_lc" in r}
        if lc_sets:
            lines += [
                f"### Length-controlled accuracy (%, pairs whose replies differ in length by "
                f"less than {int(100 * LC_RATIO)}%)",
                "",
                "| set | n | " + " | ".join(LABELS[c] for c in cols) + " |",
                "|---|---:|" + "---|" * len(cols),
            ]
            for name, r in lc_sets.items():
                cells = [cell(name, r, c, "accuracy_lc", True) for c in cols]
                lines.append(f"| {name} | {r['n_lc']} | " + " | ".join(cells) + " |")
            lines.append("")
    rt = {k: r for k, r in sets.items() if r["kind"] == "rating"}
    if rt:
        lines += [
            f"### Rating correlation with the score ({level}% bootstrap interval)",
            "",
            "| set | n | metric | " + " | ".join(LABELS[c] for c in cols) + " |",
            "|---|---:|---|" + "---|" * len(cols),
        ]
        for name, r in rt.items():
            if r.get("note"):
                lines.append(f"| {name} | 0 | {r['note']} |" + " |" * len(cols))
                continue
            for corr in CORRS:
                cells = [cell(name, r, c, corr, False) for c in cols]
                lines.append(f"| {name} | {r['n']} | {corr} | " + " | ".join(cells) + " |")
        lines.append("")
    done = {k: r for k, r in sets.items() if r.get("dimensions")}
    if done:
        dims = list(next(iter(done.values()))["dimensions"])
        lines += [
            "### FLR per dimension (pairwise: accuracy %; rating: Spearman)",
            "",
            "| set | " + " | ".join(dims) + " |",
            "|---|" + "---|" * len(dims),
        ]
        for name, r in done.items():
            pct = r["kind"] == "pairwise"
            cells = [_fmt(r["dimensions"][d].get(primary(r)), pct) for d in dims]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += ["### Templates carrying the most signal (oriented by polarity; top 3)", ""]
        for name, r in done.items():
            pct = r["kind"] == "pairwise"
            top = ", ".join(
                f"{t['text']!r} ({t['polarity'][:3]}) {_fmt(t.get(primary(r)), pct).split(' [')[0]}"
                for t in r["templates"][:3]
            )
            lines.append(f"- {name}: {top}")
        lines.append("")
    if cal.get("error"):
        lines += [f"### Calibration on {cal['fit_on']} failed: {cal['error']}", ""]
    elif cal.get("path"):
        lines += [
            f"### Calibration from {cal['path']}: per-template weights fit on {cal['fit_on']} "
            f"(n={cal['n']}, lambda={cal['lam']:g}; {cal['folds']}-fold CV accuracy there "
            f"{100 * cal['cv_accuracy']:.1f}%), applied to every set (FLR-cal)",
            "",
        ]
    elif cal:
        lines += [
            f"### Calibration: per-template logistic weights fit on {cal['fit_on']} "
            f"(n={cal['n']}, lambda={cal['lam']:g} by {cal['folds']}-fold CV)",
            "",
            f"held-out accuracy on {cal['fit_on']} itself ({cal['folds']}-fold CV): "
            f"{100 * cal['cv_accuracy']:.1f}%; the FLR-cal column shows the other sets",
            "",
            "largest weights: "
            + ", ".join(f"{t['text']!r} {t['weight']:+.2f}" for t in cal["top"][:5]),
            "",
        ]
    timed = [
        f"{k} {r['scoring_seconds']:.0f} s"
        + ("" if r["timed_rows"] == r["n"] else f" ({r['timed_rows']} of {r['n']} rows timed)")
        for k, r in sets.items()
        if r.get("timed_rows")
    ]
    if timed:
        lines.append(f"(scoring time, summed over the runs that wrote the rows: {', '.join(timed)})")
    cached = [k for k, r in sets.items() if r.get("cached")]
    if cached:
        lines.append(f"(reused finished results for: {', '.join(cached)})")
    if res.get("busy"):
        lines.append(
            f"(left out, being scored by another process: {', '.join(res['busy'])}; "
            "run again when it has finished)"
        )
    return "\n".join(lines).rstrip() + "\n"


def plot(res: dict, path: str) -> None:
    """Accuracy / Spearman per set and method with interval bars, and FLR per dimension."""
    from matplotlib.figure import Figure

    sets = {k: r for k, r in res["sets"].items() if r.get("methods")}
    cal = res.get("calibration") or {}
    cols = _columns(res)
    panels = []
    for kind in ("pairwise", "rating"):
        sub = {k: r for k, r in sets.items() if r["kind"] == kind}
        if sub:
            panels.append(("methods", kind, sub))
    for kind in ("pairwise", "rating"):
        sub = {k: r for k, r in sets.items() if r["kind"] == kind}
        if sub:
            panels.append(("dimensions", kind, sub))
    fig = Figure(
        figsize=(
            max(7, 1.6 * max([len(p[2]) for p in panels] or [1]) + 3),
            3.6 * max(len(panels), 1),
        )
    )
    if not panels:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no results (no non-tie pairs / scorable rows)", ha="center")
        ax.axis("off")
        fig.savefig(path, dpi=100)
        return
    for p, (what, kind, sub) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, p + 1)
        metric = "accuracy" if kind == "pairwise" else "spearman"
        names = list(sub)
        series = cols if what == "methods" else list(next(iter(sub.values()))["dimensions"])
        width = 0.8 / max(len(series), 1)
        x = np.arange(len(names))
        for j, s in enumerate(series):
            vals, lo, hi = [], [], []
            for n in names:
                if what == "dimensions":
                    m = sub[n]["dimensions"].get(s, {}).get(metric)
                elif s == "flr-cal":
                    m = cal.get("transfer", {}).get(n, {}).get(metric)
                else:
                    m = sub[n]["methods"].get(s, {}).get(metric)
                v = num(m["value"]) if m else None
                vals.append(np.nan if v is None else v)
                a, b = m["ci"] if m and v is not None else (None, None)
                lo.append(0 if num(a) is None else v - a)
                hi.append(0 if num(b) is None else b - v)
            ax.bar(
                x + (j - (len(series) - 1) / 2) * width,
                vals,
                width,
                yerr=[lo, hi],
                capsize=2,
                label=LABELS.get(s, s),
            )
        ax.axhline(0.5 if kind == "pairwise" else 0.0, color="gray", lw=0.8, ls="--")
        ax.set_ylim(0.0 if kind == "pairwise" else -1.0, 1.25)
        ax.set_xticks(x, names, fontsize=8)
        ylabel = "accuracy" if kind == "pairwise" else "Spearman"
        title = "per method" if what == "methods" else "FLR per dimension"
        ax.set_title(f"{kind} sets: {ylabel} {title}", fontsize=10)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7, ncol=min(len(series), 7), loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
