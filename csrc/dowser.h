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

}  // namespace dowser
