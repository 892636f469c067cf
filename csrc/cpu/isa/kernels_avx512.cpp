// AVX-512 path (x86-64 only): the same kernels for AVX-512 F/BW/VL/DQ (no FMA contraction, see
// build_config.py), with in-register compress/expand. The target pragma is this unit's
// -mavx512f ... ; it must come before any header.
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c,bmi,bmi2,popcnt,lzcnt")
#include <immintrin.h>
#define DOWSER_CAP cap_avx512
#define DOWSER_CAP_NAME "avx512"
#define DOWSER_CAP_TABLE kernels_avx512
#define DOWSER_ISA_COMPRESS "compress_avx512.h"
#include "../kernels_impl.h"
#endif
