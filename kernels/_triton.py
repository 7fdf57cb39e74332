"""The one guarded ``import triton`` of the kernel modules.

Importing this never fails: without triton, ``triton`` and ``tl`` are ``None`` and
``TRITON_IMPORT_ERROR`` holds the ImportError, which the kernels' launchers quote when asked
to run. (The Triton interpreter needs ``TRITON_INTERPRET=1`` set before this first import.)
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError as _exc:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None
    TRITON_IMPORT_ERROR: ImportError | None = _exc
else:
    TRITON_IMPORT_ERROR = None

__all__ = ["TRITON_IMPORT_ERROR", "tl", "triton"]
