"""Print the versions CI resolved, and whether upstream has released past our tested range.

    python scripts/versions.py            # resolved versions of the libraries we pin
    python scripts/versions.py --drift    # also ask PyPI for the newest release of each

The ranges come from flr-engine's own metadata (pyproject.toml), so this never disagrees
with what pip was told. A newer release outside the range is reported, never installed:
widening a range is a deliberate change made after the tests pass against it.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys

from packaging.requirements import Requirement

WATCHED = ("torch", "transformers", "trl", "peft", "accelerate", "triton", "tokenizers", "kernels", "ray")


def ranges() -> dict[str, str]:
    """{name: specifier} from flr-engine's requirements, extras included."""
    out: dict[str, str] = {}
    for line in md.requires("flr-engine") or []:
        req = Requirement(line)
        if req.name in WATCHED and str(req.specifier):
            out[req.name] = str(req.specifier)
    return out


def newest(name: str) -> str | None:
    try:
        res = subprocess.run(
            [sys.executable, "-m", "pip", "index", "versions", name],
            capture_output=True, text=True, timeout=30,
        )
    except subprocess.TimeoutExpired:
        return None
    m = re.search(rf"^{re.escape(name)} \(([^)]+)\)", res.stdout, re.M | re.I)
    return m.group(1) if m else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drift", action="store_true", help="ask PyPI for each newest release")
    args = ap.parse_args(argv)
    spec = ranges()
    for name in WATCHED:
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            have = "not installed"
        line = f"{name:13s} {have:18s} tested range {spec.get(name, '(any)')}"
        if args.drift:
            new = newest(name)
            if new is None:
                line += "   newest: unknown"
            elif name in spec and not Requirement(f"{name}{spec[name]}").specifier.contains(new):
                line += f"   newest {new} is OUTSIDE the tested range (not installed)"
            else:
                line += f"   newest {new}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
