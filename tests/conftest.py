"""Shared test set-up.

Triton kernels run on the CPU through the interpreter: TRITON_INTERPRET must be set before
triton is first imported, so it is set here when no CUDA device is present.
"""

import os

if not os.environ.get("CUDA_VISIBLE_DEVICES", "x") == "" and os.path.exists("/dev/nvidia0"):
    pass  # a GPU machine: run Triton for real
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")
