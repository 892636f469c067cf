// CPU pack/unpack of bit-packed masks (layout: DESIGN.md §2); the loops are per-ISA kernels
// (kernels_impl.h).
#include <cstring>
#include <stdexcept>

#include "../dowser.h"
#include "kernels.h"

namespace dowser {

torch::Tensor pack_mask_cpu(const torch::Tensor& mask) {
  TORCH_CHECK(mask.device().is_cpu(), "pack_mask_cpu: mask must be on CPU");
  TORCH_CHECK(mask.scalar_type() == torch::kBool, "pack_mask_cpu: mask must be bool");
  // reshape(-1) gives logical row-major order for any strides (copies only if it must).
  const torch::Tensor flat = mask.reshape({-1}).contiguous();
  const int64_t n = flat.numel();
  const int64_t words = (n + 31) / 32;
  torch::Tensor out = torch::empty({words}, torch::dtype(torch::kInt32));
  const bool* src = flat.data_ptr<bool>();
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  try {
    cpu::kernels().pack(src, n, dst);
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
  return out;
}

torch::Tensor unpack_mask_cpu(const torch::Tensor& packed, int64_t numel) {
  TORCH_CHECK(packed.device().is_cpu(), "unpack_mask_cpu: packed must be on CPU");
  TORCH_CHECK(packed.scalar_type() == torch::kInt32, "unpack_mask_cpu: packed must be int32");
  TORCH_CHECK(numel >= 0 && packed.numel() == (numel + 31) / 32,
              "unpack_mask_cpu: packed has ", packed.numel(), " words, expected ", (numel + 31) / 32);
  const torch::Tensor words_t = packed.contiguous();
  const uint32_t* src = reinterpret_cast<const uint32_t*>(words_t.data_ptr<int32_t>());
  torch::Tensor out = torch::empty({numel}, torch::dtype(torch::kBool));
  bool* dst = out.data_ptr<bool>();
  try {
    cpu::kernels().unpack(src, numel, dst);
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
  return out;
}

}  // namespace dowser
