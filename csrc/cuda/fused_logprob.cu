// Fused gathered log-prob, CUDA forward kernel (see fused_logprob.cuh for the contract).
//
// Layout of the work:
//   grid  = (ceil(N / ROWS), num_splits); block = 256 threads = 8 warps.
//   Block (bx, by) owns rows [bx * ROWS, bx * ROWS + ROWS) and vocabulary entries
//   [by * split_size, (by + 1) * split_size). It stages its hidden rows in shared memory as fp32,
//   then warp w takes vocabulary entries v = begin + w, begin + w + 8, ...: its 32 lanes read
//   weight[v, :] coalesced, each multiplies its slice against every staged row, and a butterfly
//   shuffle leaves the full dot product z[r, v] in every lane. Each lane keeps the same online
//   (max m, sum s) per row, so no per-v communication is needed beyond the shuffle.
//   The block then merges its 8 warps' (m, s); with one split it writes lse and logp directly,
//   with several it writes partials that fused_logprob_combine_kernel merges.
//
// Framework-free: raw pointers, sizes and a cudaStream_t. Compiles with
//   nvcc -c -std=c++17 -arch=sm_80 fused_logprob.cu
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>

#include "fused_logprob.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxRows = 8;
// Each warp of a split should see at least this many vocabulary entries.
constexpr int64_t kMinEntriesPerWarp = 32;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// Sum over the 32 lanes; every lane gets the result.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// Online log-sum-exp: fold z into (m = running max, s = sum of exp(z_i - m)). NaN propagates
// through s.
__device__ __forceinline__ void lse_push(float& m, float& s, float z) {
  if (z > m) {
    s = s * expf(m - z) + 1.0f;  // exp(-inf) = 0 on the first entry
    m = z;
  } else {
    s += expf(z - m);
  }
}

// Merge (m2, s2) into (m, s); an empty partial has m = -inf and s = 0.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  if (m2 == -INFINITY) return;
  if (m == -INFINITY) {
    m = m2;
    s = s2;
    return;
  }
  const float mx = fmaxf(m, m2);
  s = s * expf(m - mx) + s2 * expf(m2 - mx);
  m = mx;
}

__device__ __forceinline__ float apply_scale_cap(float z, float logit_scale, float softcap) {
  z *= logit_scale;
  if (softcap > 0.0f) z = softcap * tanhf(z / softcap);
  return z;
}

template <typename T, int ROWS>
__global__ void __launch_bounds__(kThreads)
    fused_logprob_fwd_kernel(const T* __restrict__ hidden, int64_t hidden_row_stride,
                             const T* __restrict__ weight, const float* __restrict__ bias,
                             const int64_t* __restrict__ targets, float* __restrict__ logp,
                             float* __restrict__ lse, float* __restrict__ part_m,
                             float* __restrict__ part_s, float* __restrict__ part_t, int64_t n_rows,
                             int64_t hidden_size, int64_t vocab_size, int64_t split_size,
                             float logit_scale, float softcap, int64_t ignore_index) {
  extern __shared__ float sh_hidden[];  // (ROWS, H) fp32
  __shared__ float sh_m[ROWS][kWarps];
  __shared__ float sh_s[ROWS][kWarps];
  __shared__ float sh_target[ROWS];  // target logit, NaN until its vocabulary entry passes

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t H = hidden_size;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * ROWS;
  const int64_t v_begin = static_cast<int64_t>(blockIdx.y) * split_size;
  const int64_t v_end = min(vocab_size, v_begin + split_size);

  // Stage the row tile (zeros past N) in fp32.
  for (int64_t i = threadIdx.x; i < ROWS * H; i += kThreads) {
    const int64_t r = i / H;
    const int64_t k = i - r * H;
    const int64_t row = row0 + r;
    sh_hidden[i] = row < n_rows ? to_float(hidden[row * hidden_row_stride + k]) : 0.0f;
  }
  int64_t target[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) target[r] = row0 + r < n_rows ? targets[row0 + r] : -1;
  if (threadIdx.x < ROWS) sh_target[threadIdx.x] = NAN;
  __syncthreads();

  float m[ROWS];
  float s[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    m[r] = -INFINITY;
    s[r] = 0.0f;
  }

  for (int64_t v = v_begin + warp; v < v_end; v += kWarps) {
    const T* w_row = weight + v * H;
    float dot[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) dot[r] = 0.0f;
    for (int64_t k = lane; k < H; k += 32) {
      const float w = to_float(w_row[k]);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) dot[r] = fmaf(w, sh_hidden[r * H + k], dot[r]);
    }
    const float b = bias != nullptr ? bias[v] : 0.0f;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const float z = apply_scale_cap(warp_sum(dot[r]) + b, logit_scale, softcap);
      lse_push(m[r], s[r], z);
      if (v == target[r] && lane == 0) sh_target[r] = z;
    }
  }

  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      sh_m[r][warp] = m[r];
      sh_s[r][warp] = s[r];
    }
  }
  __syncthreads();

  if (threadIdx.x < ROWS) {
    const int r = threadIdx.x;
    const int64_t row = row0 + r;
    if (row >= n_rows) return;
    float mm = -INFINITY;
    float ss = 0.0f;
    for (int w = 0; w < kWarps; ++w) lse_merge(mm, ss, sh_m[r][w], sh_s[r][w]);
    if (gridDim.y == 1) {
      const float l = mm + logf(ss);
      lse[row] = l;
      logp[row] = targets[row] == ignore_index ? 0.0f : sh_target[r] - l;
    } else {
      const int64_t at = static_cast<int64_t>(blockIdx.y) * n_rows + row;
      part_m[at] = mm;
      part_s[at] = ss;
      part_t[at] = sh_target[r];  // NaN unless the target lies in this split
    }
  }
}

// Merge the per-split partials (num_splits, N) into lse and logp; one thread per row.
__global__ void fused_logprob_combine_kernel(const float* __restrict__ part_m,
                                             const float* __restrict__ part_s,
                                             const float* __restrict__ part_t,
                                             const int64_t* __restrict__ targets,
                                             float* __restrict__ logp, float* __restrict__ lse,
                                             int64_t n_rows, int64_t vocab_size, int num_splits,
                                             int64_t split_size, int64_t ignore_index) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= n_rows) return;
  float mm = -INFINITY;
  float ss = 0.0f;
  for (int sp = 0; sp < num_splits; ++sp) {
    lse_merge(mm, ss, part_m[sp * n_rows + row], part_s[sp * n_rows + row]);
  }
  const float l = mm + logf(ss);
  const int64_t t = targets[row];
  float z_t = NAN;
  if (t >= 0 && t < vocab_size) z_t = part_t[(t / split_size) * n_rows + row];
  lse[row] = l;
  logp[row] = t == ignore_index ? 0.0f : z_t - l;
}

template <typename T, int ROWS>
cudaError_t launch_rows(const void* hidden, int64_t hidden_row_stride, const void* weight,
                        const float* bias, const int64_t* targets, float* logp, float* lse,
                        int64_t n_rows, int64_t hidden_size, int64_t vocab_size,
                        float logit_scale, float softcap, int64_t ignore_index,
                        const FlrFusedLogprobPlan& plan, void* workspace, cudaStream_t stream) {
  auto kernel = fused_logprob_fwd_kernel<T, ROWS>;
  if (plan.smem_bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.smem_bytes));
    if (err != cudaSuccess) return err;
  }
  float* part_m = nullptr;
  float* part_s = nullptr;
  float* part_t = nullptr;
  if (plan.num_splits > 1) {
    if (workspace == nullptr) return cudaErrorInvalidValue;
    const int64_t part = static_cast<int64_t>(plan.num_splits) * n_rows;
    part_m = static_cast<float*>(workspace);
    part_s = part_m + part;
    part_t = part_s + part;
  }
  const dim3 grid(static_cast<unsigned>((n_rows + ROWS - 1) / ROWS),
                  static_cast<unsigned>(plan.num_splits));
  kernel<<<grid, kThreads, plan.smem_bytes, stream>>>(
      static_cast<const T*>(hidden), hidden_row_stride, static_cast<const T*>(weight), bias,
      targets, logp, lse, part_m, part_s, part_t, n_rows, hidden_size, vocab_size,
      plan.split_size, logit_scale, softcap, ignore_index);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || plan.num_splits == 1) return err;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((n_rows + threads - 1) / threads);
  fused_logprob_combine_kernel<<<blocks, threads, 0, stream>>>(
      part_m, part_s, part_t, targets, logp, lse, n_rows, vocab_size, plan.num_splits,
      plan.split_size, ignore_index);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const void* hidden, int64_t hidden_row_stride, const void* weight,
                         const float* bias, const int64_t* targets, float* logp, float* lse,
                         int64_t n_rows, int64_t hidden_size, int64_t vocab_size,
                         float logit_scale, float softcap, int64_t ignore_index,
                         const FlrFusedLogprobPlan& plan, void* workspace, cudaStream_t stream) {
#define FLR_LAUNCH_ROWS(R)                                                                    \
  case R:                                                                                     \
    return launch_rows<T, R>(hidden, hidden_row_stride, weight, bias, targets, logp, lse,     \
                             n_rows, hidden_size, vocab_size, logit_scale, softcap,           \
                             ignore_index, plan, workspace, stream);
  switch (plan.rows_per_block) {
    FLR_LAUNCH_ROWS(1)
    FLR_LAUNCH_ROWS(2)
    FLR_LAUNCH_ROWS(4)
    FLR_LAUNCH_ROWS(8)
    default:
      return cudaErrorInvalidValue;
  }
#undef FLR_LAUNCH_ROWS
}

}  // namespace

extern "C" cudaError_t flr_fused_logprob_plan(int64_t n_rows, int64_t hidden_size,
                                              int64_t vocab_size, int device,
                                              FlrFusedLogprobPlan* plan) {
  if (plan == nullptr || n_rows < 0 || hidden_size < 0 || vocab_size < 1) {
    return cudaErrorInvalidValue;
  }
  int smem_optin = 0;
  int num_sms = 0;
  cudaError_t err =
      cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;

  // Rows per block: as many as fit (static shared memory is < 1 KiB), but not more than N needs.
  const int64_t budget = static_cast<int64_t>(smem_optin) - 1024;
  const int64_t h_eff = hidden_size > 0 ? hidden_size : 1;
  const int64_t row_bytes = h_eff * static_cast<int64_t>(sizeof(float));
  int rows = kMaxRows;
  while (rows > 1 && (rows * row_bytes > budget || rows / 2 >= n_rows)) rows /= 2;
  if (rows * row_bytes > budget) return cudaErrorInvalidValue;  // H too large for one row

  // Vocabulary splits: aim at >= 2 blocks per SM, keeping >= 32 entries per warp per split.
  const int64_t row_blocks = n_rows > 0 ? (n_rows + rows - 1) / rows : 1;
  const int64_t want = (2 * static_cast<int64_t>(num_sms) + row_blocks - 1) / row_blocks;
  const int64_t most = vocab_size / (kWarps * kMinEntriesPerWarp);
  int64_t splits = want < most ? want : most;
  if (splits < 1) splits = 1;
  if (splits > 65535) splits = 65535;
  const int64_t split_size = (vocab_size + splits - 1) / splits;
  splits = (vocab_size + split_size - 1) / split_size;  // no empty split

  plan->rows_per_block = rows;
  plan->num_splits = static_cast<int>(splits);
  plan->split_size = split_size;
  plan->smem_bytes = static_cast<size_t>(rows) * static_cast<size_t>(hidden_size) * sizeof(float);
  plan->workspace_bytes =
      splits > 1 ? 3 * static_cast<size_t>(splits) * static_cast<size_t>(n_rows) * sizeof(float)
                 : 0;
  return cudaSuccess;
}

extern "C" cudaError_t flr_fused_logprob_forward(
    const void* hidden, int64_t hidden_row_stride, const void* weight, const float* bias,
    const int64_t* targets, float* logp, float* lse, int64_t n_rows, int64_t hidden_size,
    int64_t vocab_size, float logit_scale, float softcap, int64_t ignore_index, int dtype,
    const FlrFusedLogprobPlan* plan, void* workspace, cudaStream_t stream) {
  if (plan == nullptr || vocab_size < 1 || hidden_size < 0 || n_rows < 0) {
    return cudaErrorInvalidValue;
  }
  if (n_rows == 0) return cudaSuccess;
  switch (dtype) {
    case FLR_DTYPE_FLOAT32:
      return launch_typed<float>(hidden, hidden_row_stride, weight, bias, targets, logp, lse,
                                 n_rows, hidden_size, vocab_size, logit_scale, softcap,
                                 ignore_index, *plan, workspace, stream);
    case FLR_DTYPE_BFLOAT16:
      return launch_typed<__nv_bfloat16>(hidden, hidden_row_stride, weight, bias, targets, logp,
                                         lse, n_rows, hidden_size, vocab_size, logit_scale,
                                         softcap, ignore_index, *plan, workspace, stream);
    case FLR_DTYPE_FLOAT16:
      return launch_typed<__half>(hidden, hidden_row_stride, weight, bias, targets, logp, lse,
                                  n_rows, hidden_size, vocab_size, logit_scale, softcap,
                                  ignore_index, *plan, workspace, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
