// CPU masked AdamW / SGD steps on bit-packed masks (layout: DESIGN.md §2), with compact state.
//
// Work is split into blocks of kBlockWords mask words; OpenMP hands each thread one contiguous
// run of the blocks of all tensors of a group (schedule(static)): long sequential streams suit
// the hardware prefetchers best (measured 8-25% faster than dynamic runs of 4 blocks on Zen 4;
// several interleaved streams per thread measured slower still). A block runs in sub-blocks of
// kSubWords words, each in three phases so that the arithmetic touches only trainable entries:
//   A. gather: the trainable entries of param and grad (and of dense state) are compressed
//      into small thread-local fp32 buffers (AVX-512 compress, or a ctz loop);
//   B. math: one contiguous, vectorisable loop over the block's k_b entries; compact state is
//      contiguous already (it starts at the block's popcount prefix sum);
//   C. scatter: new values go back into the trainable lanes only (masked stores): a frozen
//      entry is never written, whatever its gradient holds.
// Before any of that (nonfinite="check", the default), a read-only pass counts NaN/Inf gradients
// in trainable entries; if there is one, nothing at all is written and the counts are returned
// to Python (which raises). With skip_nonfinite (nonfinite="skip") there is no such pass: phase
// B leaves an entry whose gradient is NaN/Inf as it is (param and state) and counts it, so the
// step reads the gradients once instead of twice.
// Where the time goes (45M fp32, rho = 0.1 random mask): the step is bound by memory reads,
// and at rho = 0.1 four in five 64-byte lines of param and grad hold a trainable entry, so both
// are read whole; the check pass adds a third read of most of the gradient. (In cache the same
// step costs about two thirds of its out-of-cache time: faster gathers, e.g. with VBMI2 byte
// compress, measured no faster out of cache.)
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../dowser.h"

namespace dowser {
namespace {

constexpr int64_t kBlockWords = 256;  // 8192 entries: 32 KiB per fp32 buffer
constexpr int64_t kBlockEntries = kBlockWords * 32;

enum class Kind { F32, F16, BF16 };

struct Item {
  void* param;
  const void* grad;
  float* s1;  // exp_avg / momentum buffer (may be null for SGD without momentum)
  float* s2;  // exp_avg_sq (AdamW only)
  const uint32_t* mask;     // null: every entry trains
  const int32_t* offsets;   // null: state is dense (shaped like the parameter)
  int64_t n;
  Kind kind;
  float step_size, bc2_sqrt;  // AdamW per-tensor bias corrections
  bool first;                 // SGD: fresh momentum buffer
};

struct Task {
  int item;
  int64_t w0, w1;  // word range
};

inline float load1(const Item& it, const void* base, int64_t i) {
  switch (it.kind) {
    case Kind::F32: return static_cast<const float*>(base)[i];
    case Kind::F16: return static_cast<float>(static_cast<const c10::Half*>(base)[i]);
    default: return static_cast<float>(static_cast<const c10::BFloat16*>(base)[i]);
  }
}

inline void store1(const Item& it, void* base, int64_t i, float x) {
  switch (it.kind) {
    case Kind::F32: static_cast<float*>(base)[i] = x; break;
    case Kind::F16: static_cast<c10::Half*>(base)[i] = c10::Half(x); break;
    default: static_cast<c10::BFloat16*>(base)[i] = c10::BFloat16(x); break;
  }
}

inline uint32_t word_at(const Item& it, int64_t w) {
  if (it.mask) return it.mask[w];
  const int64_t left = it.n - w * 32;  // unmasked: all ones, but never past the end
  return left >= 32 ? 0xFFFFFFFFu : ((1u << left) - 1u);
}

inline bool nonfinite(float x) { return !std::isfinite(x); }

// ---- AVX-512 helpers (compiled for avx512 with a target attribute; chosen at run time) ------
#define DOWSER_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

// Software prefetch kPrefetch entries ahead, on Intel only. There a single read stream
// otherwise keeps too few misses in flight to use the memory bandwidth (measured ~25% faster
// on a Xeon); on AMD EPYC (Zen 4) the hardware prefetchers do better alone (prefetching
// measured ~11% slower there). Prefetching past the end of a tensor is harmless (prefetches
// never fault).
constexpr int64_t kPrefetch = 1024;

bool prefetch_on() {
  static const bool on = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
  }();
  return on;
}

// Kind-specialised AVX-512 loads/stores (the dtype switch leaves the inner loops).
template <Kind K>
DOWSER_AVX512 inline __m512 ld(const void* base, int64_t i, __mmask16 k, bool full) {
  if constexpr (K == Kind::F32) {
    const float* f = static_cast<const float*>(base) + i;
    return full ? _mm512_loadu_ps(f) : _mm512_maskz_loadu_ps(k, f);
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(base) + i;
    const __m256i x = full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h))
                           : _mm256_maskz_loadu_epi16(k, h);
    if constexpr (K == Kind::F16) return _mm512_cvtph_ps(x);
    else return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
  }
}

template <Kind K>
DOWSER_AVX512 inline void st(void* base, int64_t i, __mmask16 k, __m512 x) {
  if constexpr (K == Kind::F32) {
    _mm512_mask_storeu_ps(static_cast<float*>(base) + i, k, x);
  } else if constexpr (K == Kind::F16) {
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(base) + i, k,
                             _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    // Round to nearest even, as c10::BFloat16 does (values here are finite).
    const __m512i u = _mm512_castps_si512(x);
    const __m512i bias = _mm512_add_epi32(
        _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7FFF));
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(base) + i, k,
                             _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(u, bias), 16)));
  }
}

constexpr int kElemBytes(Kind k) { return k == Kind::F32 ? 4 : 2; }

template <Kind K>
DOWSER_AVX512 inline void prefetch_k(const void* base, int64_t i) {
  if (!prefetch_on()) return;
  const char* at = static_cast<const char*>(base) + (i + kPrefetch) * kElemBytes(K);
  _mm_prefetch(at, _MM_HINT_T0);
  if constexpr (K == Kind::F32) _mm_prefetch(at + 64, _MM_HINT_T0);
}

// Sub-block size of the update (words): gather, math and scatter alternate often enough that
// the prefetches (kPrefetch entries ahead, across sub-block ends) keep memory busy throughout
// (measured ~10% faster than whole 256-word blocks).
constexpr int64_t kSubWords = 16;

// Loads that skip a 16-lane half with no trainable entry, or prefetches only the lines a later
// word needs, measured slower here (the branches cost more than the lines: the hardware
// prefetcher fetches them anyway), so every word's lines are read.

template <Kind K>
DOWSER_AVX512 inline int64_t bad_in_word(const Item& it, int64_t w, int64_t last, __m512i expo) {
  const uint32_t word = word_at(it, w);
  if (!word) return 0;
  const int64_t i = w * 32;
  const __mmask16 k0 = static_cast<__mmask16>(word), k1 = static_cast<__mmask16>(word >> 16);
  prefetch_k<K>(it.grad, i);
  const bool full = w < last;
  const __m512 g0 = ld<K>(it.grad, i, k0, full), g1 = ld<K>(it.grad, i + 16, k1, full);
  const __mmask16 nf0 = _mm512_mask_cmpeq_epi32_mask(k0, _mm512_and_si512(_mm512_castps_si512(g0), expo), expo);
  const __mmask16 nf1 = _mm512_mask_cmpeq_epi32_mask(k1, _mm512_and_si512(_mm512_castps_si512(g1), expo), expo);
  return __builtin_popcount(static_cast<uint32_t>(nf0) | (static_cast<uint32_t>(nf1) << 16));
}

template <Kind K>
DOWSER_AVX512 int64_t count_bad_avx512(const Item& it, int64_t w0, int64_t w1) {
  int64_t bad = 0;
  const __m512i expo = _mm512_set1_epi32(0x7F800000);
  const int64_t last = (it.n + 31) / 32 - 1;
  for (int64_t w = w0; w < w1; ++w) bad += bad_in_word<K>(it, w, last, expo);
  return bad;
}

// Phase A: compress the trainable lanes of param and grad into pb/gb. A compress in a register
// plus a full store is much faster than a compressing store to memory (microcoded); buffers
// have 16 floats of slack.
template <Kind K>
DOWSER_AVX512 int64_t gather_pg_avx512(const Item& it, int64_t w0, int64_t w1, float* pb, float* gb) {
  const int64_t last = (it.n + 31) / 32 - 1;
  int64_t j = 0;
  for (int64_t w = w0; w < w1; ++w) {
    const uint32_t word = word_at(it, w);
    if (!word) continue;
    const int64_t i = w * 32;
    const __mmask16 k0 = static_cast<__mmask16>(word), k1 = static_cast<__mmask16>(word >> 16);
    prefetch_k<K>(it.param, i);
    prefetch_k<K>(it.grad, i);
    const bool full = w < last;
    const __m512 p0 = ld<K>(it.param, i, k0, full), p1 = ld<K>(it.param, i + 16, k1, full);
    const __m512 g0 = ld<K>(it.grad, i, k0, full), g1 = ld<K>(it.grad, i + 16, k1, full);
    const int c0 = __builtin_popcount(k0);
    _mm512_storeu_ps(pb + j, _mm512_maskz_compress_ps(k0, p0));
    _mm512_storeu_ps(gb + j, _mm512_maskz_compress_ps(k0, g0));
    _mm512_storeu_ps(pb + j + c0, _mm512_maskz_compress_ps(k1, p1));
    _mm512_storeu_ps(gb + j + c0, _mm512_maskz_compress_ps(k1, g1));
    j += c0 + __builtin_popcount(k1);
  }
  return j;
}

// One stream (dense fp32 state in masked mode).
template <Kind K>
DOWSER_AVX512 int64_t gather1_avx512(const Item& it, const void* src, int64_t w0, int64_t w1, float* buf) {
  const int64_t last = (it.n + 31) / 32 - 1;
  int64_t j = 0;
  for (int64_t w = w0; w < w1; ++w) {
    const uint32_t word = word_at(it, w);
    if (!word) continue;
    const int64_t i = w * 32;
    const __mmask16 k0 = static_cast<__mmask16>(word), k1 = static_cast<__mmask16>(word >> 16);
    const bool full = w < last;
    const int c0 = __builtin_popcount(k0);
    _mm512_storeu_ps(buf + j, _mm512_maskz_compress_ps(k0, ld<K>(src, i, k0, full)));
    _mm512_storeu_ps(buf + j + c0, _mm512_maskz_compress_ps(k1, ld<K>(src, i + 16, k1, full)));
    j += c0 + __builtin_popcount(k1);
  }
  return j;
}

// Phase C: expand the buffer back into the trainable lanes; masked stores never touch a
// frozen entry.
template <Kind K>
DOWSER_AVX512 void scatter_avx512(const Item& it, void* dst, int64_t w0, int64_t w1, const float* buf) {
  int64_t j = 0;
  for (int64_t w = w0; w < w1; ++w) {
    const uint32_t word = word_at(it, w);
    if (!word) continue;
    const int64_t i = w * 32;
    const __mmask16 k0 = static_cast<__mmask16>(word), k1 = static_cast<__mmask16>(word >> 16);
    const int c0 = __builtin_popcount(k0);
    st<K>(dst, i, k0, _mm512_maskz_expand_ps(k0, _mm512_loadu_ps(buf + j)));
    st<K>(dst, i + 16, k1, _mm512_maskz_expand_ps(k1, _mm512_loadu_ps(buf + j + c0)));
    j += c0 + __builtin_popcount(k1);
  }
}

template <typename F>
void with_kind(Kind kind, F&& f) {
  switch (kind) {
    case Kind::F32: f(std::integral_constant<Kind, Kind::F32>{}); break;
    case Kind::F16: f(std::integral_constant<Kind, Kind::F16>{}); break;
    default: f(std::integral_constant<Kind, Kind::BF16>{}); break;
  }
}

int64_t count_bad_scalar(const Item& it, int64_t w0, int64_t w1) {
  int64_t bad = 0;
  for (int64_t w = w0; w < w1; ++w) {
    uint32_t word = word_at(it, w);
    while (word) {
      const int b = __builtin_ctz(word);
      word &= word - 1;
      bad += nonfinite(load1(it, it.grad, w * 32 + b));
    }
  }
  return bad;
}

// Scalar fallback of phases A/C (no AVX-512): a ctz loop over the set bits.

// Param and grad together: two interleaved streams keep more memory requests in flight.


int64_t gather_scalar(const Item& it, const void* src, bool f32state, int64_t w0, int64_t w1,
                      float* buf) {
  int64_t j = 0;
  for (int64_t w = w0; w < w1; ++w) {
    uint32_t word = word_at(it, w);
    while (word) {
      const int64_t i = w * 32 + __builtin_ctz(word);
      word &= word - 1;
      buf[j++] = f32state ? static_cast<const float*>(src)[i] : load1(it, src, i);
    }
  }
  return j;
}

void scatter_scalar(const Item& it, void* dst, bool f32state, int64_t w0, int64_t w1,
                    const float* buf) {
  int64_t j = 0;
  for (int64_t w = w0; w < w1; ++w) {
    uint32_t word = word_at(it, w);
    while (word) {
      const int64_t i = w * 32 + __builtin_ctz(word);
      word &= word - 1;
      if (f32state) static_cast<float*>(dst)[i] = buf[j++];
      else store1(it, dst, i, buf[j++]);
    }
  }
}

// Skip mode, only for a block that holds a NaN/Inf trainable gradient: store only the entries
// whose gradient is finite (the others keep their exact bits, whatever their dtype).
void scatter_finite(const Item& it, void* dst, bool f32state, int64_t w0, int64_t w1,
                    const float* buf) {
  int64_t j = 0;
  for (int64_t w = w0; w < w1; ++w) {
    uint32_t word = word_at(it, w);
    while (word) {
      const int64_t i = w * 32 + __builtin_ctz(word);
      word &= word - 1;
      const float x = buf[j++];
      if (nonfinite(load1(it, it.grad, i))) continue;
      if (f32state) static_cast<float*>(dst)[i] = x;
      else store1(it, dst, i, x);
    }
  }
}

// ---- Phase B: the math over contiguous buffers (auto-vectorised; an AVX-512 clone) ---------
struct AdamScalars {
  float decay, w1, beta2, one_minus_beta2, eps;
  bool maximize;
};

// PyTorch's fused AdamW order: p *= 1 - lr*wd; m = lerp(m, g, 1-b1); v = b2*v + (1-b2)*g*g;
// denom = sqrt(v)/sqrt(bc2) + eps; p -= (lr/bc1) * m / denom.
// kSkip: an entry whose gradient is NaN/Inf keeps p, m and v (nothing stored there) and is
// counted; the others get exactly the same arithmetic as without kSkip.
template <bool kMax>
__attribute__((always_inline)) inline void adam_math(int64_t n, float* __restrict p, const float* __restrict g,
                      float* __restrict m, float* __restrict v, const AdamScalars& s,
                      float step_size, float bc2_sqrt) {
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) {
    const float gt = kMax ? -g[t] : g[t];
    const float pt = p[t] * s.decay;
    const float mt = m[t] + s.w1 * (gt - m[t]);
    const float vt = s.beta2 * v[t] + s.one_minus_beta2 * (gt * gt);
    const float denom = std::sqrt(vt) / bc2_sqrt + s.eps;
    m[t] = mt;
    v[t] = vt;
    p[t] = pt - (step_size * mt) / denom;
  }
}

int64_t adam_math_skip_scalar(int64_t n, float* p, const float* g, float* m, float* v,
                              const AdamScalars& s, float step_size, float bc2_sqrt) {
  int64_t bad = 0;
  for (int64_t t = 0; t < n; ++t) {
    if (nonfinite(g[t])) { ++bad; continue; }
    const float gt = s.maximize ? -g[t] : g[t];
    const float pt = p[t] * s.decay;
    const float mt = m[t] + s.w1 * (gt - m[t]);
    const float vt = s.beta2 * v[t] + s.one_minus_beta2 * (gt * gt);
    const float denom = std::sqrt(vt) / bc2_sqrt + s.eps;
    m[t] = mt;
    v[t] = vt;
    p[t] = pt - (step_size * mt) / denom;
  }
  return bad;
}

// Explicitly rounded AVX-512 ops (the *_round_ps forms): the compiler cannot contract them into
// FMAs, so this path rounds exactly as the scalar path and the plain-PyTorch reference.
#define R_ (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define MUL(a, b) _mm512_mul_round_ps(a, b, R_)
#define ADD(a, b) _mm512_add_round_ps(a, b, R_)
#define SUB(a, b) _mm512_sub_round_ps(a, b, R_)
#define DIV(a, b) _mm512_div_round_ps(a, b, R_)

DOWSER_AVX512 inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

template <bool kSkip>
DOWSER_AVX512 int64_t adam_math_avx512(int64_t n, float* p, const float* g, float* m, float* v,
                                       const AdamScalars& s, float step_size, float bc2_sqrt) {
  const __m512 decay = _mm512_set1_ps(s.decay), w1 = _mm512_set1_ps(s.w1);
  const __m512 b2 = _mm512_set1_ps(s.beta2), omb2 = _mm512_set1_ps(s.one_minus_beta2);
  const __m512 eps = _mm512_set1_ps(s.eps), ss = _mm512_set1_ps(step_size);
  const __m512 bc = _mm512_set1_ps(bc2_sqrt);
  const __m512i sign = _mm512_set1_epi32(s.maximize ? static_cast<int>(0x80000000u) : 0);
  const __m512i expo = _mm512_set1_epi32(0x7F800000);
  int64_t bad = 0;
  for (int64_t t = 0; t < n; t += 16) {
    __mmask16 k = tail_mask(n - t);
    const __m512i graw = _mm512_castps_si512(_mm512_maskz_loadu_ps(k, g + t));
    if constexpr (kSkip) {
      const __mmask16 nf = _mm512_mask_cmpeq_epi32_mask(k, _mm512_and_si512(graw, expo), expo);
      bad += __builtin_popcount(static_cast<uint32_t>(nf));
      k &= static_cast<__mmask16>(~nf);
    }
    const __m512 gt = _mm512_castsi512_ps(_mm512_xor_si512(graw, sign));
    const __m512 pt = MUL(_mm512_maskz_loadu_ps(k, p + t), decay);
    const __m512 mo = _mm512_maskz_loadu_ps(k, m + t);
    const __m512 mt = ADD(mo, MUL(w1, SUB(gt, mo)));
    const __m512 vt = ADD(MUL(b2, _mm512_maskz_loadu_ps(k, v + t)), MUL(omb2, MUL(gt, gt)));
    const __m512 denom = ADD(DIV(_mm512_sqrt_round_ps(vt, R_), bc), eps);
    _mm512_mask_storeu_ps(m + t, k, mt);
    _mm512_mask_storeu_ps(v + t, k, vt);
    _mm512_mask_storeu_ps(p + t, k, SUB(pt, DIV(MUL(ss, mt), denom)));
  }
  return bad;
}

void adam_math_generic(int64_t n, float* p, const float* g, float* m, float* v,
                       const AdamScalars& s, float step_size, float bc2_sqrt) {
  if (s.maximize) adam_math<true>(n, p, g, m, v, s, step_size, bc2_sqrt);
  else adam_math<false>(n, p, g, m, v, s, step_size, bc2_sqrt);
}

struct SgdScalars {
  float lr, momentum, one_minus_dampening, wd;
  bool nesterov, maximize, has_momentum;
};

__attribute__((always_inline)) inline void sgd_math(int64_t n, float* __restrict p, const float* __restrict g, float* __restrict b,
                     const SgdScalars& s, bool first) {
#pragma omp simd
  for (int64_t t = 0; t < n; ++t) {
    float d = s.maximize ? -g[t] : g[t];
    if (s.wd != 0.0f) d = d + s.wd * p[t];
    if (s.has_momentum) {
      const float bt = first ? d : s.momentum * b[t] + s.one_minus_dampening * d;
      b[t] = bt;
      d = s.nesterov ? d + s.momentum * bt : bt;
    }
    p[t] = p[t] - s.lr * d;
  }
}

DOWSER_AVX512 void sgd_math_avx512(int64_t n, float* p, const float* g, float* b, const SgdScalars& s,
                                   bool first) {
  const __m512 wd = _mm512_set1_ps(s.wd), mom = _mm512_set1_ps(s.momentum);
  const __m512 omd = _mm512_set1_ps(s.one_minus_dampening), lr = _mm512_set1_ps(s.lr);
  const __m512i sign = _mm512_set1_epi32(s.maximize ? static_cast<int>(0x80000000u) : 0);
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 k = tail_mask(n - t);
    __m512 d = _mm512_castsi512_ps(
        _mm512_xor_si512(_mm512_castps_si512(_mm512_maskz_loadu_ps(k, g + t)), sign));
    const __m512 pt = _mm512_maskz_loadu_ps(k, p + t);
    if (s.wd != 0.0f) d = ADD(d, MUL(wd, pt));
    if (s.has_momentum) {
      const __m512 bt = first ? d : ADD(MUL(mom, _mm512_maskz_loadu_ps(k, b + t)), MUL(omd, d));
      _mm512_mask_storeu_ps(b + t, k, bt);
      d = s.nesterov ? ADD(d, MUL(mom, bt)) : bt;
    }
    _mm512_mask_storeu_ps(p + t, k, SUB(pt, MUL(lr, d)));
  }
}

void sgd_math_generic(int64_t n, float* p, const float* g, float* b, const SgdScalars& s, bool first) {
  sgd_math(n, p, g, b, s, first);
}

bool have_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         std::getenv("DOWSER_NO_AVX512") == nullptr;
  return ok;
}

Kind kind_of(const torch::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case torch::kFloat: return Kind::F32;
    case torch::kHalf: return Kind::F16;
    case torch::kBFloat16: return Kind::BF16;
    default: TORCH_CHECK(false, what, ": parameters must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return Kind::F32;
}

// Validates one tensor's arguments and fills the Item (state pointers filled by the caller).
Item make_item(const torch::Tensor& param, const torch::Tensor& grad, const torch::Tensor& mask,
               const torch::Tensor& offsets, const char* op) {
  TORCH_CHECK(param.device().is_cpu() && grad.device().is_cpu(), op, ": tensors must be on CPU");
  TORCH_CHECK(param.is_contiguous(), op, ": param must be contiguous");
  TORCH_CHECK(grad.is_contiguous(), op, ": grad must be contiguous");
  TORCH_CHECK(grad.scalar_type() == param.scalar_type(), op, ": grad dtype ", grad.scalar_type(),
              " differs from param dtype ", param.scalar_type());
  TORCH_CHECK(grad.numel() == param.numel(), op, ": grad has ", grad.numel(), " entries, param ",
              param.numel());
  Item it{};
  it.param = param.data_ptr();
  it.grad = grad.data_ptr();
  it.n = param.numel();
  it.kind = kind_of(param, op);
  const int64_t words = (it.n + 31) / 32;
  if (mask.defined() && mask.numel() > 0) {
    TORCH_CHECK(mask.scalar_type() == torch::kInt32 && mask.is_contiguous() && mask.numel() == words,
                op, ": mask must be ", words, " contiguous int32 words");
    it.mask = reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>());
  }
  if (offsets.defined() && offsets.numel() > 0) {
    TORCH_CHECK(it.mask != nullptr, op, ": offsets given without a mask");
    TORCH_CHECK(offsets.scalar_type() == torch::kInt32 && offsets.is_contiguous() &&
                    offsets.numel() == words,
                op, ": offsets must be ", words, " contiguous int32 words");
    it.offsets = offsets.data_ptr<int32_t>();
  }
  return it;
}

float* state_ptr(const torch::Tensor& s, const Item& it, const char* op, const char* what) {
  TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == torch::kFloat && s.is_contiguous(), op, ": ",
              what, " must be a contiguous float32 CPU tensor");
  if (it.offsets == nullptr)
    TORCH_CHECK(s.numel() == it.n, op, ": dense ", what, " has ", s.numel(), " entries, param ", it.n);
  return s.data_ptr<float>();
}

std::vector<Task> make_tasks(const std::vector<Item>& items) {
  std::vector<Task> tasks;
  for (int i = 0; i < static_cast<int>(items.size()); ++i) {
    const int64_t words = (items[i].n + 31) / 32;
    for (int64_t w = 0; w < words; w += kBlockWords)
      tasks.push_back({i, w, std::min(words, w + kBlockWords)});
  }
  return tasks;
}

// Counts NaN/Inf gradients in trainable entries per item (read-only pass).
torch::Tensor count_bad(const std::vector<Item>& items, const std::vector<Task>& tasks) {
  std::vector<int64_t> per_task(tasks.size(), 0);
  const bool avx = have_avx512();
  const int64_t nt = static_cast<int64_t>(tasks.size());
#pragma omp parallel for schedule(static) if (nt > 1)
  for (int64_t t = 0; t < nt; ++t) {
    const Task& task = tasks[t];
    const Item& it = items[task.item];
    if (avx) {
      with_kind(it.kind, [&](auto kc) {
        per_task[t] = count_bad_avx512<decltype(kc)::value>(it, task.w0, task.w1);
      });
    } else {
      per_task[t] = count_bad_scalar(it, task.w0, task.w1);
    }
  }
  torch::Tensor bad = torch::zeros({static_cast<int64_t>(items.size())}, torch::kInt64);
  int64_t* b = bad.data_ptr<int64_t>();
  for (int64_t t = 0; t < nt; ++t) b[tasks[t].item] += per_task[t];
  return bad;
}

inline bool block_all_trainable(const Item& it, int64_t w0, int64_t w1) {
  if (it.mask == nullptr) return true;
  const int64_t full = std::min(w1, it.n / 32);  // words whose 32 entries all exist
  for (int64_t w = w0; w < full; ++w)
    if (it.mask[w] != 0xFFFFFFFFu) return false;
  return full == w1 || word_at(it, w1 - 1) == ((1u << (it.n % 32)) - 1u);
}

// The update: `math(k, pbuf, gbuf, s1, s2, item)` runs phase B on one block's k entries and
// returns how many of them it skipped for a NaN/Inf gradient (always 0 unless `skip`); a block
// with such entries is written back only where the gradient is finite. Returns the per-item
// skipped counts.
template <typename Math>
std::vector<int64_t> run_blocks(const std::vector<Item>& items, const std::vector<Task>& tasks,
                                bool need_s1, bool need_s2, bool skip, Math math) {
  const bool avx = have_avx512();
  const int64_t nt = static_cast<int64_t>(tasks.size());
  std::vector<int64_t> per_task(skip ? nt : 0, 0);
#pragma omp parallel if (nt > 1)
  {
    constexpr int64_t kStride = kSubWords * 32 + 16;  // + slack for full-vector stores/loads
    std::vector<float> buf(4 * kStride);
    float* pb = buf.data();
    float* gb = pb + kStride;
    float* s1b = gb + kStride;
    float* s2b = s1b + kStride;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < nt; ++t) {
      const Item& it = items[tasks[t].item];
      const int64_t w0 = tasks[t].w0, w1 = tasks[t].w1;
      if (it.kind == Kind::F32 && block_all_trainable(it, w0, w1)) {
        // Every entry of the block trains (no mask, or all-ones words): update in place, no
        // gather. Compact state is then contiguous and 1:1 too, from the block's prefix sum.
        const int64_t e0 = w0 * 32, e1 = std::min(it.n, w1 * 32);
        const int64_t s0 = it.offsets != nullptr ? it.offsets[w0] : e0;
        const int64_t b = math(e1 - e0, static_cast<float*>(it.param) + e0,
                               static_cast<const float*>(it.grad) + e0,
                               need_s1 ? it.s1 + s0 : nullptr, need_s2 ? it.s2 + s0 : nullptr, it);
        if (skip) per_task[t] = b;
        continue;
      }
      // Sub-blocks of kSubWords words; `finish` runs phases B and C of one gathered sub-block [a, e) with k entries.
      auto finish = [&](int64_t a, int64_t e, float* pbx, float* gbx, int64_t k) {
        if (k == 0) return;
        auto gather = [&](const void* src, float* dst) {
          if (!avx) return gather_scalar(it, src, true, a, e, dst);
          return gather1_avx512<Kind::F32>(it, src, a, e, dst);
        };
        auto scatter = [&](void* dst, bool f32, const float* src) {
          if (!avx) scatter_scalar(it, dst, f32, a, e, src);
          else if (f32) scatter_avx512<Kind::F32>(it, dst, a, e, src);
          else with_kind(it.kind, [&](auto kc) { scatter_avx512<decltype(kc)::value>(it, dst, a, e, src); });
        };
        float* s1 = nullptr;
        float* s2 = nullptr;
        if (it.offsets != nullptr) {  // compact: this sub-block's state is contiguous
          const int64_t off = it.offsets[a];
          s1 = need_s1 ? it.s1 + off : nullptr;
          s2 = need_s2 ? it.s2 + off : nullptr;
        } else {
          if (need_s1) { gather(it.s1, s1b); s1 = s1b; }
          if (need_s2) { gather(it.s2, s2b); s2 = s2b; }
        }
        const int64_t bad = math(k, pbx, gbx, s1, s2, it);
        if (bad != 0) {  // skip mode only: write back the entries with a finite gradient
          per_task[t] += bad;
          scatter_finite(it, it.param, false, a, e, pbx);
          if (it.offsets == nullptr) {
            if (need_s1) scatter_finite(it, it.s1, true, a, e, s1b);
            if (need_s2) scatter_finite(it, it.s2, true, a, e, s2b);
          }
          return;
        }
        scatter(it.param, false, pbx);
        if (it.offsets == nullptr) {
          if (need_s1) scatter(it.s1, true, s1b);
          if (need_s2) scatter(it.s2, true, s2b);
        }
      };
      for (int64_t a = w0; a < w1; a += kSubWords) {
        const int64_t e = std::min(w1, a + kSubWords);
        int64_t k = 0;
        if (avx) {
          with_kind(it.kind, [&](auto kc) { k = gather_pg_avx512<decltype(kc)::value>(it, a, e, pb, gb); });
        } else {
          k = gather_scalar(it, it.param, false, a, e, pb);
          gather_scalar(it, it.grad, false, a, e, gb);
        }
        finish(a, e, pb, gb, k);
      }
    }
  }
  std::vector<int64_t> per_item(items.size(), 0);
  for (int64_t t = 0; t < static_cast<int64_t>(per_task.size()); ++t) per_item[tasks[t].item] += per_task[t];
  return per_item;
}

}  // namespace

torch::Tensor masked_adamw_cpu(const std::vector<torch::Tensor>& params,
                               const std::vector<torch::Tensor>& grads,
                               const std::vector<torch::Tensor>& exp_avgs,
                               const std::vector<torch::Tensor>& exp_avg_sqs,
                               const std::vector<torch::Tensor>& masks,
                               const std::vector<torch::Tensor>& offsets,
                               const std::vector<double>& steps, double lr, double beta1,
                               double beta2, double eps, double weight_decay, bool maximize,
                               bool skip_nonfinite) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  masks.size() == n && offsets.size() == n && steps.size() == n,
              "masked_adamw_cpu: argument lists differ in length");
  std::vector<Item> items;
  items.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    Item it = make_item(params[i], grads[i], masks[i], offsets[i], "masked_adamw_cpu");
    it.s1 = state_ptr(exp_avgs[i], it, "masked_adamw_cpu", "exp_avg");
    it.s2 = state_ptr(exp_avg_sqs[i], it, "masked_adamw_cpu", "exp_avg_sq");
    TORCH_CHECK(exp_avgs[i].numel() == exp_avg_sqs[i].numel(), "masked_adamw_cpu: state sizes differ");
    // Bias corrections in double, then the fp32 scalars the math uses (as torch's fused AdamW).
    const double bc1 = 1.0 - std::pow(beta1, steps[i]);
    const double bc2 = 1.0 - std::pow(beta2, steps[i]);
    it.step_size = static_cast<float>(lr / bc1);
    it.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
    items.push_back(it);
  }
  const std::vector<Task> tasks = make_tasks(items);
  if (!skip_nonfinite) {  // atomic: a read-only pass first; any NaN/Inf and nothing is written
    torch::Tensor bad = count_bad(items, tasks);
    const int64_t* b = bad.data_ptr<int64_t>();
    for (size_t i = 0; i < n; ++i)
      if (b[i]) return bad;
  }

  AdamScalars s{static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(1.0 - beta1),
                static_cast<float>(beta2), static_cast<float>(1.0 - beta2), static_cast<float>(eps),
                maximize};
  const bool avx = have_avx512();
  // Skip mode is one pass: NaN/Inf entries are left as they are and counted.
  const std::vector<int64_t> skipped = run_blocks(
      items, tasks, true, true, skip_nonfinite,
      [&](int64_t k, float* p, const float* g, float* m, float* v, const Item& it) -> int64_t {
        if (skip_nonfinite) {
          if (avx) return adam_math_avx512<true>(k, p, g, m, v, s, it.step_size, it.bc2_sqrt);
          return adam_math_skip_scalar(k, p, g, m, v, s, it.step_size, it.bc2_sqrt);
        }
        if (avx) adam_math_avx512<false>(k, p, g, m, v, s, it.step_size, it.bc2_sqrt);
        else adam_math_generic(k, p, g, m, v, s, it.step_size, it.bc2_sqrt);
        return 0;
      });
  torch::Tensor bad = torch::zeros({static_cast<int64_t>(n)}, torch::kInt64);
  std::copy(skipped.begin(), skipped.end(), bad.data_ptr<int64_t>());
  return bad;
}

torch::Tensor count_nonfinite_cpu(const std::vector<torch::Tensor>& grads,
                                  const std::vector<torch::Tensor>& masks) {
  TORCH_CHECK(masks.size() == grads.size(), "count_nonfinite_cpu: argument lists differ in length");
  std::vector<Item> items;
  items.reserve(grads.size());
  const torch::Tensor none;
  for (size_t i = 0; i < grads.size(); ++i)  // the read-only pass reads only grad and mask
    items.push_back(make_item(grads[i], grads[i], masks[i], none, "count_nonfinite_cpu"));
  return count_bad(items, make_tasks(items));
}

torch::Tensor masked_sgd_cpu(const std::vector<torch::Tensor>& params,
                             const std::vector<torch::Tensor>& grads,
                             const std::vector<torch::Tensor>& bufs,
                             const std::vector<torch::Tensor>& masks,
                             const std::vector<torch::Tensor>& offsets, const std::vector<bool>& first,
                             double lr, double momentum, double dampening, double weight_decay,
                             bool nesterov, bool maximize) {
  const size_t n = params.size();
  const bool has_momentum = momentum != 0.0;
  TORCH_CHECK(grads.size() == n && masks.size() == n && offsets.size() == n && first.size() == n &&
                  (bufs.size() == n || (!has_momentum && bufs.empty())),
              "masked_sgd_cpu: argument lists differ in length");
  std::vector<Item> items;
  items.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    Item it = make_item(params[i], grads[i], masks[i], offsets[i], "masked_sgd_cpu");
    if (has_momentum) it.s1 = state_ptr(bufs[i], it, "masked_sgd_cpu", "momentum_buffer");
    it.first = first[i];
    items.push_back(it);
  }
  const std::vector<Task> tasks = make_tasks(items);
  torch::Tensor bad = count_bad(items, tasks);
  const int64_t* b = bad.data_ptr<int64_t>();
  for (size_t i = 0; i < n; ++i)
    if (b[i]) return bad;

  SgdScalars s{static_cast<float>(lr), static_cast<float>(momentum),
               static_cast<float>(1.0 - dampening), static_cast<float>(weight_decay), nesterov,
               maximize, has_momentum};
  const bool avx = have_avx512();
  run_blocks(items, tasks, has_momentum, false, false,
             [&](int64_t k, float* p, const float* g, float* buf, float*, const Item& it) -> int64_t {
               if (avx) sgd_math_avx512(k, p, g, buf, s, it.first);
               else sgd_math_generic(k, p, g, buf, s, it.first);
               return 0;
             });
  return bad;
}

}  // namespace dowser
