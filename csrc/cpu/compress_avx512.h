// AVX-512 compress/expand of the trainable entries of full mask words (included by
// kernels_impl.h inside the avx512 unit's namespace; <immintrin.h> comes from the unit).
// A compress in a register plus a full store is much faster than a compressing store to memory
// (microcoded); buffers have 16 floats of slack. Masked stores never touch a frozen entry.
namespace isa {

template <int K>
inline __m512 ld16(const void* base, int64_t i) {
  if constexpr (K == kF32) {
    return _mm512_loadu_ps(static_cast<const float*>(base) + i);
  } else {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i));
    if constexpr (K == kF16) return _mm512_cvtph_ps(x);
    else return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
  }
}

template <int K>
inline void st16(void* base, int64_t i, __mmask16 k, __m512 x) {
  if constexpr (K == kF32) {
    _mm512_mask_storeu_ps(static_cast<float*>(base) + i, k, x);
  } else if constexpr (K == kF16) {
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(base) + i, k,
                             _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    // Round to nearest even as c10::BFloat16 does; NaN becomes 0x7FC0 as there.
    const __m512i u = _mm512_castps_si512(x);
    const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                          _mm512_set1_epi32(0x7FFF));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(base) + i, k, _mm512_cvtepi32_epi16(r));
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
    const __mmask16 k0 = static_cast<__mmask16>(word), k1 = static_cast<__mmask16>(word >> 16);
    const int c0 = __builtin_popcount(k0);
    if (param) {
      _mm512_storeu_ps(pb + j, _mm512_maskz_compress_ps(k0, ld16<K>(param, i)));
      _mm512_storeu_ps(pb + j + c0, _mm512_maskz_compress_ps(k1, ld16<K>(param, i + 16)));
    }
    _mm512_storeu_ps(gb + j, _mm512_maskz_compress_ps(k0, ld16<K>(src.grad, i)));
    _mm512_storeu_ps(gb + j + c0, _mm512_maskz_compress_ps(k1, ld16<K>(src.grad, i + 16)));
    j += c0 + __builtin_popcount(k1);
  }
  return j;
}

inline int64_t gather_f32(const Item& it, const float* src, int64_t a, int64_t e, float* buf) {
  const Src words(it);
  int64_t j = 0;
  for (int64_t w = a; w < e; ++w) {
    const uint32_t word = words.word(w);
    if (!word) continue;
    const int64_t i = w * 32;
    const __mmask16 k0 = static_cast<__mmask16>(word), k1 = static_cast<__mmask16>(word >> 16);
    const int c0 = __builtin_popcount(k0);
    _mm512_storeu_ps(buf + j, _mm512_maskz_compress_ps(k0, _mm512_loadu_ps(src + i)));
    _mm512_storeu_ps(buf + j + c0, _mm512_maskz_compress_ps(k1, _mm512_loadu_ps(src + i + 16)));
    j += c0 + __builtin_popcount(k1);
  }
  return j;
}

template <int K>
int64_t scatter(const Item& it, void* dst, int64_t a, int64_t e, const float* buf) {
  const Src words(it);
  int64_t j = 0;
  for (int64_t w = a; w < e; ++w) {
    const uint32_t word = words.word(w);
    if (!word) continue;
    const int64_t i = w * 32;
    const __mmask16 k0 = static_cast<__mmask16>(word), k1 = static_cast<__mmask16>(word >> 16);
    const int c0 = __builtin_popcount(k0);
    st16<K>(dst, i, k0, _mm512_maskz_expand_ps(k0, _mm512_loadu_ps(buf + j)));
    st16<K>(dst, i + 16, k1, _mm512_maskz_expand_ps(k1, _mm512_loadu_ps(buf + j + c0)));
    j += c0 + __builtin_popcount(k1);
  }
  return j;
}

}  // namespace isa
