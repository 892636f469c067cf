// NEON path (aarch64 only; NEON is part of its base ISA): the same kernels with table-lookup
// compress.
#if defined(__aarch64__)
#include <arm_neon.h>
#define DOWSER_CAP cap_neon
#define DOWSER_CAP_NAME "neon"
#define DOWSER_CAP_TABLE kernels_neon
#define DOWSER_ISA_COMPRESS "compress_neon.h"
#include "../kernels_impl.h"
#endif
