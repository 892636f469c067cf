// The CPU kernels, one source for every instruction set: each csrc/cpu/isa/kernels_<cap>.cpp
// sets its target ISA (#pragma GCC target, i.e. the -m flags for that unit alone), defines
// DOWSER_CAP (the namespace of its copy) and may provide ISA-specific compress/expand of the
// trainable entries (DOWSER_ISA_COMPRESS, namespace isa); then it includes this file. Everything
// else - the NaN/Inf count, the update math (dowser/update_math.h), the score tiles, pack/unpack
// - is plain C++ that the compiler vectorises for that unit's ISA. Nothing here may include a
// torch or C++ standard library header (see kernels.h).
//
// Masked step layout (DESIGN.md §2). Work is split into tasks of up to kBlockWords mask words;
// OpenMP hands each thread one contiguous run of tasks (schedule(static)): long sequential
// streams suit the hardware prefetchers best. A task runs in sub-blocks of kSubWords words,
// each in three phases so that the arithmetic touches only trainable entries:
//   A. gather: the trainable entries of param and grad (and of dense state / masters) are
//      compressed into small thread-local fp32 buffers;
//   B. math: one contiguous, vectorised loop over the sub-block's k entries; compact state (and
//      compact masters) is contiguous already, from the popcount prefix sum, and is updated in
//      place;
//   C. scatter: new values go back into the trainable lanes only (masked stores): a frozen entry
//      is never written, whatever its gradient holds.
// In skip mode an entry whose gradient is NaN/Inf keeps its old values in phase B (a select, so
// its bits are kept) and phase C then stores only entries with a finite gradient.
#ifndef DOWSER_CAP
#error "define DOWSER_CAP, DOWSER_CAP_NAME and DOWSER_CAP_TABLE before including kernels_impl.h"
#endif
#include <stdint.h>
#include <string.h>

#include "kernels.h"

namespace dowser {
namespace cpu {
namespace DOWSER_CAP {
namespace {

constexpr int64_t kBlockWords = 256;  // 8192 entries per task
// Sub-block size of the update (words): gather, math and scatter alternate often enough that
// the prefetches keep memory busy throughout (measured ~10% faster than whole blocks).
constexpr int64_t kSubWords = 16;
constexpr int64_t kStride = kSubWords * 32 + 16;  // + slack for full-vector loads and stores

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

inline uint32_t f2u(float x) { return math::float_bits(x); }
inline float u2f(uint32_t u) {
  float x;
  memcpy(&x, &u, 4);
  return x;
}

// IEEE fp16 <-> fp32 exactly as c10::Half converts (c10/util/Half.h's portable algorithms).
inline float half_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = u2f((two_w >> 4) + (0xE0u << 23)) * u2f(0x07800000u);  // * 2^-112
  const float denormalized = u2f((two_w >> 17) | (126u << 23)) - 0.5f;
  return u2f(sign | (two_w < (1u << 27) ? f2u(denormalized) : f2u(normalized)));
}
inline uint16_t float_to_half(float f) {
  float base = (__builtin_fabsf(f) * u2f(239u << 23)) * u2f(17u << 23);  // 2^112, 2^-110
  const uint32_t w = f2u(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = u2f((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f2u(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

template <int K>
inline float ld1(const void* base, int64_t i) {
  if constexpr (K == kF32) return static_cast<const float*>(base)[i];
  else if constexpr (K == kBF16) return u2f(static_cast<uint32_t>(static_cast<const uint16_t*>(base)[i]) << 16);
  else return half_to_float(static_cast<const uint16_t*>(base)[i]);
}

template <int K>
inline void st1(void* base, int64_t i, float x) {
  if constexpr (K == kF32) static_cast<float*>(base)[i] = x;
  else if constexpr (K == kBF16) static_cast<uint16_t*>(base)[i] = math::bf16_bits(x);
  else static_cast<uint16_t*>(base)[i] = float_to_half(x);
}

// NaN/Inf from the stored bits (no conversion): exponent field all ones.
template <int K>
inline uint32_t bad_bits(const void* base, int64_t i) {
  if constexpr (K == kF32) {
    uint32_t u;
    memcpy(&u, static_cast<const float*>(base) + i, 4);
    return (u & 0x7F800000u) == 0x7F800000u;
  } else {
    constexpr uint16_t e = K == kBF16 ? 0x7F80u : 0x7C00u;
    const uint16_t h = static_cast<const uint16_t*>(base)[i] & e;
    return h == e;
  }
}

inline uint32_t word_at(const Item& it, int64_t w) {
  if (it.mask) return it.mask[w];
  const int64_t left = it.n - w * 32;  // unmasked: all ones, but never past the end
  return left >= 32 ? 0xFFFFFFFFu : ((1u << left) - 1u);
}

// What the compress/expand loops read of an item, as locals: the intrinsics' vector stores may
// alias anything, so a field read through `const Item&` is reloaded after every store (the
// mask and grad pointers twice per word in the AVX-512 gather; held in registers instead, the
// in-cache step takes ~7% fewer cycles).
struct Src {
  const uint32_t* mask;
  const void* grad;
  explicit Src(const Item& it) : mask(it.mask), grad(it.grad) {}
  // A full word (all 32 entries exist): unmasked means all ones.
  uint32_t word(int64_t w) const { return mask ? mask[w] : 0xFFFFFFFFu; }
};

// Software prefetch kPrefetch entries ahead, on Intel only: there a single read stream keeps
// too few misses in flight to use the memory bandwidth (measured ~25% faster on a Xeon); on AMD
// EPYC (Zen 4) the hardware prefetchers do better alone (~11% slower with it). Prefetches past
// the end of a tensor are harmless (they never fault).
constexpr int64_t kPrefetch = 1024;
inline bool prefetch_on() {
#if defined(__x86_64__)
  static const bool on = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
  }();
  return on;
#else
  return false;
#endif
}
template <int K>
inline void prefetch_at(const void* base, int64_t i) {
  constexpr int64_t bytes = K == kF32 ? 4 : 2;
  const char* at = static_cast<const char*>(base) + (i + kPrefetch) * bytes;
  __builtin_prefetch(at, 0, 3);
  if constexpr (K == kF32) __builtin_prefetch(at + 64, 0, 3);
}

// ---- portable compress/expand (the DEFAULT path, and every path's last partial word) --------
namespace portable {

// Compresses the trainable entries of grad (and of `param` unless null) of words [a, e).
template <int K>
int64_t gather_pg(const Item& it, const void* param, int64_t a, int64_t e, float* pb, float* gb) {
  int64_t j = 0;
  const bool pf = prefetch_on();
  for (int64_t w = a; w < e; ++w) {
    uint32_t word = word_at(it, w);
    if (pf) {
      prefetch_at<K>(it.grad, w * 32);
      if (param) prefetch_at<K>(param, w * 32);
    }
    while (word) {
      const int64_t i = w * 32 + __builtin_ctz(word);
      word &= word - 1;
      if (param) pb[j] = ld1<K>(param, i);
      gb[j++] = ld1<K>(it.grad, i);
    }
  }
  return j;
}

inline int64_t gather_f32(const Item& it, const float* src, int64_t a, int64_t e, float* buf) {
  int64_t j = 0;
  for (int64_t w = a; w < e; ++w) {
    uint32_t word = word_at(it, w);
    while (word) {
      buf[j++] = src[w * 32 + __builtin_ctz(word)];
      word &= word - 1;
    }
  }
  return j;
}

template <int K>
int64_t scatter(const Item& it, void* dst, int64_t a, int64_t e, const float* buf) {
  int64_t j = 0;
  for (int64_t w = a; w < e; ++w) {
    uint32_t word = word_at(it, w);
    while (word) {
      st1<K>(dst, w * 32 + __builtin_ctz(word), buf[j++]);
      word &= word - 1;
    }
  }
  return j;
}

}  // namespace portable

// ISA-specific compress/expand of full words (namespace isa), included here so that it sees the
// helpers above; the wrapper unit includes its intrinsics header first.
#ifdef DOWSER_ISA_COMPRESS
#include DOWSER_ISA_COMPRESS
#else
namespace isa = portable;
#endif

// The ISA versions handle full words only; the last, partial word of a tensor goes portable.
template <int K>
inline int64_t gather_pg_any(const Item& it, const void* param, int64_t a, int64_t e, float* pb, float* gb) {
  const int64_t full = imin(e, it.n / 32);
  int64_t j = a < full ? isa::gather_pg<K>(it, param, a, full, pb, gb) : 0;
  if (e > full) {
    const int64_t lo = full > a ? full : a;
    j += portable::gather_pg<K>(it, param, lo, e, param ? pb + j : nullptr, gb + j);
  }
  return j;
}
inline int64_t gather_f32_any(const Item& it, const float* src, int64_t a, int64_t e, float* buf) {
  const int64_t full = imin(e, it.n / 32);
  int64_t j = a < full ? isa::gather_f32(it, src, a, full, buf) : 0;
  if (e > full) j += portable::gather_f32(it, src, full > a ? full : a, e, buf + j);
  return j;
}
template <int K>
inline void scatter_any(const Item& it, void* dst, int64_t a, int64_t e, const float* buf) {
  const int64_t full = imin(e, it.n / 32);
  const int64_t j = a < full ? isa::scatter<K>(it, dst, a, full, buf) : 0;
  if (e > full) portable::scatter<K>(it, dst, full > a ? full : a, e, buf + j);
}

// Skip mode, only for a sub-block that holds a NaN/Inf trainable gradient: store only the
// entries whose gradient is finite (the others keep their exact bits, whatever their dtype).
template <int K, int D>
void scatter_finite(const Item& it, void* dst, int64_t a, int64_t e, const float* buf) {
  int64_t j = 0;
  for (int64_t w = a; w < e; ++w) {
    uint32_t word = word_at(it, w);
    while (word) {
      const int64_t i = w * 32 + __builtin_ctz(word);
      word &= word - 1;
      const float x = buf[j++];
      if (!bad_bits<K>(it.grad, i)) st1<D>(dst, i, x);
    }
  }
}

// ---- NaN/Inf count: branch-free over each word's 32 lanes (vectorised) ----------------------
// NaN/Inf are rare: a vectorised OR over a word's 32 gradients, and only when that finds one,
// the exact count over the trainable lanes. A word with no trainable entry is not read.
// Any NaN/Inf among a full word's 32 gradients, trainable or not.
template <int K>
inline uint32_t any_bad_word(const void* grad, int64_t w) {
  uint32_t any = 0;
  for (int q = 0; q < 32; ++q) any |= bad_bits<K>(grad, w * 32 + q);
  return any;
}

template <int K>
inline int64_t count_bad_word(const Item& it, int64_t w) {
  const uint32_t word = word_at(it, w);
  if (!word || !any_bad_word<K>(it.grad, w)) return 0;
  int64_t bad = 0;
  for (uint32_t x = word; x; x &= x - 1) bad += bad_bits<K>(it.grad, w * 32 + __builtin_ctz(x));
  return bad;
}

// This pass is one read stream, and one stream per core keeps too few cache misses in flight
// to use the memory bandwidth: a task is walked as kCountStreams interleaved sub-ranges
// instead (measured on the Xeon host: 180 MB in 6.0 ms against 8.4 ms for one stream with
// software prefetch, 11.2 ms without; more streams gained nothing). Each step ORs the NaN/Inf
// tests of kCountWords words of every stream, trainable or not, and counts exactly (over the
// trainable lanes) only when that finds one: one branch per 8 words instead of one per word.
constexpr int64_t kCountStreams = 4;
constexpr int64_t kCountWords = 2;

template <int K>
int64_t count_bad_range(const Item& it, int64_t w0, int64_t w1) {
  const void* const grad = it.grad;
  int64_t bad = 0;
  const int64_t full = imin(w1, it.n / 32);  // words whose 32 entries all exist
  constexpr int64_t kStep = kCountStreams * kCountWords;
  const int64_t len = full > w0 ? (full - w0) / kStep * kCountWords : 0;  // words per stream
  for (int64_t j = 0; j < len; j += kCountWords) {
    uint32_t any = 0;
    for (int64_t r = 0; r < kCountStreams; ++r)
      for (int64_t q = 0; q < kCountWords; ++q) any |= any_bad_word<K>(grad, w0 + r * len + j + q);
    if (!any) continue;
    for (int64_t r = 0; r < kCountStreams; ++r)
      for (int64_t q = 0; q < kCountWords; ++q) bad += count_bad_word<K>(it, w0 + r * len + j + q);
  }
  for (int64_t w = w0 + kCountStreams * len; w < full; ++w) bad += count_bad_word<K>(it, w);
  for (int64_t w = full < w0 ? w0 : full; w < w1; ++w) {  // the partial last word
    uint32_t word = word_at(it, w);
    for (; word; word &= word - 1) bad += bad_bits<K>(grad, w * 32 + __builtin_ctz(word));
  }
  return bad;
}

void count_bad(const Item* items, const Task* tasks, int64_t nt, int64_t* per_task) {
#pragma omp parallel for schedule(static) if (nt > 1)
  for (int64_t t = 0; t < nt; ++t) {
    const Item& it = items[tasks[t].item];
    switch (it.kind) {
      case kF32: per_task[t] = count_bad_range<kF32>(it, tasks[t].w0, tasks[t].w1); break;
      case kF16: per_task[t] = count_bad_range<kF16>(it, tasks[t].w0, tasks[t].w1); break;
      default: per_task[t] = count_bad_range<kBF16>(it, tasks[t].w0, tasks[t].w1); break;
    }
  }
}

// ---- phase B: the update math (dowser/update_math.h) over contiguous buffers ----------------
template <bool kSkip, bool kMax>
inline __attribute__((always_inline)) int64_t adam_loop(int64_t n, float* __restrict p,
                                                        const float* __restrict g, float* __restrict m,
                                                        float* __restrict v, const math::AdamScalars& s) {
  int64_t bad = 0;
#pragma omp simd reduction(+ : bad)
  for (int64_t t = 0; t < n; ++t) {
    const float graw = g[t];
    const float gt = kMax ? -graw : graw;
    const float p0 = p[t], m0 = m[t], v0 = v[t];
    float pn = p0, mn = m0, vn = v0;
    math::adamw_entry(gt, pn, mn, vn, s);
    if (kSkip) {  // keep the old bits where the gradient is bad: a branch-free bitwise select
      const uint32_t nf = (f2u(graw) & 0x7F800000u) == 0x7F800000u;
      const uint32_t keep = 0u - nf;
      p[t] = u2f((f2u(p0) & keep) | (f2u(pn) & ~keep));
      m[t] = u2f((f2u(m0) & keep) | (f2u(mn) & ~keep));
      v[t] = u2f((f2u(v0) & keep) | (f2u(vn) & ~keep));
      bad += nf;
    } else {
      p[t] = pn;
      m[t] = mn;
      v[t] = vn;
    }
  }
  return bad;
}

template <bool kMom, bool kMax>
void sgd_buf(int64_t n, float* __restrict p, const float* __restrict g, float* __restrict b,
             const math::SgdScalars& s, bool first) {
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) {
    const float gt = kMax ? -g[t] : g[t];
    float pn = p[t];
    float bn = kMom ? b[t] : 0.0f;
    math::sgd_entry(gt, pn, bn, s, first);
    p[t] = pn;
    if (kMom) b[t] = bn;
  }
}

// A sub-block holds a few dozen entries at rho = 0.1, so a scalar epilogue (up to 15 entries
// of divides and square roots) costs about as much as the vector body: the last n % 16 entries
// run instead as one zero-padded vector of 16 in local buffers (zeros are finite and stay
// finite), and only the real entries are copied back.
constexpr int64_t kTail = 16;

template <bool kSkip, bool kMax>
int64_t adam_buf(int64_t n, float* __restrict p, const float* __restrict g, float* __restrict m,
                 float* __restrict v, const math::AdamScalars& s) {
  const int64_t nv = n / kTail * kTail;
  int64_t bad = adam_loop<kSkip, kMax>(nv, p, g, m, v, s);
  if (nv < n) {
    const int64_t r = n - nv;
    alignas(64) float tp[kTail] = {}, tg[kTail] = {}, tm[kTail] = {}, tv[kTail] = {};
    for (int64_t t = 0; t < r; ++t) tp[t] = p[nv + t], tg[t] = g[nv + t], tm[t] = m[nv + t], tv[t] = v[nv + t];
    bad += adam_loop<kSkip, kMax>(kTail, tp, tg, tm, tv, s);
    for (int64_t t = 0; t < r; ++t) p[nv + t] = tp[t], m[nv + t] = tm[t], v[nv + t] = tv[t];
  }
  return bad;
}

inline bool block_all_trainable(const Item& it, int64_t w0, int64_t w1) {
  if (it.mask == nullptr) return true;
  const int64_t full = imin(w1, it.n / 32);  // words whose 32 entries all exist
  for (int64_t w = w0; w < full; ++w)
    if (it.mask[w] != 0xFFFFFFFFu) return false;
  return full == w1 || word_at(it, w1 - 1) == ((1u << (it.n % 32)) - 1u);
}

struct Bufs {
  float* pb;
  float* gb;
  float* s1b;
  float* s2b;
};

// One task [w0, w1) of an item of dtype K. `math(k, p, g, s1, s2, item)` runs phase B on k
// entries and returns how many it skipped for a NaN/Inf gradient (0 unless skip mode).
template <int K, class Math>
int64_t run_task(const Item& it, int64_t w0, int64_t w1, const Bufs& b, bool need_s1, bool need_s2,
                 Math& math) {
  const bool compact = it.offsets != nullptr;
  if (K == kF32 && it.master == nullptr && block_all_trainable(it, w0, w1)) {
    // Every entry of the block trains (no mask, or all-ones words): update in place, no
    // gather. Compact state is then contiguous and 1:1 too, from the block's prefix sum.
    const int64_t e0 = w0 * 32, e1 = imin(it.n, w1 * 32);
    const int64_t s0 = compact ? it.offsets[w0] : e0;
    return math(e1 - e0, static_cast<float*>(it.param) + e0, static_cast<const float*>(it.grad) + e0,
                need_s1 ? it.s1 + s0 : nullptr, need_s2 ? it.s2 + s0 : nullptr, it);
  }
  int64_t skipped = 0;
  for (int64_t a = w0; a < w1; a += kSubWords) {
    const int64_t e = imin(w1, a + kSubWords);
    const int64_t off = compact ? it.offsets[a] : 0;
    // Where the fp32 parameter values come from: compact masters are updated in place,
    // dense masters and the parameter itself are gathered.
    float* p = b.pb;
    int64_t k;
    if (it.master != nullptr) {
      k = gather_pg_any<K>(it, nullptr, a, e, nullptr, b.gb);
      if (k == 0) continue;
      if (compact) p = it.master + off;
      else gather_f32_any(it, it.master, a, e, b.pb);
    } else {
      k = gather_pg_any<K>(it, it.param, a, e, b.pb, b.gb);
      if (k == 0) continue;
    }
    float* s1 = nullptr;
    float* s2 = nullptr;
    if (compact) {  // this sub-block's state is contiguous
      s1 = need_s1 ? it.s1 + off : nullptr;
      s2 = need_s2 ? it.s2 + off : nullptr;
    } else {
      if (need_s1) { gather_f32_any(it, it.s1, a, e, b.s1b); s1 = b.s1b; }
      if (need_s2) { gather_f32_any(it, it.s2, a, e, b.s2b); s2 = b.s2b; }
    }
    const int64_t bad = math(k, p, b.gb, s1, s2, it);
    if (bad != 0) {  // skip mode only: write back the entries with a finite gradient
      skipped += bad;
      scatter_finite<K, K>(it, it.param, a, e, p);
      if (!compact) {
        if (it.master != nullptr) scatter_finite<K, kF32>(it, it.master, a, e, p);
        if (need_s1) scatter_finite<K, kF32>(it, it.s1, a, e, b.s1b);
        if (need_s2) scatter_finite<K, kF32>(it, it.s2, a, e, b.s2b);
      }
      continue;
    }
    scatter_any<K>(it, it.param, a, e, p);
    if (!compact) {
      if (it.master != nullptr) scatter_any<kF32>(it, it.master, a, e, p);
      if (need_s1) scatter_any<kF32>(it, it.s1, a, e, b.s1b);
      if (need_s2) scatter_any<kF32>(it, it.s2, a, e, b.s2b);
    }
  }
  return skipped;
}

template <class Math>
void run_blocks(const Item* items, const Task* tasks, int64_t nt, bool need_s1, bool need_s2,
                int64_t* per_task, Math math) {
#pragma omp parallel if (nt > 1)
  {
    alignas(64) float buf[4 * kStride];
    const Bufs b{buf, buf + kStride, buf + 2 * kStride, buf + 3 * kStride};
#pragma omp for schedule(static)
    for (int64_t t = 0; t < nt; ++t) {
      const Item& it = items[tasks[t].item];
      int64_t bad;
      switch (it.kind) {
        case kF32: bad = run_task<kF32>(it, tasks[t].w0, tasks[t].w1, b, need_s1, need_s2, math); break;
        case kF16: bad = run_task<kF16>(it, tasks[t].w0, tasks[t].w1, b, need_s1, need_s2, math); break;
        default: bad = run_task<kBF16>(it, tasks[t].w0, tasks[t].w1, b, need_s1, need_s2, math); break;
      }
      if (per_task) per_task[t] = bad;
    }
  }
}

struct AdamMath {
  math::AdamScalars s;
  bool maximize, skip;
  int64_t operator()(int64_t k, float* p, const float* g, float* m, float* v, const Item& it) const {
    math::AdamScalars st = s;
    st.step_size = it.step_size;
    st.bc2_sqrt = it.bc2_sqrt;
    if (skip) return maximize ? adam_buf<true, true>(k, p, g, m, v, st) : adam_buf<true, false>(k, p, g, m, v, st);
    if (maximize) adam_buf<false, true>(k, p, g, m, v, st);
    else adam_buf<false, false>(k, p, g, m, v, st);
    return 0;
  }
};

void adamw(const Item* items, const Task* tasks, int64_t nt, const math::AdamScalars& s, bool maximize,
           bool skip, int64_t* per_task) {
  AdamMath m{s, maximize, skip};
  run_blocks(items, tasks, nt, true, true, skip ? per_task : nullptr, m);
}

struct SgdMath {
  math::SgdScalars s;
  bool maximize;
  int64_t operator()(int64_t k, float* p, const float* g, float* b, float*, const Item& it) const {
    if (s.has_momentum) {
      if (maximize) sgd_buf<true, true>(k, p, g, b, s, it.first);
      else sgd_buf<true, false>(k, p, g, b, s, it.first);
    } else {
      if (maximize) sgd_buf<false, true>(k, p, g, b, s, it.first);
      else sgd_buf<false, false>(k, p, g, b, s, it.first);
    }
    return 0;
  }
};

void sgd(const Item* items, const Task* tasks, int64_t nt, const math::SgdScalars& s, bool maximize) {
  SgdMath m{s, maximize};
  run_blocks(items, tasks, nt, s.has_momentum, false, nullptr, m);
}

// ---- pack / unpack ---------------------------------------------------------------------------
void pack(const bool* src, int64_t n, uint32_t* dst) {
  const int64_t words = (n + 31) / 32;
#pragma omp parallel for schedule(static) if (words > 4096)
  for (int64_t w = 0; w < words; ++w) {
    const int64_t base = w * 32;
    uint32_t word = 0;
    if (base + 32 <= n) {
      for (int b = 0; b < 32; ++b) word |= static_cast<uint32_t>(src[base + b] != 0) << b;
    } else {
      for (int b = 0; b < n - base; ++b) word |= static_cast<uint32_t>(src[base + b] != 0) << b;
    }
    dst[w] = word;
  }
}

void unpack(const uint32_t* src, int64_t n, bool* dst) {
  const int64_t words = (n + 31) / 32;
#pragma omp parallel for schedule(static) if (words > 4096)
  for (int64_t w = 0; w < words; ++w) {
    const int64_t base = w * 32;
    const uint32_t word = src[w];
    if (base + 32 <= n) {
      for (int b = 0; b < 32; ++b) dst[base + b] = (word >> b) & 1u;
    } else {
      for (int b = 0; b < n - base; ++b) dst[base + b] = (word >> b) & 1u;
    }
  }
}

// ---- selection: score tiles and the one-pass window test (select.cpp drives them) -----------
typedef float v8f __attribute__((vector_size(32)));  // loads and stores go through memcpy (unaligned)

// Each score is ((p0*a0 + p1*a1) + ...) * |w|: the same fp32 roundings for every entry, whatever
// the tile, the grouping of rows, the pass or the ISA (separate mul and add; no contraction).
template <int NR>
inline __attribute__((always_inline)) void score_rows_body(const ScoreArgs& L, int64_t i0, int64_t j0,
                                                           int64_t jb, const float* absw, float* s,
                                                           int64_t ld) {
  const int64_t cp = L.cols_pad, B = L.B;
  const float* p[NR];
  for (int r = 0; r < NR; ++r) p[r] = L.p + (i0 + r) * B;
  const float* a = L.a + j0;
  for (int64_t j = 0; j < jb; j += 8) {
    v8f acc[NR];
    v8f a0;
    memcpy(&a0, a + j, sizeof(v8f));
    for (int r = 0; r < NR; ++r) acc[r] = p[r][0] * a0;
    for (int64_t b = 1; b < B; ++b) {
      v8f ab;
      memcpy(&ab, a + b * cp + j, sizeof(v8f));
      for (int r = 0; r < NR; ++r) {
        v8f prod = p[r][b] * ab;
        acc[r] = acc[r] + prod;
      }
    }
    for (int r = 0; r < NR; ++r) {
      v8f w;
      memcpy(&w, absw + r * ld + j, sizeof(v8f));
      v8f out = acc[r] * w;
      memcpy(s + r * ld + j, &out, sizeof(v8f));
    }
  }
}

void score_tile(const ScoreArgs& L, int64_t i0, int nr, int64_t j0, int64_t jb, const float* absw,
                float* s, int64_t ld) {
  int r = 0;
  for (; r + 4 <= nr; r += 4) score_rows_body<4>(L, i0 + r, j0, jb, absw + r * ld, s + r * ld, ld);
  for (; r < nr; ++r) score_rows_body<1>(L, i0 + r, j0, jb, absw + r * ld, s + r * ld, ld);
}

// Branch-free so it vectorises.
uint32_t word_below(const float* s, uint32_t lo, uint32_t hi, uint32_t* in_window) {
  uint32_t v = 0, win = 0;
  for (int q = 0; q < 32; ++q) {
    uint32_t bits;
    memcpy(&bits, s + q, 4);
    bits = (bits << 1) == 0 ? 0u : bits;  // -0.0 ranks as +0.0
    const uint32_t neg = 0u - (bits >> 31);
    const uint32_t key = bits ^ (neg | 0x80000000u);
    v |= static_cast<uint32_t>(key < lo) << q;
    win |= static_cast<uint32_t>(key - lo <= hi - lo) << q;
  }
  *in_window = win;
  return v;
}

}  // namespace
}  // namespace DOWSER_CAP

const Kernels DOWSER_CAP_TABLE = {
    DOWSER_CAP_NAME,             DOWSER_CAP::count_bad,  DOWSER_CAP::adamw,
    DOWSER_CAP::sgd,             DOWSER_CAP::pack,       DOWSER_CAP::unpack,
    DOWSER_CAP::score_tile,      DOWSER_CAP::word_below,
};

}  // namespace cpu
}  // namespace dowser
