// Run-time choice of the CPU kernel table (csrc/cpu/kernels.h): DOWSER_CPU_CAPABILITY
// (default|avx2|avx512|neon) when set, else the best path this CPU supports.
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace dowser {
namespace cpu {
namespace {

struct Cap {
  const char* name;
  const Kernels* table;
  bool supported;
};

#if defined(__x86_64__)
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
         __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
}
bool cpu_has_avx512() {
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
#endif

// Worst to best.
const Cap* caps(int* count) {
  static const Cap list[] = {
      {"default", &kernels_default, true},
#if defined(__x86_64__)
      {"avx2", &kernels_avx2, cpu_has_avx2()},
      // DOWSER_NO_AVX512=1 (older name) keeps the AVX-512 path out of the automatic choice.
      {"avx512", &kernels_avx512, cpu_has_avx512()},
#endif
#if defined(__aarch64__)
      {"neon", &kernels_neon, true},
#endif
  };
  *count = static_cast<int>(sizeof(list) / sizeof(list[0]));
  return list;
}

const Cap& best() {
  static const Cap* b = [] {
    int n;
    const Cap* list = caps(&n);
    const Cap* pick = &list[0];
    const bool no512 = std::getenv("DOWSER_NO_AVX512") != nullptr;
    for (int i = 0; i < n; ++i)
      if (list[i].supported && !(no512 && std::strcmp(list[i].name, "avx512") == 0)) pick = &list[i];
    return pick;
  }();
  return *b;
}

}  // namespace

const Kernels& kernels() {
  const char* env = std::getenv("DOWSER_CPU_CAPABILITY");
  if (env == nullptr || env[0] == '\0') return *best().table;
  int n;
  const Cap* list = caps(&n);
  for (int i = 0; i < n; ++i) {
    if (std::strcmp(list[i].name, env) != 0) continue;
    if (!list[i].supported)
      throw std::runtime_error(std::string("DOWSER_CPU_CAPABILITY=") + env +
                               ": this CPU does not support it (supported: " + supported_capabilities() + ")");
    return *list[i].table;
  }
  throw std::runtime_error(std::string("DOWSER_CPU_CAPABILITY=") + env +
                           ": unknown (this build has: default" +
#if defined(__x86_64__)
                           ", avx2, avx512" +
#endif
#if defined(__aarch64__)
                           ", neon" +
#endif
                           "; this CPU supports: " + supported_capabilities() + ")");
}

const char* best_capability() { return best().name; }

const char* supported_capabilities() {
  static const std::string s = [] {
    int n;
    const Cap* list = caps(&n);
    std::string out;
    for (int i = 0; i < n; ++i)
      if (list[i].supported) out += (out.empty() ? "" : ",") + std::string(list[i].name);
    return out;
  }();
  return s.c_str();
}

}  // namespace cpu
}  // namespace dowser
