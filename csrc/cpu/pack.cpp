// CPU pack/unpack of bit-packed masks (layout: DESIGN.md §2).
#include <cstring>

#include "../dowser.h"

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
#pragma omp parallel for schedule(static) if (words > 4096)
  for (int64_t w = 0; w < words; ++w) {
    const int64_t base = w * 32;
    const int lim = static_cast<int>(std::min<int64_t>(32, n - base));
    uint32_t word = 0;
    for (int b = 0; b < lim; ++b) word |= static_cast<uint32_t>(src[base + b]) << b;
    dst[w] = word;
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
  const int64_t words = words_t.numel();
#pragma omp parallel for schedule(static) if (words > 4096)
  for (int64_t w = 0; w < words; ++w) {
    const int64_t base = w * 32;
    const int lim = static_cast<int>(std::min<int64_t>(32, numel - base));
    const uint32_t word = src[w];
    for (int b = 0; b < lim; ++b) dst[base + b] = (word >> b) & 1u;
  }
  return out;
}

}  // namespace dowser
