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



def smem_budget(device) -> int:
    """Shared memory one block may opt in to on ``device`` (bytes); 96 KiB off CUDA."""
    if device.type != "cuda":
        return 96 * 1024
    import torch

    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    if optin:
        return int(optin)
    return {(8, 0): 163, (9, 0): 227, (10, 0): 227}.get((props.major, props.minor), 99) * 1024


__all__ = ["TRITON_IMPORT_ERROR", "smem_budget", "tl", "triton"]
