"""Build for flr-engine.

* ``flr_engine._C``: the C++ host-side engine (token-trie packer, CPU helpers); pybind11,
  framework-free, always built.
* ``flr_engine._C_cuda``: the CUDA kernels (csrc/cuda), built only where nvcc *and* a CUDA
  build of torch are present. ``FLR_ENGINE_FORCE_CUDA=1`` makes a missing toolchain an
  error; ``FLR_ENGINE_SKIP_CUDA=1`` skips it. Either way one clear line says what happened.
* ``kernels/`` (Triton) is installed as ``flr_engine.kernels``.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def log(msg: str) -> None:
    print(f"[flr-engine setup] {msg}", file=sys.stderr)


def cpp_extension() -> Pybind11Extension:
    sources = sorted(glob.glob("csrc/*.cpp"))
    compile_args = ["-O3", "-std=c++17"]
    if sys.platform != "darwin":
        compile_args.append("-fopenmp")
    return Pybind11Extension(
        "flr_engine._C",
        sources,
        include_dirs=["csrc"],
        extra_compile_args=compile_args,
        extra_link_args=["-fopenmp"] if sys.platform != "darwin" else [],
        cxx_std=17,
    )


def nvcc_flags() -> list[str]:
    """csrc/cuda/nvcc.flags: the one list of nvcc flags, shared with scripts/compile_cuda.sh
    (CI's compile check) and tests. No --use_fast_math: it turns the softcap's tanhf into
    tanh.approx (relative error ~5e-4, ~1.5e-2 per logit at Gemma's softcap of 30)."""
    with open(os.path.join(HERE, "csrc", "cuda", "nvcc.flags")) as f:
        return f.read().split()


def cuda_extensions() -> tuple[list, dict]:
    """CUDA extension when possible; else ([], {}) and a line saying why not."""
    if os.environ.get("FLR_ENGINE_SKIP_CUDA") == "1":
        log("FLR_ENGINE_SKIP_CUDA=1: skipping CUDA build")
        return [], {}
    force = os.environ.get("FLR_ENGINE_FORCE_CUDA") == "1"
    why = None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # torch absent in an isolated build env
        why = f"torch not importable at build time ({exc.__class__.__name__}); use --no-build-isolation"
    else:
        if shutil.which("nvcc") is None and CUDA_HOME is None:
            why = "nvcc not found"
        elif torch.version.cuda is None:
            why = f"torch {torch.__version__} is a CPU build"
    if why is not None:
        if force:
            raise RuntimeError(f"FLR_ENGINE_FORCE_CUDA=1 but cannot build CUDA: {why}")
        log(f"{why}: skipping CUDA build (flr_engine._C_cuda); Triton/CPU paths still work")
        return [], {}
    sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    log(f"building CUDA extension from {len(sources)} sources")
    ext = CUDAExtension(
        "flr_engine._C_cuda",
        sources,
        include_dirs=[os.path.join(HERE, "csrc/cuda")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags()},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules = [cpp_extension()]
cmdclass: dict = {"build_ext": build_ext}
cuda_exts, cuda_cmdclass = cuda_extensions()
ext_modules += cuda_exts
cmdclass.update(cuda_cmdclass)

setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # flr_engine/kernels is a link to the top-level kernels/ (no __init__.py there, so that
    # folder can never shadow an installed package named `kernels` from the repository root)
    packages=find_packages(include=["flr_engine", "flr_engine.*"]) + ["flr_engine.kernels"],
)
