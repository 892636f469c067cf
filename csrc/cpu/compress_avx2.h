// AVX2 compress/expand of the trainable entries of full mask words (included by kernels_impl.h
// inside the avx2 unit's namespace): 8 lanes at a time through lookup-table permutes
// (vpermps), since AVX2 has no compress instruction. fp32 stores are masked (vmaskmovps);
// 16-bit stores, which AVX2 cannot mask, go entry by entry over the set bits, so a frozen entry
// is never written.
namespace isa {

// For each 8-bit mask: the lanes of its set bits in order (compress) and, for each lane, how
// many set bits precede it (expand), as 4-bit fields.
struct Luts {
  uint32_t compress[256], expand[256];
  constexpr Luts() : compress(), expand() {
    for (int m = 0; m < 256; ++m) {
      uint32_t c = 0, x = 0;
      int n = 0;
      for (int l = 0; l < 8; ++l) {
        x |= static_cast<uint32_t>(n) << (4 * l);
        if (m >> l & 1) c |= static_cast<uint32_t>(l) << (4 * n++);
      }
      compress[m] = c;
      expand[m] = x;
    }
  }
};
constexpr Luts kLuts{};

inline __m256i lut_index(uint32_t fields) {
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(fields)),
                                            _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                          _mm256_set1_epi32(7));
}

template <int K>
inline __m256 ld8(const void* base, int64_t i) {
  if constexpr (K == kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  } else {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
    if constexpr (K == kF16) return _mm256_cvtph_ps(x);
    else return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
  }
}

// 8 floats -> 8 x 16 bits (RNE; bf16 NaN -> 0x7FC0 as c10::BFloat16).
template <int K>
inline __m128i to16(__m256 x) {
  if constexpr (K == kF16) {
    return _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                          _mm256_set1_epi32(0x7FFF));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    return _mm256_castsi256_si128(packed);
  }
}

template <int K>
int64_t gather_pg(const Item& it, const void* param, int64_t a, int64_t e, float* pb, float* gb) {
  const Src src(it);
  int64_t j = 0;
  const bool pf = prefetch_on();
  for (int64_t w = a; w < e; ++w) {
    const uint32_t word = src.word(w);
    const int64_t i = w * 32;
    if (pf) {
      if (param) prefetch_at<K>(param, i);
      prefetch_at<K>(src.grad, i);
    }
    if (!word) continue;
    for (int q = 0; q < 4; ++q) {  // no test for an empty group: that branch mispredicts often
      const uint32_t m = (word >> (8 * q)) & 0xFFu;
      const __m256i idx = lut_index(kLuts.compress[m]);
      if (param) _mm256_storeu_ps(pb + j, _mm256_permutevar8x32_ps(ld8<K>(param, i + 8 * q), idx));
      _mm256_storeu_ps(gb + j, _mm256_permutevar8x32_ps(ld8<K>(src.grad, i + 8 * q), idx));
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
    if (!word) continue;
    for (int q = 0; q < 4; ++q) {
      const uint32_t m = (word >> (8 * q)) & 0xFFu;
      _mm256_storeu_ps(buf + j, _mm256_permutevar8x32_ps(_mm256_loadu_ps(src + w * 32 + 8 * q),
                                                         lut_index(kLuts.compress[m])));
      j += __builtin_popcount(m);
    }
  }
  return j;
}

template <int K>
int64_t scatter(const Item& it, void* dst, int64_t a, int64_t e, const float* buf) {
  const Src words(it);
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  int64_t j = 0;
  for (int64_t w = a; w < e; ++w) {
    const uint32_t word = words.word(w);
    if (!word) continue;
    for (int q = 0; q < 4; ++q) {
      uint32_t m = (word >> (8 * q)) & 0xFFu;
      const int64_t i = w * 32 + 8 * q;
      const __m256 x = _mm256_permutevar8x32_ps(_mm256_loadu_ps(buf + j), lut_index(kLuts.expand[m]));
      j += __builtin_popcount(m);
      if constexpr (K == kF32) {
        const __m256i lanes = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(m)), bit), bit);
        _mm256_maskstore_ps(static_cast<float*>(dst) + i, lanes, x);
      } else {
        alignas(16) uint16_t h[8];
        _mm_store_si128(reinterpret_cast<__m128i*>(h), to16<K>(x));
        uint16_t* d = static_cast<uint16_t*>(dst) + i;
        for (; m; m &= m - 1) {
          const int l = __builtin_ctz(m);
          d[l] = h[l];
        }
      }
    }
  }
  return j;
}

}  // namespace isa
