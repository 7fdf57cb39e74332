"""Build the feedback fine-tuning rows and the held-out calibration pairs from
``../shared/data/train`` (see flr_engine.feedback.build_feedback_mix for the mix).

    python scripts/build_feedback_data.py --train ../shared/data/train --out runs/ftdata
    # -> runs/ftdata/feedback.jsonl, runs/ftdata/calib-pairs.jsonl, runs/ftdata/stats.json

For ``flr feedback-tune --objective pairwise`` it also writes ``train-pairs.jsonl`` (every pair
not held out, cut like the feedback rows) and ``reactions.json`` (flr-engine's reactions plus
``--reactions-from``'s texts, minus every text of ``--held-out-templates``, the set to evaluate
unseen wording with).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from flr_engine.feedback import MixConfig, build_feedback_mix, build_pair_split, held_out_reactions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", default=os.path.join("..", "shared", "data", "train"))
    ap.add_argument("--out", required=True)
    for f in dataclasses.fields(MixConfig):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    ap.add_argument("--reactions-from", default="flr-helpfulness")
    ap.add_argument("--held-out-templates", default="flr-mixed")
    a = ap.parse_args()
    cfg = MixConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(MixConfig)})
    rows, calib, stats = build_feedback_mix(a.train, cfg)
    train_pairs, calib2 = build_pair_split(a.train, cfg)
    assert calib2 == calib
    reactions = held_out_reactions(a.reactions_from, a.held_out_templates)
    stats["train_pairs"] = len(train_pairs)
    stats["reactions"] = {k: len(v) for k, v in reactions["dimensions"]["reaction"].items()}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "reactions.json"), "w", encoding="utf-8") as fh:
        json.dump(reactions, fh, indent=1, ensure_ascii=False)
    for name, data in (("feedback.jsonl", rows), ("calib-pairs.jsonl", calib),
                       ("train-pairs.jsonl", train_pairs)):  # fmt: skip
        with open(os.path.join(a.out, name), "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in data)
    with open(os.path.join(a.out, "stats.json"), "w", encoding="utf-8") as fh:
        json.dump(stats | {"train": os.path.abspath(a.train)}, fh, indent=1)
    print(json.dumps(stats["counts"]), f"{len(train_pairs)} training pairs, {len(calib)} calibration "
          f"pairs, reactions {stats['reactions']} ->", a.out)


if __name__ == "__main__":
    main()
