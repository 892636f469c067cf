// DEFAULT path: the portable kernels at the architecture's baseline (x86-64: SSE2; aarch64:
// the base ISA), no ISA-specific compress/expand.
#define DOWSER_CAP cap_default
#define DOWSER_CAP_NAME "default"
#define DOWSER_CAP_TABLE kernels_default
#include "../kernels_impl.h"
