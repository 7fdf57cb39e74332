"""Build the feedback fine-tuning rows and the held-out calibration pairs from
``../shared/data/train`` (see flr_engine.feedback.build_feedback_mix for the mix).

    python scripts/build_feedback_data.py --train ../shared/data/train --out runs/ftdata
    # -> runs/ftdata/feedback.jsonl, runs/ftdata/calib-pairs.jsonl, runs/ftdata/stats.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from flr_engine.feedback import MixConfig, build_feedback_mix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", default=os.path.join("..", "shared", "data", "train"))
    ap.add_argument("--out", required=True)
    for f in dataclasses.fields(MixConfig):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    a = ap.parse_args()
    cfg = MixConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(MixConfig)})
    rows, calib, stats = build_feedback_mix(a.train, cfg)
    os.makedirs(a.out, exist_ok=True)
    for name, data in (("feedback.jsonl", rows), ("calib-pairs.jsonl", calib)):
        with open(os.path.join(a.out, name), "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in data)
    with open(os.path.join(a.out, "stats.json"), "w", encoding="utf-8") as fh:
        json.dump(stats | {"train": os.path.abspath(a.train)}, fh, indent=1)
    print(json.dumps(stats["counts"]), f"{len(calib)} calibration pairs ->", a.out)


if __name__ == "__main__":
    main()
