// CUDA masked AdamW / SGD steps on bit-packed masks (layout: DESIGN.md §2), compact state.
//
// Multi-tensor launch: one metadata table for all tensors of a group, one grid whose blocks
// each take a chunk of kChunkWords mask words of one tensor. A warp handles one mask word at a
// time: lane b owns entry 32*w + b, trains iff bit b is set, and finds its compact state index
// as offsets[w] + popc(word & ((1 << b) - 1)), so loads/stores stay coalesced. fp32 math for
// fp32/bf16/fp16 parameters in PyTorch's fused AdamW order, with explicitly rounded intrinsics
// (no FMA contraction) to match the CPU kernels and the reference.
//
// Atomic ("check") mode: a first kernel counts NaN/Inf gradients in trainable entries (per
// tensor and in total); the update kernel reads the total on the device and writes nothing when
// it is non-zero, so there is no host synchronisation inside the op. Skip mode (also what the
// optimizer uses once it has counted over all groups itself) is one pass: the update kernel
// leaves each NaN/Inf entry unchanged and counts it; the count pass does not run.
// Inputs are checked like the CPU op's (csrc/cpu/masked_adamw.cpp) wherever that needs no
// device read; what would (a mask's padding bits, a compact state's size) is made harmless on
// the device instead: padding bits are ignored, a compact index past the state stops the kernel
// with a device-side assertion (as torch's own index checks do) before any out-of-bounds write. Only torch/extension.h and the CUDA runtime are
// included (this file must compile against the CPU torch wheel's headers too); the stream
// comes from Python as an integer.
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "dowser/update_math.h"  // the per-entry math, shared with the CPU kernels

namespace dowser {
namespace {

constexpr int kThreads = 256;                // 8 warps
constexpr int64_t kChunkWords = 64;          // 2048 entries per block
enum Kind : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

struct Meta {
  int64_t param, grad, s1, s2, mask, offsets;  // device pointers (0 = none)
  int64_t master;  // fp32 master weights laid out like the state (0 = none)
  int64_t n;
  int64_t state_n;      // entries of the state / master arrays (compact: the trainable count)
  int64_t chunk_start;  // first global chunk of this tensor
  float step_size, bc2_sqrt;
  int32_t kind, first;
};

struct Hyper {
  math::AdamScalars adam;  // step_size / bc2_sqrt per tensor (Meta)
  math::SgdScalars sgd;
  int32_t maximize;
  int32_t skip_nonfinite;  // AdamW "skip" mode: update the finite entries, keep the NaN/Inf ones
};

__device__ __forceinline__ float load_val(const Meta& m, int64_t base, int64_t i) {
  if (m.kind == F32) return reinterpret_cast<const float*>(base)[i];
  const uint16_t h = reinterpret_cast<const uint16_t*>(base)[i];
  if (m.kind == BF16) return __uint_as_float(static_cast<uint32_t>(h) << 16);
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ void store_val(const Meta& m, int64_t base, int64_t i, float x) {
  if (m.kind == F32) {
    reinterpret_cast<float*>(base)[i] = x;
    return;
  }
  uint16_t h;
  if (m.kind == BF16) {
    h = math::bf16_bits(x);  // round to nearest even, as c10::BFloat16
  } else {
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
  }
  reinterpret_cast<uint16_t*>(base)[i] = h;
}

__device__ __forceinline__ int find_tensor(const Meta* metas, int count, int64_t chunk) {
  int lo = 0, hi = count - 1;  // last tensor whose chunk_start <= chunk
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (metas[mid].chunk_start <= chunk) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// The word's trainable bits, padding bits past n cleared (a mask made for a larger tensor then
// cannot make the kernels read or write past the parameter).
__device__ __forceinline__ uint32_t word_at(const Meta& m, int64_t w) {
  const int64_t left = m.n - w * 32;
  const uint32_t valid = left >= 32 ? 0xFFFFFFFFu : ((1u << left) - 1u);
  return m.mask ? (reinterpret_cast<const uint32_t*>(m.mask)[w] & valid) : valid;
}

__global__ void count_bad_kernel(const Meta* metas, int count, unsigned long long* bad) {
  const int64_t chunk = blockIdx.x;
  const int t = find_tensor(metas, count, chunk);
  const Meta m = metas[t];
  const int64_t words = (m.n + 31) / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t w0 = (chunk - m.chunk_start) * kChunkWords;
  unsigned int local = 0;
  for (int64_t w = w0 + warp; w < min(words, w0 + kChunkWords); w += kThreads / 32) {
    const uint32_t word = word_at(m, w);
    if (((word >> lane) & 1u) && !isfinite(load_val(m, m.grad, w * 32 + lane))) ++local;
  }
  for (int o = 16; o > 0; o >>= 1) local += __shfl_down_sync(0xFFFFFFFFu, local, o);
  if (lane == 0 && local) {
    atomicAdd(bad + t, static_cast<unsigned long long>(local));
    atomicAdd(bad + count, static_cast<unsigned long long>(local));
  }
}

template <bool kAdam>
__global__ void step_kernel(const Meta* metas, int count, Hyper hp, unsigned long long* bad) {
  if (!hp.skip_nonfinite && bad[count] != 0) return;  // a trainable NaN/Inf: write nothing at all
  const int64_t chunk = blockIdx.x;
  const int t = find_tensor(metas, count, chunk);
  const Meta m = metas[t];
  const int64_t words = (m.n + 31) / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t w0 = (chunk - m.chunk_start) * kChunkWords;
  float* s1 = reinterpret_cast<float*>(m.s1);
  float* s2 = reinterpret_cast<float*>(m.s2);
  const int32_t* offsets = reinterpret_cast<const int32_t*>(m.offsets);
  unsigned int skipped = 0;  // skip mode: NaN/Inf entries left unchanged (counted here: one pass)
  for (int64_t w = w0 + warp; w < min(words, w0 + kChunkWords); w += kThreads / 32) {
    const uint32_t word = word_at(m, w);
    if (!((word >> lane) & 1u)) continue;  // frozen: never read, never written
    const int64_t i = w * 32 + lane;
    const int64_t si = offsets ? static_cast<int64_t>(offsets[w]) + __popc(word & ((1u << lane) - 1u)) : i;
    if (si >= m.state_n) {  // offsets or state made for another mask: stop before writing past it
      __assert_fail("masked step: compact state index past the state (offsets or state made for another mask)",
                    __FILE__, __LINE__, __func__);
      return;
    }
    float g = load_val(m, m.grad, i);
    if (hp.skip_nonfinite && !isfinite(g)) {  // skip mode: param and state keep their bits
      ++skipped;
      continue;
    }
    if (hp.maximize) g = -g;
    float* master = reinterpret_cast<float*>(m.master);
    float p = master ? master[si] : load_val(m, m.param, i);
    if (kAdam) {
      math::AdamScalars as = hp.adam;
      as.step_size = m.step_size;
      as.bc2_sqrt = m.bc2_sqrt;
      float mt = s1[si], vt = s2[si];
      math::adamw_entry(g, p, mt, vt, as);
      s1[si] = mt;
      s2[si] = vt;
    } else {
      float bt = (hp.sgd.has_momentum && !m.first) ? s1[si] : 0.0f;  // a fresh buffer is not read
      math::sgd_entry(g, p, bt, hp.sgd, m.first != 0);
      if (hp.sgd.has_momentum) s1[si] = bt;
    }
    if (master) master[si] = p;
    store_val(m, m.param, i, p);
  }
  if (hp.skip_nonfinite) {  // warp-reduced: one atomic per warp that skipped something
    for (int o = 16; o > 0; o >>= 1) skipped += __shfl_down_sync(0xFFFFFFFFu, skipped, o);
    if (lane == 0 && skipped) atomicAdd(bad + t, static_cast<unsigned long long>(skipped));
  }
}

int32_t kind_of(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat: return F32;
    case torch::kHalf: return F16;
    case torch::kBFloat16: return BF16;
    default: TORCH_CHECK(false, "masked step: parameters must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return F32;
}

int64_t ptr_or_zero(const torch::Tensor& t) {
  return (t.defined() && t.numel() > 0) ? reinterpret_cast<int64_t>(t.data_ptr()) : 0;
}

// Builds the metadata table; returns the number of chunks (blocks).
int64_t build_metas(std::vector<Meta>& metas, const std::vector<torch::Tensor>& params,
                    const std::vector<torch::Tensor>& grads, const std::vector<torch::Tensor>& s1,
                    const std::vector<torch::Tensor>& s2, const std::vector<torch::Tensor>& masks,
                    const std::vector<torch::Tensor>& offsets, const std::vector<torch::Tensor>& masters) {
  int64_t chunks = 0;
  TORCH_CHECK(!params.empty(), "masked step: no parameters");
  const torch::Device device = params[0].device();
  for (size_t i = 0; i < params.size(); ++i) {
    const torch::Tensor& p = params[i];
    TORCH_CHECK(p.is_cuda() && p.is_contiguous(), "masked step: params must be contiguous CUDA tensors");
    // One launch reads every tensor of the call: they must all live on one device.
    TORCH_CHECK(p.device() == device, "masked step: all tensors of one call must be on one device, got ",
                device, " and ", p.device(), " (param ", i, ")");
    TORCH_CHECK(grads[i].device() == device, "masked step: grad ", i, " is on ", grads[i].device(),
                ", its param on ", device);
    TORCH_CHECK(grads[i].is_contiguous(), "masked step: grad must be contiguous");
    TORCH_CHECK(grads[i].scalar_type() == p.scalar_type(), "masked step: grad dtype ", grads[i].scalar_type(),
                " differs from param dtype ", p.scalar_type());
    TORCH_CHECK(grads[i].numel() == p.numel(), "masked step: grad has ", grads[i].numel(), " entries, param ",
                p.numel());
    const int64_t n = p.numel(), words = (n + 31) / 32;
    Meta m{};
    m.param = ptr_or_zero(p);
    m.grad = ptr_or_zero(grads[i]);
    m.mask = ptr_or_zero(masks[i]);
    m.offsets = ptr_or_zero(offsets[i]);
    if (m.mask)
      TORCH_CHECK(masks[i].scalar_type() == torch::kInt32 && masks[i].is_contiguous() && masks[i].numel() == words &&
                      masks[i].device() == device,
                  "masked step: mask must be ", words, " contiguous int32 words on ", device);
    if (m.offsets) {
      TORCH_CHECK(m.mask, "masked step: offsets given without a mask");
      TORCH_CHECK(offsets[i].scalar_type() == torch::kInt32 && offsets[i].is_contiguous() &&
                      offsets[i].numel() == words && offsets[i].device() == device,
                  "masked step: offsets must be ", words, " contiguous int32 words on ", device);
    }
    m.state_n = n;
    for (const auto* st : {&s1, &s2}) {
      if (st->empty()) continue;
      const torch::Tensor& s = (*st)[i];
      TORCH_CHECK(s.scalar_type() == torch::kFloat && s.is_contiguous() && s.device() == device,
                  "masked step: state must be contiguous float32 on the param's device");
      if (!m.offsets) TORCH_CHECK(s.numel() == n, "masked step: dense state has ", s.numel(), " entries, param ", n);
      m.state_n = std::min<int64_t>(m.state_n, s.numel());
    }
    if (!masters.empty() && masters[i].defined() && masters[i].numel() > 0) {
      const torch::Tensor& w = masters[i];
      TORCH_CHECK(p.scalar_type() != torch::kFloat, "masked step: float32 params take no master weights");
      TORCH_CHECK(w.scalar_type() == torch::kFloat && w.is_contiguous() && w.device() == device,
                  "masked step: master weights must be contiguous float32 on the param's device");
      const torch::Tensor* like = !s1.empty() ? &s1[i] : nullptr;
      if (like) {
        TORCH_CHECK(w.numel() == like->numel(), "masked step: master weights must be laid out like the state");
      } else if (!m.offsets) {
        TORCH_CHECK(w.numel() == n, "masked step: dense master weights need one entry per param entry");
      }
      m.master = ptr_or_zero(w);
      // A compact master's size needs the trainable count (a device read): bounded on the
      // device by state_n instead (see step_kernel).
      m.state_n = std::min<int64_t>(m.state_n, w.numel());
    }
    m.s1 = s1.empty() ? 0 : ptr_or_zero(s1[i]);
    m.s2 = s2.empty() ? 0 : ptr_or_zero(s2[i]);
    m.n = n;
    m.chunk_start = chunks;
    m.kind = kind_of(p);
    chunks += (words + kChunkWords - 1) / kChunkWords;
    metas.push_back(m);
  }
  return chunks;
}

// Host-to-device upload through kernel parameters: a launch is fully asynchronous, while a
// copy from pageable host memory may synchronise with the stream (CUDA's API sync rules).
constexpr int kParamBytes = 3584;  // under the 4 KB kernel-parameter limit
struct ParamBytes {
  unsigned char b[kParamBytes];
};

__global__ void upload_kernel(const ParamBytes src, int n, unsigned char* dst) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src.b[i];
}

void upload(const void* host, size_t bytes, void* dev, cudaStream_t stream) {
  const unsigned char* from = static_cast<const unsigned char*>(host);
  unsigned char* to = static_cast<unsigned char*>(dev);
  for (size_t off = 0; off < bytes; off += kParamBytes) {
    ParamBytes chunk;
    const int n = static_cast<int>(bytes - off < kParamBytes ? bytes - off : kParamBytes);
    std::memcpy(chunk.b, from + off, n);
    upload_kernel<<<1, 256, 0, stream>>>(chunk, n, to + off);
  }
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "masked step: ", what, " failed: ", cudaGetErrorString(err));
}

torch::Tensor launch(bool adam, std::vector<Meta>& metas, int64_t chunks, const Hyper& hp,
                     const torch::Device& device, int64_t stream_ptr) {
  const int count = static_cast<int>(metas.size());
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_ptr);
  // The stream belongs to the params' device, and the launches go to the current device: they
  // must be the same (the Python wrappers make it so: dowser/_ops/backends/_common.py).
  int current = -1;
  check_cuda(cudaGetDevice(&current), "cudaGetDevice");
  TORCH_CHECK(current == device.index(), "masked step: the current CUDA device is cuda:", current,
              ", the params are on ", device, " (call through torch.ops.dowser, which guards the device)");
  // cudaGetLastError reports the last error of any earlier call on this thread: one left
  // pending by someone else would be blamed on this op's launches. Name it for what it is.
  const cudaError_t earlier = cudaGetLastError();
  TORCH_CHECK(earlier == cudaSuccess, "masked step: a CUDA error was already pending before this op "
              "(raised by earlier work, not by this op): ", cudaGetErrorString(earlier));
  // metadata + counters in one device buffer: [metas | bad[count + 1]]
  const size_t meta_bytes = metas.size() * sizeof(Meta);
  torch::Tensor dev_meta = torch::empty({static_cast<int64_t>(meta_bytes)},
                                        torch::TensorOptions().dtype(torch::kUInt8).device(device));
  torch::Tensor bad = torch::empty({count + 1}, torch::TensorOptions().dtype(torch::kInt64).device(device));
  TORCH_CHECK(chunks < (int64_t(1) << 31), "masked step: too many chunks");
  upload(metas.data(), meta_bytes, dev_meta.data_ptr(), stream);  // no host synchronisation
  check_cuda(cudaGetLastError(), "metadata upload");
  check_cuda(cudaMemsetAsync(bad.data_ptr(), 0, (count + 1) * sizeof(int64_t), stream), "memset");
  if (chunks > 0) {
    const Meta* d_meta = reinterpret_cast<const Meta*>(dev_meta.data_ptr());
    auto* d_bad = reinterpret_cast<unsigned long long*>(bad.data_ptr<int64_t>());
    if (!hp.skip_nonfinite) {  // atomic mode: the verdict must exist before anything is written
      count_bad_kernel<<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(d_meta, count, d_bad);
      check_cuda(cudaGetLastError(), "NaN/Inf count launch");
    }
    if (adam) step_kernel<true><<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(d_meta, count, hp, d_bad);
    else step_kernel<false><<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(d_meta, count, hp, d_bad);
    check_cuda(cudaGetLastError(), "step launch");
  }
  // dev_meta is freed by the caching allocator only after work queued on the current stream.
  return bad.narrow(0, 0, count);
}

}  // namespace

torch::Tensor masked_adamw_cuda(const std::vector<torch::Tensor>& params,
                                const std::vector<torch::Tensor>& grads,
                                const std::vector<torch::Tensor>& exp_avgs,
                                const std::vector<torch::Tensor>& exp_avg_sqs,
                                const std::vector<torch::Tensor>& masks,
                                const std::vector<torch::Tensor>& offsets,
                                const std::vector<double>& steps, double lr, double beta1,
                                double beta2, double eps, double weight_decay, bool maximize,
                                bool skip_nonfinite, int64_t stream,
                                const std::vector<torch::Tensor>& masters) {
  const size_t n = params.size();
  TORCH_CHECK(n > 0 && grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  masks.size() == n && offsets.size() == n && steps.size() == n &&
                  (masters.empty() || masters.size() == n),
              "masked_adamw_cuda: argument lists differ in length (or are empty)");
  std::vector<Meta> metas;
  const int64_t chunks = build_metas(metas, params, grads, exp_avgs, exp_avg_sqs, masks, offsets, masters);
  for (size_t i = 0; i < n; ++i) {
    metas[i].step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, steps[i])));
    metas[i].bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, steps[i])));
  }
  Hyper hp{};
  hp.adam.decay = static_cast<float>(1.0 - lr * weight_decay);
  hp.adam.w1 = static_cast<float>(1.0 - beta1);
  hp.adam.beta2 = static_cast<float>(beta2);
  hp.adam.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  hp.adam.eps = static_cast<float>(eps);
  hp.maximize = maximize;
  hp.skip_nonfinite = skip_nonfinite;
  return launch(true, metas, chunks, hp, params[0].device(), stream);
}

torch::Tensor masked_sgd_cuda(const std::vector<torch::Tensor>& params,
                              const std::vector<torch::Tensor>& grads,
                              const std::vector<torch::Tensor>& bufs,
                              const std::vector<torch::Tensor>& masks,
                              const std::vector<torch::Tensor>& offsets, const std::vector<bool>& first,
                              double lr, double momentum, double dampening, double weight_decay,
                              bool nesterov, bool maximize, int64_t stream,
                              const std::vector<torch::Tensor>& masters) {
  const size_t n = params.size();
  const bool has_momentum = momentum != 0.0;
  TORCH_CHECK(n > 0 && grads.size() == n && masks.size() == n && offsets.size() == n &&
                  first.size() == n && (bufs.size() == n || (!has_momentum && bufs.empty())) &&
                  (masters.empty() || masters.size() == n),
              "masked_sgd_cuda: argument lists differ in length (or are empty)");
  std::vector<Meta> metas;
  const std::vector<torch::Tensor> none;
  const int64_t chunks = build_metas(metas, params, grads, has_momentum ? bufs : none, none, masks, offsets, masters);
  for (size_t i = 0; i < n; ++i) metas[i].first = first[i] ? 1 : 0;
  Hyper hp{};
  hp.sgd.lr = static_cast<float>(lr);
  hp.sgd.momentum = static_cast<float>(momentum);
  hp.sgd.one_minus_dampening = static_cast<float>(1.0 - dampening);
  hp.sgd.wd = static_cast<float>(weight_decay);
  hp.sgd.nesterov = nesterov;
  hp.sgd.has_momentum = has_momentum;
  hp.maximize = maximize;
  return launch(false, metas, chunks, hp, params[0].device(), stream);
}

}  // namespace dowser
