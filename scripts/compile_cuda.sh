#!/usr/bin/env bash
# Compile-only check of every CUDA source in csrc/cuda (no torch, no GPU needed), with the
# flags setup.py builds with (csrc/cuda/nvcc.flags).
#
#   scripts/compile_cuda.sh            # every csrc/cuda/*.cu for sm_80 and sm_90
#   FLR_CUDA_ARCHS="sm_80" scripts/compile_cuda.sh
#   NVCC=/opt/cuda/bin/nvcc scripts/compile_cuda.sh
#
# Exits non-zero when any compile fails; prints a skip line and exits 0 when nvcc is absent.
set -u

# no external commands before the nvcc check (it must work with an empty PATH)
script="${BASH_SOURCE[0]}"
[[ "$script" == */* ]] || script="./$script"
here="$(cd "${script%/*}" && pwd)"
root="${here%/*}"
nvcc_bin="${NVCC:-nvcc}"
archs="${FLR_CUDA_ARCHS:-sm_80 sm_90}"

if ! command -v "$nvcc_bin" >/dev/null 2>&1; then
  echo "nvcc not found, skipping CUDA compile check"
  exit 0
fi

shopt -s nullglob
sources=("$root"/csrc/cuda/*.cu)
if [ "${#sources[@]}" -eq 0 ]; then
  echo "no CUDA sources in $root/csrc/cuda"
  exit 0
fi

read -r -a flags < "$root/csrc/cuda/nvcc.flags"  # a builtin: works with an empty PATH too
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
failed=0
for src in "${sources[@]}"; do
  for arch in $archs; do
    obj="$out/$(basename "$src" .cu).$arch.o"
    if "$nvcc_bin" -c "${flags[@]}" -arch="$arch" -I"$root/csrc/cuda" -o "$obj" "$src"; then
      echo "ok    $arch  ${src#"$root"/}"
    else
      echo "FAIL  $arch  ${src#"$root"/}"
      failed=1
    fi
  done
done
exit "$failed"
