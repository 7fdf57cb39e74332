// torch binding of the fused gathered log-prob CUDA kernel: module flr_engine._C_cuda.
//
//   fused_logprob_forward(hidden, weight, bias_or_none, targets, logit_scale, softcap,
//                         ignore_index) -> (logp, lse)
//
// hidden (N, H) and weight (V, H): CUDA, one dtype of fp32 / bf16 / fp16, unit stride along H
// (weight fully contiguous); bias (V,) any float dtype or None; targets (N,) int64 contiguous;
// softcap None (or <= 0) disables soft-capping. Returns fp32 (N,) logp and lse on hidden's
// device, enqueued on the current CUDA stream. Forward only: autograd lives in Python
// (flr_engine.ops.fused_logprob), which recomputes logits chunk by chunk in the backward.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "fused_logprob.cuh"

namespace {

int flr_dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return FLR_DTYPE_FLOAT32;
    case at::kBFloat16:
      return FLR_DTYPE_BFLOAT16;
    case at::kHalf:
      return FLR_DTYPE_FLOAT16;
    default:
      TORCH_CHECK(false, "fused_logprob_forward: hidden must be float32, bfloat16 or float16, got ",
                  t.scalar_type());
  }
  return -1;  // unreachable
}

std::tuple<at::Tensor, at::Tensor> fused_logprob_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double logit_scale, std::optional<double> softcap,
    int64_t ignore_index) {
  TORCH_CHECK(hidden.is_cuda(), "fused_logprob_forward: hidden must be a CUDA tensor, got ",
              hidden.device());
  TORCH_CHECK(weight.device() == hidden.device(),
              "fused_logprob_forward: weight must be on hidden's device ", hidden.device(),
              ", got ", weight.device());
  TORCH_CHECK(targets.device() == hidden.device(),
              "fused_logprob_forward: targets must be on hidden's device ", hidden.device(),
              ", got ", targets.device());
  TORCH_CHECK(hidden.dim() == 2, "fused_logprob_forward: hidden must be 2-D (N, H), got ",
              hidden.sizes());
  TORCH_CHECK(weight.dim() == 2, "fused_logprob_forward: weight must be 2-D (V, H), got ",
              weight.sizes());
  const int dtype = flr_dtype_of(hidden);
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(),
              "fused_logprob_forward: weight dtype must match hidden (", hidden.scalar_type(),
              "), got ", weight.scalar_type());
  const int64_t n = hidden.size(0);
  const int64_t h = hidden.size(1);
  const int64_t v = weight.size(0);
  TORCH_CHECK(weight.size(1) == h, "fused_logprob_forward: weight must be (V, H=", h,
              "), got ", weight.sizes());
  TORCH_CHECK(v >= 1, "fused_logprob_forward: weight must have at least one row (V >= 1)");
  TORCH_CHECK(n == 0 || h <= 1 || hidden.stride(1) == 1,
              "fused_logprob_forward: hidden must have unit stride along H, got strides ",
              hidden.strides());
  TORCH_CHECK(weight.is_contiguous(), "fused_logprob_forward: weight must be contiguous");
  TORCH_CHECK(targets.scalar_type() == at::kLong,
              "fused_logprob_forward: targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == n,
              "fused_logprob_forward: targets must be (N=", n, ",), got ", targets.sizes());
  TORCH_CHECK(targets.is_contiguous(), "fused_logprob_forward: targets must be contiguous");

  at::Tensor bias_f;  // fp32 contiguous copy (V floats) or undefined
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device() == hidden.device(),
                "fused_logprob_forward: bias must be on hidden's device ", hidden.device(),
                ", got ", bias->device());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == v,
                "fused_logprob_forward: bias must be (V=", v, ",), got ", bias->sizes());
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()),
                "fused_logprob_forward: bias must be floating point, got ", bias->scalar_type());
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const double cap = softcap.has_value() ? *softcap : 0.0;
  TORCH_CHECK(!softcap.has_value() || cap > 0.0,
              "fused_logprob_forward: softcap must be None or > 0, got ", cap);

  const c10::cuda::CUDAGuard guard(hidden.device());
  const auto out_opts = hidden.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({n}, out_opts);
  at::Tensor lse = at::empty({n}, out_opts);
  if (n == 0) return {logp, lse};

  FlrFusedLogprobPlan plan;
  cudaError_t err = flr_fused_logprob_plan(n, h, v, hidden.get_device(), &plan);
  TORCH_CHECK(err == cudaSuccess, "fused_logprob_forward: cannot plan a launch for N=", n,
              ", H=", h, ", V=", v, ": ", cudaGetErrorString(err),
              " (one hidden row must fit in shared memory)");
  at::Tensor workspace;
  if (plan.workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(plan.workspace_bytes)},
                          hidden.options().dtype(at::kByte));
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(hidden.get_device()).stream();
  err = flr_fused_logprob_forward(
      hidden.data_ptr(), hidden.stride(0), weight.data_ptr(),
      bias_f.defined() ? bias_f.data_ptr<float>() : nullptr, targets.data_ptr<int64_t>(),
      logp.data_ptr<float>(), lse.data_ptr<float>(), n, h, v, static_cast<float>(logit_scale),
      static_cast<float>(cap), ignore_index, dtype, &plan,
      workspace.defined() ? workspace.data_ptr() : nullptr, stream);
  TORCH_CHECK(err == cudaSuccess, "fused_logprob_forward: kernel launch failed: ",
              cudaGetErrorString(err));
  return {logp, lse};
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "flr-engine CUDA kernels (fused gathered log-prob forward)";
  m.def("fused_logprob_forward", &fused_logprob_forward,
        "Fused gathered log-prob forward: (logp, lse), both (N,) fp32, without (N, V) logits.",
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("targets"),
        py::arg("logit_scale") = 1.0, py::arg("softcap") = py::none(),
        py::arg("ignore_index") = -100);
}
