// Fused gathered log-prob: CUDA forward kernel, framework-free host API.
//
// For rows n of hidden (N, H), an LM head weight (V, H), an optional fp32 bias (V,) and
// int64 targets (N,):
//
//   z[n, v]  = (hidden[n] . weight[v] + bias[v]) * logit_scale
//   z[n, v]  = softcap * tanh(z[n, v] / softcap)              (only when softcap > 0)
//   lse[n]   = log sum_v exp(z[n, v])
//   logp[n]  = z[n, targets[n]] - lse[n]       (0 where targets[n] == ignore_index)
//
// without materialising the (N, V) logits: each thread block owns a tile of rows (kept in
// shared memory as fp32) and a range of the vocabulary; each warp walks its share of that range
// one vocabulary row at a time (coalesced weight reads, warp-shuffle dot products), keeping an
// online (max, sum-of-exp) per row. Partial results of the warps (and, for small N, of several
// vocabulary splits) are merged with the usual log-sum-exp combine.
//
// Inputs: hidden and weight share one dtype (fp32, bf16 or fp16), accumulation is fp32;
// hidden rows may be strided (unit stride along H), weight is contiguous (V, H).
// A target outside [0, V) that is not ignore_index gives logp = NaN.
//
// Usage (host):
//   FlrFusedLogprobPlan plan;
//   flr_fused_logprob_plan(N, H, V, device, &plan);        // picks tile sizes and splits
//   void* ws = <allocate plan.workspace_bytes on the device, or nullptr when 0>;
//   flr_fused_logprob_forward(..., &plan, ws, stream);     // asynchronous on `stream`
//
// This header is plain C++ (no device code) so host-compiled bindings can include it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#ifdef __cplusplus
extern "C" {
#endif

// Element type of hidden and weight.
enum FlrDType { FLR_DTYPE_FLOAT32 = 0, FLR_DTYPE_BFLOAT16 = 1, FLR_DTYPE_FLOAT16 = 2 };

// Launch plan; fill it with flr_fused_logprob_plan, do not edit it by hand.
typedef struct FlrFusedLogprobPlan {
  int rows_per_block;      // rows of hidden per thread block (1, 2, 4 or 8)
  int num_splits;          // vocabulary splits per row tile (>= 1)
  int64_t split_size;      // vocabulary entries per split
  size_t smem_bytes;       // dynamic shared memory per block
  size_t workspace_bytes;  // device scratch the caller must provide (0 when num_splits == 1)
} FlrFusedLogprobPlan;

// Plans a launch for N rows, hidden size H and vocabulary V on CUDA device `device`.
// Returns cudaErrorInvalidValue when a single hidden row does not fit in shared memory
// (H above ~40k on sm_80) or a size is negative.
cudaError_t flr_fused_logprob_plan(int64_t n_rows, int64_t hidden_size, int64_t vocab_size,
                                   int device, FlrFusedLogprobPlan* plan);

// Enqueues the forward on `stream`. logp and lse are (N,) fp32 outputs. bias may be nullptr.
// softcap <= 0 disables soft-capping. workspace must hold plan->workspace_bytes (16-byte
// aligned; cudaMalloc / torch allocations are). Returns the launch error, if any.
cudaError_t flr_fused_logprob_forward(const void* hidden, int64_t hidden_row_stride,
                                      const void* weight, const float* bias,
                                      const int64_t* targets, float* logp, float* lse,
                                      int64_t n_rows, int64_t hidden_size, int64_t vocab_size,
                                      float logit_scale, float softcap, int64_t ignore_index,
                                      int dtype, const FlrFusedLogprobPlan* plan, void* workspace,
                                      cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
