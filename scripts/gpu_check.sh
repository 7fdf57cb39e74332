#!/usr/bin/env bash
# One prepared GPU check of flr-engine's kernels, for a short device window.
#
#   bash scripts/gpu_check.sh            # on a CUDA machine: ~5-6 minutes, results in $OUT
#   bash scripts/gpu_check.sh --dry-run  # on the CPU: tiny shapes, Triton interpreted (CI)
#
# Stages, each independent (a failure is logged and the next stage runs), each under its own
# timeout and all under one overall budget (FLR_GPU_CHECK_BUDGET seconds, default 370 on
# the GPU, 600 dry); a compact summary table is printed last:
#   env       versions, nvidia-smi
#   wheels    .whl/*.whl (if the folder exists) -> pip --target /tmp/flr_site, on PYTHONPATH
#             (e.g. transformers 5.25 where the machine has 5.17; no network needed)
#   build     pip install --no-build-isolation --no-deps -e . with FLR_ENGINE_FORCE_CUDA=1 for
#             this device's arch (C++ and CUDA extensions); on failure, build-cpp retries
#             without CUDA so the later stages still run. Dry run: the CUDA compile check.
#   aot       dry run only: both Triton kernels compiled for sm_90 without a GPU (triton.compile
#             for GPUTarget("cuda", 90)) at the tiles the library picks on an H100/H200:
#             registers, spills, shared memory -- compiled-mode errors reach CI
#   compiled  the Triton kernels ran compiled (TRITON_INTERPRET unset, cubins in the JIT
#             caches; registers / spills / wgmma listed) and _C_cuda runs
#   logprob   fused log-prob, N=8192 H=4096 V=128256 bf16: Triton / chunked torch / naive
#             logits / CUDA extension: ms, TFLOP/s, % of the measured bf16 peak, error
#   tree      tree attention, 32/8 heads D=128 bf16, 1 prefix x 8 replies x 120 follow-ups,
#             vs SDPA with a dense mask and causal flash SDPA (the ceiling); error
#   engine    engine vs reference on a 2-layer random Llama of Llama-3-8B width, fp32 + bf16
#   pytest    pytest -m gpu (FLR_GPU_CHECK_PYTEST_MARK="gpu or not slow" adds the CPU suite's
#             Triton tests, run compiled on CUDA tensors, when there is time)
# Everything lands in $OUT (default: a new /tmp/flr_gpu_check.* folder): <stage>.log,
# <stage>.json, stages.tsv, summary.txt.
set -u

script="${BASH_SOURCE[0]}"
root="$(cd "$(dirname "$script")/.." && pwd)"
cd "$root" || exit 1

dry=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
    -h|--help) sed -n '2,27p' "$script"; exit 0 ;;
    *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
  esac
done

OUT="${OUT:-$(mktemp -d /tmp/flr_gpu_check.XXXXXX)}"
mkdir -p "$OUT"
export OUT
py="${PYTHON:-python3}"
if [ "$dry" = 1 ]; then
  budget="${FLR_GPU_CHECK_BUDGET:-600}"
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  dryflag=(--dry-run)
else
  budget="${FLR_GPU_CHECK_BUDGET:-370}"
  unset TRITON_INTERPRET
  dryflag=()
fi
start=$(date +%s)
deadline=$((start + budget))
reserve=20  # seconds kept for the summary
: >"$OUT/stages.tsv"

note() { echo "[gpu_check $(($(date +%s) - start))s] $*"; }

# run_stage NAME TIMEOUT CMD...: CMD's output -> $OUT/NAME.log; one line in stages.tsv
run_stage() {
  local name="$1" limit="$2"
  shift 2
  local left=$((deadline - $(date +%s) - reserve))
  if [ "$left" -lt 15 ]; then
    printf '%s\tSKIPPED\t0\tout of time budget\n' "$name" >>"$OUT/stages.tsv"
    note "$name: skipped (out of time budget)"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  note "$name: start (timeout ${limit}s)"
  local t0 rc status
  t0=$(date +%s)
  # bash -c: the stages may be shell functions (exported below)
  timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  case "$rc" in
    0) status=ok ;;
    124|137) status=TIMEOUT ;;
    *) status="FAIL(rc=$rc)" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" "$OUT/$name.log" \
    >>"$OUT/stages.tsv"
  note "$name: $status in $(($(date +%s) - t0))s"
  if [ "$rc" != 0 ]; then tail -n 15 "$OUT/$name.log" | sed 's/^/    | /'; fi
  return "$rc"
}

stage_env() {
  date -u
  uname -a
  command -v nvidia-smi >/dev/null && nvidia-smi
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  "$py" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "triton", "transformers", "huggingface_hub", "tokenizers",
             "accelerate", "pybind11", "pytest"):
    try:
        m = importlib.import_module(name)
        print(f"{name:16s} {getattr(m, '__version__', '?')}  {m.__file__}")
    except Exception as exc:
        print(f"{name:16s} MISSING ({exc.__class__.__name__}: {exc})")
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          f"{p.total_memory / 2**30:.0f} GiB",
          "smem/block opt-in", getattr(p, "shared_memory_per_block_optin", "?"))
EOF
}

stage_wheels() {
  shopt -s nullglob
  local wheels=("$root"/.whl/*.whl)
  if [ "${#wheels[@]}" -eq 0 ]; then
    echo "no wheels in $root/.whl: using the machine's packages"
    return 0
  fi
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/flr_site "${wheels[@]}" || return 1
  PYTHONPATH=/tmp/flr_site${PYTHONPATH:+:$PYTHONPATH} "$py" -c \
    "import transformers, huggingface_hub; print('transformers', transformers.__version__, transformers.__file__); print('huggingface_hub', huggingface_hub.__version__)"
}

stage_build() {
  local arch
  arch="$("$py" -c 'import torch; M, m = torch.cuda.get_device_capability(); print(f"{M}.{m}")')" \
    || return 1
  echo "TORCH_CUDA_ARCH_LIST=$arch"
  FLR_ENGINE_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" \
    "$py" -m pip install --no-index --no-build-isolation --no-deps -e . || return 1
  # torch first: the CUDA extension links against libc10 / libtorch, which torch loads
  "$py" -c "import torch, flr_engine._C, flr_engine._C_cuda; print('extensions:', flr_engine._C.__file__, flr_engine._C_cuda.__file__)"
}

stage_build_cpp() {
  FLR_ENGINE_SKIP_CUDA=1 "$py" -m pip install --no-index --no-build-isolation --no-deps -e . \
    || return 1
  "$py" -c "import flr_engine._C; print('extension:', flr_engine._C.__file__)"
}

stage_build_dry() {  # the package is installed already (CI); compile the CUDA sources only
  "$py" -c "import flr_engine._C; print('extension:', flr_engine._C.__file__)" || return 1
  bash "$root/scripts/compile_cuda.sh"
}

stage_pytest() {
  local extra=()
  "$py" -c "import xdist" 2>/dev/null && extra+=(-n 8)
  "$py" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 240)
  if [ "$dry" = 1 ]; then  # the GPU tests collect and skip on the CPU
    "$py" -m pytest -q -p no:cacheprovider -m gpu --junitxml "$OUT/pytest.xml" tests
  else
    "$py" -m pytest -q -p no:cacheprovider -rfE -m "${FLR_GPU_CHECK_PYTEST_MARK:-gpu}" \
      "${extra[@]}" --junitxml "$OUT/pytest.xml" tests
  fi
}

export -f stage_env stage_wheels stage_build stage_build_cpp stage_build_dry stage_pytest
export py root dry
note "out: $OUT; dry run: $dry; budget ${budget}s"
run_stage env 60 stage_env
if [ "$dry" = 0 ]; then
  if run_stage wheels 120 stage_wheels && [ -d /tmp/flr_site ]; then
    export PYTHONPATH=/tmp/flr_site${PYTHONPATH:+:$PYTHONPATH}
  fi
  run_stage build 300 stage_build || run_stage build-cpp 180 stage_build_cpp
  # if both builds failed the stages still import flr_engine from the source tree (Python
  # packer); the repository's kernels/ folder is a namespace package and cannot shadow
  # Hugging Face's `kernels`
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$root
else
  run_stage build 300 stage_build_dry
  run_stage aot 300 env -u TRITON_INTERPRET "$py" scripts/gpu_check.py aot --out "$OUT"
fi
for stage in compiled logprob tree engine; do
  limit=150
  [ "$stage" = compiled ] && limit=90
  run_stage "$stage" "$limit" "$py" scripts/gpu_check.py "$stage" --out "$OUT" "${dryflag[@]}"
done
run_stage pytest 240 stage_pytest

{
  echo
  echo "================ flr-engine gpu_check summary ($([ "$dry" = 1 ] && echo "DRY RUN, CPU" || echo GPU)) ================"
  "$py" scripts/gpu_check.py summary --out "$OUT" 2>&1
  if [ -f "$OUT/pytest.xml" ]; then
    "$py" - "$OUT/pytest.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print("\n== pytest:", ", ".join(f"{k} {v}" for k, v in total.items()))
for s in suites:
    for case in s.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            print("   FAILED", case.get("classname"), case.get("name"))
EOF
  fi
  echo
  echo "== stages (total $(($(date +%s) - start))s of ${budget}s)"
  printf '%-10s %-14s %6s  %s\n' stage status secs log
  while IFS=$'\t' read -r name status secs log; do
    printf '%-10s %-14s %6s  %s\n' "$name" "$status" "$secs" "${log##*/}"
  done <"$OUT/stages.tsv"
} | tee "$OUT/summary.txt"

# exit status: 0 when every stage that ran passed
! grep -qv $'\tok\t' "$OUT/stages.tsv"
