// AVX2 path (x86-64 only): the same kernels for AVX2 + F16C (no FMA: nothing may be contracted
// anyway, see build_config.py), with lookup-table compress/expand. The target pragma is this
// unit's -mavx2 -mf16c ...; it must come before any header.
#if defined(__x86_64__)
#pragma GCC target("avx2,f16c,bmi,bmi2,popcnt,lzcnt")
#include <immintrin.h>
#define DOWSER_CAP cap_avx2
#define DOWSER_CAP_NAME "avx2"
#define DOWSER_CAP_TABLE kernels_avx2
#define DOWSER_ISA_COMPRESS "compress_avx2.h"
#include "../kernels_impl.h"
#endif
