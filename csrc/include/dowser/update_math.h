// The per-entry AdamW and SGD update math, written once for every CPU instruction-set path
// (csrc/cpu/kernels_impl.h, auto-vectorised per ISA) and the CUDA kernels
// (csrc/cuda/masked_adamw.cu). The plain-PyTorch reference (dowser/reference.py) stays the
// independent oracle that all of them must match bit for bit.
//
// Every operation is one correctly rounded fp32 op: on the host the build pins
// -ffp-contract=off (build_config.py) so `a*b + c` is never fused into an FMA; on the device the
// explicitly rounded intrinsics (__fmul_rn, ...) cannot be contracted by nvcc either.
// Self-contained (no torch, no std headers): plain g++, the per-ISA kernel units and nvcc all
// include it.
#pragma once

#if defined(__CUDACC__)
#define DOWSER_HD __host__ __device__ __forceinline__
#else
#define DOWSER_HD inline __attribute__((always_inline))
#endif

namespace dowser {
namespace math {

DOWSER_HD float mul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
DOWSER_HD float add(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
DOWSER_HD float sub(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
DOWSER_HD float div(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
// IEEE square root (the kernels are built with -fno-math-errno so it stays one instruction and
// vectorises).
DOWSER_HD float sqrt_rn(float a) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);
#endif
}

// The bits of an fp32 value.
DOWSER_HD unsigned int float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  unsigned int u;
  __builtin_memcpy(&u, &x, 4);
  return u;
#endif
}

// Bitwise NaN/Inf test (exponent all ones): exact under any fast-math flag and vectorisable.
DOWSER_HD bool nonfinite(float x) { return (float_bits(x) & 0x7F800000u) == 0x7F800000u; }

// fp32 -> bf16 bits, round to nearest even as c10::BFloat16 does (NaN stays a quiet NaN).
DOWSER_HD unsigned short bf16_bits(float x) {
  const unsigned int u = float_bits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return static_cast<unsigned short>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Scalars of one AdamW step, in fp32 as the math uses them (bias corrections per tensor are
// computed in double by the caller, then rounded once, as torch's fused AdamW does).
struct AdamScalars {
  float decay;            // 1 - lr * weight_decay
  float w1;               // 1 - beta1
  float beta2, one_minus_beta2, eps;
  float step_size;        // lr / (1 - beta1^t)
  float bc2_sqrt;         // sqrt(1 - beta2^t)
};

struct SgdScalars {
  float lr, momentum, one_minus_dampening, wd;
  bool nesterov, has_momentum;
};

// One AdamW entry in PyTorch's fused order: p *= 1 - lr*wd; m = lerp(m, g, 1 - b1);
// v = b2*v + (1 - b2)*g*g; denom = sqrt(v)/sqrt(bc2) + eps; p -= (lr/bc1) * m / denom.
// `g` is already negated when maximizing. p, m, v are updated in place.
DOWSER_HD void adamw_entry(float g, float& p, float& m, float& v, const AdamScalars& s) {
  const float pt = mul(p, s.decay);
  const float mt = add(m, mul(s.w1, sub(g, m)));
  const float vt = add(mul(s.beta2, v), mul(s.one_minus_beta2, mul(g, g)));
  const float denom = add(div(sqrt_rn(vt), s.bc2_sqrt), s.eps);
  m = mt;
  v = vt;
  p = sub(pt, div(mul(s.step_size, mt), denom));
}

// One SGD entry (torch.optim.SGD's order). `g` already negated when maximizing; `b` is the
// momentum buffer entry (ignored without momentum); `first`: the buffer is fresh and becomes d.
DOWSER_HD void sgd_entry(float g, float& p, float& b, const SgdScalars& s, bool first) {
  float d = g;
  if (s.wd != 0.0f) d = add(d, mul(s.wd, p));
  if (s.has_momentum) {
    const float bt = first ? d : add(mul(s.momentum, b), mul(s.one_minus_dampening, d));
    b = bt;
    d = s.nesterov ? add(d, mul(s.momentum, bt)) : bt;
  }
  p = sub(p, mul(s.lr, d));
}

}  // namespace math
}  // namespace dowser
