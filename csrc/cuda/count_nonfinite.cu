// CUDA count_nonfinite: per tensor, the number of NaN/Inf gradient entries that are trainable
// under a bit-packed mask (layout: DESIGN.md §2; an empty mask = every entry trains). The
// read-only pre-check of the masked optimizer steps across parameter groups.
//
// Multi-tensor launch without any host synchronisation: the per-tensor table travels as a
// kernel parameter (up to kMaxTensors tensors per launch, as PyTorch's multi_tensor_apply
// does), so there is no host-to-device copy to wait for; the counts are zeroed and summed on
// the stream. Each block takes kChunkWords mask words of one tensor; a warp handles one word
// at a time, lane b the entry 32*w + b, so loads stay coalesced; one atomicAdd per warp with
// a non-zero count.
//
// Registers itself as dowser_C::count_nonfinite_cuda (TORCH_LIBRARY_FRAGMENT), so it needs
// no declaration in dowser.h nor binding in ops.cpp; dowser/_ops/backends/cuda.py calls it.
// Only torch/extension.h, torch/library.h and the CUDA runtime are included (this file must
// compile against the CPU torch wheel's headers too); the stream comes as an integer.
#include <cuda_runtime.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace dowser {
namespace {

constexpr int kThreads = 256;        // 8 warps
constexpr int64_t kChunkWords = 64;  // 2048 entries per block
constexpr int kMaxTensors = 48;      // the table stays well under the 4 KB parameter limit
enum Kind : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

struct Table {
  int64_t grad[kMaxTensors];
  int64_t mask[kMaxTensors];  // 0 = every entry trains
  int64_t n[kMaxTensors];
  int64_t chunk_start[kMaxTensors];  // first block of each tensor
  int32_t kind[kMaxTensors];
  int32_t count;
};
static_assert(sizeof(Table) < 4000, "kernel parameters are limited to 4 KB");

__device__ __forceinline__ float load_grad(int32_t kind, int64_t base, int64_t i) {
  if (kind == F32) return reinterpret_cast<const float*>(base)[i];
  const uint16_t h = reinterpret_cast<const uint16_t*>(base)[i];
  if (kind == BF16) return __uint_as_float(static_cast<uint32_t>(h) << 16);
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__global__ void count_nonfinite_kernel(const Table table, unsigned long long* bad) {
  const int64_t chunk = blockIdx.x;
  int t = 0;  // last tensor whose chunk_start <= chunk (tables are short: a linear scan)
  while (t + 1 < table.count && table.chunk_start[t + 1] <= chunk) ++t;
  const int64_t n = table.n[t];
  const int64_t words = (n + 31) / 32;
  const uint32_t* mask = reinterpret_cast<const uint32_t*>(table.mask[t]);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t w0 = (chunk - table.chunk_start[t]) * kChunkWords;
  const int64_t w1 = min(words, w0 + kChunkWords);
  unsigned int local = 0;
  for (int64_t w = w0 + warp; w < w1; w += kThreads / 32) {
    uint32_t word;
    if (mask) {
      word = mask[w];
    } else {
      const int64_t left = n - w * 32;
      word = left >= 32 ? 0xFFFFFFFFu : ((1u << left) - 1u);
    }
    // Frozen entries are never read.
    if (((word >> lane) & 1u) && !isfinite(load_grad(table.kind[t], table.grad[t], w * 32 + lane))) ++local;
  }
  for (int o = 16; o > 0; o >>= 1) local += __shfl_down_sync(0xFFFFFFFFu, local, o);
  if (lane == 0 && local) atomicAdd(bad + t, static_cast<unsigned long long>(local));
}

int32_t kind_of(const torch::Tensor& g) {
  switch (g.scalar_type()) {
    case torch::kFloat: return F32;
    case torch::kHalf: return F16;
    case torch::kBFloat16: return BF16;
    default:
      TORCH_CHECK(false, "count_nonfinite_cuda: gradients must be float32, float16 or bfloat16, got ",
                  g.scalar_type());
  }
  return F32;
}

}  // namespace

torch::Tensor count_nonfinite_cuda(const std::vector<torch::Tensor>& grads,
                                   const std::vector<torch::Tensor>& masks, int64_t stream_ptr) {
  const int64_t count = static_cast<int64_t>(grads.size());
  TORCH_CHECK(masks.size() == grads.size(), "count_nonfinite_cuda: ", grads.size(), " gradients but ",
              masks.size(), " masks");
  TORCH_CHECK(count > 0, "count_nonfinite_cuda: no gradients");
  const torch::Device device = grads[0].device();
  for (int64_t i = 0; i < count; ++i) {
    const torch::Tensor& g = grads[i];
    TORCH_CHECK(g.is_cuda() && g.is_contiguous() && g.device() == device,
                "count_nonfinite_cuda: gradients must be contiguous CUDA tensors on one device");
    kind_of(g);
    const torch::Tensor& m = masks[i];
    if (m.defined() && m.numel() > 0)
      TORCH_CHECK(m.device() == device && m.scalar_type() == torch::kInt32 && m.is_contiguous() &&
                      m.numel() == (g.numel() + 31) / 32,
                  "count_nonfinite_cuda: mask ", i, " must be ", (g.numel() + 31) / 32,
                  " contiguous int32 words on the gradient's device");
  }
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_ptr);
  // The stream is the gradients' device's; launches go to the current device (the Python
  // wrapper makes them the same). An error left pending by earlier work is named as such,
  // not blamed on this op's launch (cudaGetLastError returns any earlier error).
  int current = -1;
  TORCH_CHECK(cudaGetDevice(&current) == cudaSuccess && current == device.index(),
              "count_nonfinite_cuda: the current CUDA device is cuda:", current, ", the gradients are on ",
              device, " (call through torch.ops.dowser, which guards the device)");
  const cudaError_t earlier = cudaGetLastError();
  TORCH_CHECK(earlier == cudaSuccess, "count_nonfinite_cuda: a CUDA error was already pending before this op "
              "(raised by earlier work, not by this op): ", cudaGetErrorString(earlier));
  torch::Tensor bad = torch::empty({count}, torch::TensorOptions().dtype(torch::kInt64).device(device));
  TORCH_CHECK(cudaMemsetAsync(bad.data_ptr(), 0, count * sizeof(int64_t), stream) == cudaSuccess,
              "count_nonfinite_cuda: memset failed");
  auto* out = reinterpret_cast<unsigned long long*>(bad.data_ptr<int64_t>());
  for (int64_t first = 0; first < count; first += kMaxTensors) {
    Table table{};
    int64_t blocks = 0;
    table.count = static_cast<int32_t>(std::min<int64_t>(kMaxTensors, count - first));
    for (int t = 0; t < table.count; ++t) {
      const torch::Tensor& g = grads[first + t];
      const torch::Tensor& m = masks[first + t];
      table.grad[t] = reinterpret_cast<int64_t>(g.data_ptr());
      table.mask[t] = (m.defined() && m.numel() > 0) ? reinterpret_cast<int64_t>(m.data_ptr()) : 0;
      table.n[t] = g.numel();
      table.kind[t] = kind_of(g);
      table.chunk_start[t] = blocks;
      blocks += ((g.numel() + 31) / 32 + kChunkWords - 1) / kChunkWords;
    }
    if (blocks == 0) continue;
    TORCH_CHECK(blocks < (int64_t(1) << 31), "count_nonfinite_cuda: too many blocks");
    count_nonfinite_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(table, out + first);
    const cudaError_t err = cudaGetLastError();
    TORCH_CHECK(err == cudaSuccess, "count_nonfinite_cuda: launch failed: ", cudaGetErrorString(err));
  }
  return bad;
}

}  // namespace dowser

TORCH_LIBRARY_FRAGMENT(dowser_C, m) {
  m.def("count_nonfinite_cuda(Tensor[] grads, Tensor[] masks, int stream) -> Tensor",
        &dowser::count_nonfinite_cuda);
}
