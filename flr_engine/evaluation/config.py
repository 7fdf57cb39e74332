"""The settings of an evaluation run (``flr eval``)."""

from __future__ import annotations

from dataclasses import dataclass

from flr_engine.evaluation import metrics as M


@dataclass
class EvalConfig:
    """Settings of an evaluation run. ``scoring`` describes the scorer (model, templates,
    mode, ...) and keys the per-row caches; the rest keys the per-set results."""

    out: str
    scoring: dict
    limit: int | None = None
    batch_size: int = 4
    seed: int = 0
    n_boot: int = M.DEFAULT_BOOT
    level: float = M.DEFAULT_LEVEL
    calibrate_on: str | None = None
    reward_model: str | None = None
    on_error: str = "fail"
    overwrite: bool = False
    quiet: bool = False
    figure: bool = True
    calibration: dict | None = None  # weights fit elsewhere (load_calibration): FLR-cal on every set
    save_calibration: str | None = None  # with calibrate_on: write the fit there (save_calibration)
