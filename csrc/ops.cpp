// pybind11 bindings of dowser._C. Python (dowser/_registry.py) declares the torch.library ops
// and routes each device to these functions, so this file only exposes them.
#include <omp.h>

#include "cpu/kernels.h"
#include "dowser.h"
// Generated at build time (dowser/_build_config.py write_stamp_header): DOWSER_BUILD_STAMP
// names the dowser version and the sources this extension was built from; dowser/_ext.py
// refuses an extension whose stamp is not the one the Python layer expects. A compile outside
// setup.py / the JIT (e.g. .ci/check_aarch64.sh) has none: "unstamped", never accepted.
#if __has_include("dowser_stamp.h")
#include "dowser_stamp.h"
#endif
#ifndef DOWSER_BUILD_STAMP
#define DOWSER_BUILD_STAMP unstamped
#endif
#define DOWSER_STR_(x) #x
#define DOWSER_STR(x) DOWSER_STR_(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dowser C++ ops (CPU/OpenMP, and CUDA when built with it)";
#ifdef DOWSER_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("build_stamp") = DOWSER_STR(DOWSER_BUILD_STAMP);
  m.def("omp_max_threads", []() { return omp_get_max_threads(); });
  // issue 13: instruction-set dispatch of the CPU kernels
  m.def("cpu_capability", []() { return std::string(dowser::cpu_capability()); },
        "the CPU kernels' instruction-set path now (DOWSER_CPU_CAPABILITY or the best supported)");
  m.def("cpu_capabilities", []() { return std::string(dowser::cpu::supported_capabilities()); },
        "the instruction-set paths this CPU runs, comma separated, best last");
  m.def("pack_mask_cpu", &dowser::pack_mask_cpu, "pack a bool mask into int32 words", py::arg("mask"));
  m.def("unpack_mask_cpu", &dowser::unpack_mask_cpu, "unpack int32 words into a flat bool mask",
        py::arg("packed"), py::arg("numel"));
  // issue 4: scores and exact bottom-k masks
  m.def("scores_cpu", &dowser::scores_cpu, "materialised scores |W| * (P A)", py::arg("weight"),
        py::arg("p"), py::arg("a"));
  m.def("select_masks_cpu", &dowser::select_masks_cpu,
        "packed masks of the k lowest scores over all layers, and [T key, below, ties]",
        py::arg("weights"), py::arg("ps"), py::arg("as"), py::arg("k"));

  // masked optimizer steps (issue 5)
  m.def("masked_adamw_cpu", &dowser::masked_adamw_cpu, "masked AdamW step on packed masks (CPU)");
  m.def("masked_sgd_cpu", &dowser::masked_sgd_cpu, "masked SGD step on packed masks (CPU)");
  m.def("count_nonfinite_cpu", &dowser::count_nonfinite_cpu,
        "per-tensor NaN/Inf counts of trainable gradients (CPU)", py::arg("grads"), py::arg("masks"));
#ifdef DOWSER_WITH_CUDA
  m.def("masked_adamw_cuda", &dowser::masked_adamw_cuda, "masked AdamW step on packed masks (CUDA)");
  m.def("masked_sgd_cuda", &dowser::masked_sgd_cuda, "masked SGD step on packed masks (CUDA)");
#endif
}
