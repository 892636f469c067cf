// NEON compress of the trainable entries of full mask words (included by kernels_impl.h inside
// the neon unit's namespace; <arm_neon.h> comes from the unit): 4 lanes at a time through a
// byte-shuffle lookup table (tbl). Expand stays portable (stores entry by entry over the set
// bits: NEON has no masked store, and a frozen entry must never be written).
namespace isa {

struct Luts {
  uint8_t compress[16][16];
  constexpr Luts() : compress() {
    for (int m = 0; m < 16; ++m) {
      int n = 0;
      for (int l = 0; l < 4; ++l)
        if (m >> l & 1) {
          for (int b = 0; b < 4; ++b) compress[m][4 * n + b] = static_cast<uint8_t>(4 * l + b);
          ++n;
        }
      for (; n < 4; ++n)
        for (int b = 0; b < 4; ++b) compress[m][4 * n + b] = 0xFF;  // tbl: out of range -> 0
    }
  }
};
constexpr Luts kLuts{};

template <int K>
inline float32x4_t ld4(const void* base, int64_t i) {
  if constexpr (K == kF32) {
    return vld1q_f32(static_cast<const float*>(base) + i);
  } else if constexpr (K == kBF16) {
    return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(static_cast<const uint16_t*>(base) + i), 16));
  } else {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(static_cast<const uint16_t*>(base) + i)));
  }
}

inline float32x4_t compress4(float32x4_t x, uint32_t m) {
  return vreinterpretq_f32_u8(vqtbl1q_u8(vreinterpretq_u8_f32(x), vld1q_u8(kLuts.compress[m])));
}

template <int K>
int64_t gather_pg(const Item& it, const void* param, int64_t a, int64_t e, float* pb, float* gb) {
  const Src src(it);
  int64_t j = 0;
  for (int64_t w = a; w < e; ++w) {
    const uint32_t word = src.word(w);
    for (int q = 0; q < 8 && word; ++q) {
      const uint32_t m = (word >> (4 * q)) & 0xFu;
      if (!m) continue;
      const int64_t i = w * 32 + 4 * q;
      if (param) vst1q_f32(pb + j, compress4(ld4<K>(param, i), m));
      vst1q_f32(gb + j, compress4(ld4<K>(src.grad, i), m));
      j += __builtin_popcount(m);
    }
  }
  return j;
}

inline int64_t gather_f32(const Item& it, const float* src, int64_t a, int64_t e, float* buf) {
  const Src words(it);
  int64_t j = 0;
  for (int64_t w = a; w < e; ++w) {
    const uint32_t word = words.word(w);
    for (int q = 0; q < 8 && word; ++q) {
      const uint32_t m = (word >> (4 * q)) & 0xFu;
      if (!m) continue;
      vst1q_f32(buf + j, compress4(vld1q_f32(src + w * 32 + 4 * q), m));
      j += __builtin_popcount(m);
    }
  }
  return j;
}

using portable::scatter;

}  // namespace isa
