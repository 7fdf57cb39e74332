"""``flr env``: versions, devices and which engine backends are built and usable."""

from __future__ import annotations

import importlib
import platform


def _version(mod: str) -> str:
    try:
        return getattr(importlib.import_module(mod), "__version__", "installed")
    except Exception as exc:  # missing or broken optional piece
        return f"not available ({exc.__class__.__name__})"


def backends() -> dict[str, str]:
    """Each backend and whether it can run here (a reason when not)."""
    import torch

    out = {}
    try:
        from flr_engine import _C

        out["cpp (flr_engine._C)"] = f"built ({_C.__build_info__})"
    except ImportError as exc:
        out["cpp (flr_engine._C)"] = f"not built ({exc}); reinstall with `pip install -e .`"
    try:
        importlib.import_module("flr_engine._C_cuda")
        out["cuda (flr_engine._C_cuda)"] = "built" + (
            "" if torch.cuda.is_available() else ", no CUDA device"
        )
    except ImportError:
        out["cuda (flr_engine._C_cuda)"] = "not built (needs nvcc and a CUDA torch at install time)"
    try:
        import triton  # noqa: F401

        out["triton"] = (
            "usable on GPU"
            if torch.cuda.is_available()
            else "installed; CPU only via TRITON_INTERPRET=1"
        )
    except ImportError:
        out["triton"] = "not installed (pip install triton)"
    out["torch cpu"] = f"usable ({torch.get_num_threads()} threads)"
    return out


def env_report() -> str:
    import torch

    from flr_engine import __version__
    from flr_engine.models import DEFAULT_CACHE_NAME, _is_cached, cache_dir

    lines = [
        f"flr-engine    {__version__}",
        f"python        {platform.python_version()} ({platform.machine()})",
        f"torch         {torch.__version__} (cuda {torch.version.cuda})",
        f"transformers  {_version('transformers')}",
        f"triton        {_version('triton')}",
        f"gguf          {_version('gguf')}",
        f"device        {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu only'}",
        f"cache         {cache_dir()} (default model {'cached' if _is_cached(cache_dir() / 'models' / DEFAULT_CACHE_NAME) else 'not fetched: flr model fetch'})",
        "backends:",
    ]
    lines += [f"  {k:28s} {v}" for k, v in backends().items()]
    return "\n".join(lines)
