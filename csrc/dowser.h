// Declarations of the dowser._C entry points. Each op lives in its own file under cpu/ or cuda/;
// ops.cpp only binds them. Ops are declared (schemas, dispatch) in Python: dowser/_registry.py.
#pragma once
#include <torch/extension.h>

namespace dowser {

// Bit-packed masks: flat row-major index i -> word i / 32, bit i % 32 (LSB first), padding 0.
torch::Tensor pack_mask_cpu(const torch::Tensor& mask);
torch::Tensor unpack_mask_cpu(const torch::Tensor& packed, int64_t numel);

// Scores S = |W| * (P A) (P: (d_out, B) row factors already scaled by w / sum(w); A: (B, d_in))
// and the exact k-lowest selection over one or many matrices (issue 4): packed masks plus
// int64 stats [threshold key, count below, ties taken].
torch::Tensor scores_cpu(const torch::Tensor& weight, const torch::Tensor& p, const torch::Tensor& a);
std::tuple<std::vector<torch::Tensor>, torch::Tensor> select_masks_cpu(
    const std::vector<torch::Tensor>& weights, const std::vector<torch::Tensor>& ps,
    const std::vector<torch::Tensor>& as, int64_t k);

// Masked optimizer steps (csrc/cpu/masked_adamw.cpp). An empty masks[i] means every entry
// trains; a non-empty offsets[i] (per-word popcount prefix sums) means compact fp32 state.
// masters (last; empty list or empty masters[i] = none): fp32 master weights of bf16/fp16
// params, laid out like the state; the step then updates masters[i] and stores its rounding.
// Returns per-tensor NaN/Inf counts of trainable gradients; nothing is written if any is > 0.
torch::Tensor masked_adamw_cpu(const std::vector<torch::Tensor>& params,
                               const std::vector<torch::Tensor>& grads,
                               const std::vector<torch::Tensor>& exp_avgs,
                               const std::vector<torch::Tensor>& exp_avg_sqs,
                               const std::vector<torch::Tensor>& masks,
                               const std::vector<torch::Tensor>& offsets,
                               const std::vector<double>& steps, double lr, double beta1,
                               double beta2, double eps, double weight_decay, bool maximize,
                               bool skip_nonfinite, const std::vector<torch::Tensor>& masters);
// The instruction-set path the CPU kernels run on now ("default", "avx2", "avx512", "neon"):
// DOWSER_CPU_CAPABILITY if set (an error if unknown or unsupported), else the best supported.
const char* cpu_capability();
// The read-only pass alone: per-tensor NaN/Inf counts of trainable gradients.
torch::Tensor count_nonfinite_cpu(const std::vector<torch::Tensor>& grads,
                                  const std::vector<torch::Tensor>& masks);
torch::Tensor masked_sgd_cpu(const std::vector<torch::Tensor>& params,
                             const std::vector<torch::Tensor>& grads,
                             const std::vector<torch::Tensor>& bufs,
                             const std::vector<torch::Tensor>& masks,
                             const std::vector<torch::Tensor>& offsets, const std::vector<bool>& first,
                             double lr, double momentum, double dampening, double weight_decay,
                             bool nesterov, bool maximize, const std::vector<torch::Tensor>& masters);
#ifdef DOWSER_WITH_CUDA
// The same steps on CUDA (csrc/cuda/masked_adamw.cu), one multi-tensor launch per call;
// `stream` is the CUDA stream as an integer (torch.cuda.current_stream().cuda_stream).
torch::Tensor masked_adamw_cuda(const std::vector<torch::Tensor>& params,
                                const std::vector<torch::Tensor>& grads,
                                const std::vector<torch::Tensor>& exp_avgs,
                                const std::vector<torch::Tensor>& exp_avg_sqs,
                                const std::vector<torch::Tensor>& masks,
                                const std::vector<torch::Tensor>& offsets,
                                const std::vector<double>& steps, double lr, double beta1,
                                double beta2, double eps, double weight_decay, bool maximize,
                                bool skip_nonfinite, int64_t stream,
                                const std::vector<torch::Tensor>& masters);
torch::Tensor masked_sgd_cuda(const std::vector<torch::Tensor>& params,
                              const std::vector<torch::Tensor>& grads,
                              const std::vector<torch::Tensor>& bufs,
                              const std::vector<torch::Tensor>& masks,
                              const std::vector<torch::Tensor>& offsets, const std::vector<bool>& first,
                              double lr, double momentum, double dampening, double weight_decay,
                              bool nesterov, bool maximize, int64_t stream,
                              const std::vector<torch::Tensor>& masters);
#endif

}  // namespace dowser
