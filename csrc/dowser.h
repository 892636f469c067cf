// Declarations of the dowser._C entry points. Each op lives in its own file under cpu/ or cuda/;
// ops.cpp only binds them. Ops are declared (schemas, dispatch) in Python: dowser/_registry.py.
#pragma once
#include <torch/extension.h>

namespace dowser {

// Bit-packed masks: flat row-major index i -> word i / 32, bit i % 32 (LSB first), padding 0.
torch::Tensor pack_mask_cpu(const torch::Tensor& mask);
torch::Tensor unpack_mask_cpu(const torch::Tensor& packed, int64_t numel);

}  // namespace dowser
