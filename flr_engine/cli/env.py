"""``flr env`` (versions, usable backends) and ``flr model fetch`` (the default model)."""

from __future__ import annotations

import time


def register(sub) -> None:
    p = sub.add_parser("env", help="versions and which backends are built and usable")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("model", help="model utilities")
    msub = p.add_subparsers(dest="model_command", required=True)
    f = msub.add_parser("fetch", help="download and convert the default model into the cache")
    f.add_argument("--force", action="store_true", help="convert again even if cached")
    f.set_defaults(func=cmd_model_fetch)


def cmd_env(args) -> int:
    from flr_engine.env import env_report

    print(env_report())
    return 0


def cmd_model_fetch(args) -> int:
    from flr_engine.models import fetch_default

    t0 = time.time()
    folder = fetch_default(force=args.force)
    print(f"default model ready in {folder} ({time.time() - t0:.1f}s)")
    return 0
