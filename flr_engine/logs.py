"""Logging of the command line, set up in one place (also by worker processes)."""

from __future__ import annotations

import logging
import os
import sys


def quiet_libraries() -> None:
    """Silence the libraries' own progress bars (transformers' "Loading weights", hub
    downloads): by environment before they are imported, directly if they already are."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def setup_logging(level: int, quiet: bool) -> None:
    """The command line's log format at ``level``; ``quiet`` also silences library bars.
    Under a launcher (``WORLD_SIZE`` > 1) every line says which rank wrote it."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = f"[rank {os.environ.get('RANK', 0)}/{world}] " if world > 1 else ""
    logging.basicConfig(
        level=level, format=f"%(asctime)s {rank}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if quiet:
        quiet_libraries()
