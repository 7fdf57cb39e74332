"""Copy a `flr feedback-tune` LoRA output into the package as a named judge (what
`--model default-ft` loads), with its provenance.

    python scripts/ship_judge.py runs/ft flr_engine/data/judges/default-ft \\
        --data-stats runs/ftdata/stats.json --build-command "python scripts/build_feedback_data.py ..." \\
        --command "flr feedback-tune ..."

Copies adapter_config.json, adapter_model.safetensors and flr_feedback.json (with the
provenance added: data build, training command, steps, time, losses, trainer state). The
base model must be a name every user has ("default"), not a local path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("dest")
    ap.add_argument("--data-stats", required=True, help="stats.json of build_feedback_data.py")
    ap.add_argument("--build-command", required=True)
    ap.add_argument("--command", required=True, help="the flr feedback-tune command line")
    ap.add_argument("--wall-seconds", type=float, default=None, help="training wall time, all runs")
    a = ap.parse_args()
    with open(os.path.join(a.run, "flr_feedback.json"), encoding="utf-8") as fh:
        meta = json.load(fh)
    if meta.get("kind") != "lora" or meta.get("base") != "default":
        raise SystemExit("ship only LoRA adapters on the 'default' base model")
    with open(a.data_stats, encoding="utf-8") as fh:
        stats = json.load(fh)
    state = {}
    ckpts = sorted((d for d in os.listdir(a.run) if d.startswith("checkpoint-")),
                   key=lambda d: int(d.split("-")[1]))  # fmt: skip
    if ckpts:
        with open(os.path.join(a.run, ckpts[-1], "trainer_state.json"), encoding="utf-8") as fh:
            st = json.load(fh)
        state = {"max_steps": st.get("max_steps"), "epoch": st.get("epoch"),
                 "num_input_tokens_seen": st.get("num_input_tokens_seen")}  # fmt: skip
    os.makedirs(a.dest, exist_ok=True)
    for f in os.listdir(a.dest):  # what an earlier judge left (its calibrations) goes
        os.remove(os.path.join(a.dest, f))
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(os.path.join(a.run, f), os.path.join(a.dest, f))
    for f in os.listdir(a.run):  # calibrations fit for this judge (flr eval --save-calibration)
        if f.startswith("calibration-") and f.endswith(".json"):
            shutil.copy2(os.path.join(a.run, f), os.path.join(a.dest, f))
    meta["settings"].pop("args", None)
    meta["provenance"] = {
        "data": {k: v for k, v in stats.items() if k != "calib_ids"}
        | {"calib_ids_first10": stats.get("calib_ids", [])[:10]},
        "data_build_command": a.build_command,
        "command": a.command,
        "seed": meta["config"]["seed"],
        "steps": meta["steps"],
        "trainer_state": state,
        "train_wall_seconds": a.wall_seconds,
        "machine": "2-core CPU (shared), torch CPU build, "
        + ("bf16 autocast" if meta["config"].get("bf16") else "fp32"),
    }
    with open(os.path.join(a.dest, "flr_feedback.json"), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1)
    size = sum(os.path.getsize(os.path.join(a.dest, f)) for f in os.listdir(a.dest))
    print(f"shipped {a.run} -> {a.dest} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
