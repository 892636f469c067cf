// Whether dowser._C's CUDA code can run on a device: the build embeds SASS for some
// architectures and PTX for others (dowser/_build_config.py: CUDA_ARCH_FLAGS); on a GPU none of
// them fits (sm_70/75 for sm_80/90 SASS + compute_90 PTX) every launch would fail with "no
// kernel image is available". Every .cu file is compiled with the same flags, so an image of
// this probe kernel exists exactly when the op kernels' do. dowser/_registry.py asks once per
// device and falls back to another backend when the answer is not empty.
#include <cuda_runtime.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <string>

namespace dowser {
namespace {

__global__ void image_probe_kernel() {}

}  // namespace

// "" when the device can run this build's kernels, else the CUDA runtime's reason.
std::string cuda_kernel_image(int64_t device) {
  int previous = 0;
  cudaError_t err = cudaGetDevice(&previous);
  if (err == cudaSuccess) err = cudaSetDevice(static_cast<int>(device));
  cudaFuncAttributes attr;
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, image_probe_kernel);
  cudaSetDevice(previous);
  if (err == cudaSuccess) return "";
  cudaGetLastError();  // clear the (non-sticky) error so no later check reports it
  return cudaGetErrorString(err);
}

}  // namespace dowser

TORCH_LIBRARY_FRAGMENT(dowser_C, m) {
  m.def("cuda_kernel_image(int device) -> str", &dowser::cuda_kernel_image);
}
