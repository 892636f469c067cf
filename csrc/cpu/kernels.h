// The CPU kernel table: one per instruction set (csrc/cpu/isa/kernels_<cap>.cpp, each the same
// source, kernels_impl.h, compiled for its ISA), chosen at run time by dispatch.cpp.
//
// Torch-free on purpose: the per-ISA units must not instantiate inline functions of shared
// headers (torch, the C++ standard library) with wider instructions than the baseline, or the
// linker could keep that copy for every caller (one definition rule). Only C headers and
// always-inline intrinsics are included there.
#pragma once
#include <stdint.h>

#include "dowser/update_math.h"

namespace dowser {
namespace cpu {

enum Kind : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

// One tensor of a masked optimizer step (layout: DESIGN.md §2).
struct Item {
  void* param;
  const void* grad;
  float* s1;      // exp_avg / momentum buffer (null: SGD without momentum)
  float* s2;      // exp_avg_sq (AdamW only)
  float* master;  // fp32 master weights laid out like the state (null: none)
  const uint32_t* mask;    // null: every entry trains
  const int32_t* offsets;  // null: state (and master) dense, shaped like the parameter
  int64_t n;
  int32_t kind;
  float step_size, bc2_sqrt;  // AdamW per-tensor bias corrections
  bool first;                 // SGD: fresh momentum buffer
};

// A run of mask words [w0, w1) of items[item].
struct Task {
  int32_t item;
  int64_t w0, w1;
};

// Score tiles of select.cpp: factors of one matrix.
struct ScoreArgs {
  const float* p;  // (rows, B) row factors
  const float* a;  // (B, cols_pad) column factors, zero padded
  int64_t B, cols_pad;
};

struct Kernels {
  const char* name;  // "default", "avx2", "avx512", "neon"
  // NaN/Inf gradients in trainable entries, per task.
  void (*count_bad)(const Item* items, const Task* tasks, int64_t ntasks, int64_t* per_task);
  // The masked steps; per_task receives skipped NaN/Inf counts (skip mode only, else untouched).
  void (*adamw)(const Item* items, const Task* tasks, int64_t ntasks, const math::AdamScalars& s,
                bool maximize, bool skip, int64_t* per_task);
  void (*sgd)(const Item* items, const Task* tasks, int64_t ntasks, const math::SgdScalars& s,
              bool maximize);
  void (*pack)(const bool* src, int64_t n, uint32_t* dst);
  void (*unpack)(const uint32_t* src, int64_t n, bool* dst);
  // Scores of nr rows from i0, columns [j0, j0 + jb) (jb a multiple of 8) into s[r * ld + j].
  void (*score_tile)(const ScoreArgs& L, int64_t i0, int nr, int64_t j0, int64_t jb,
                     const float* absw, float* s, int64_t ld);
  // One full word of 32 scores: bits of key < lo; *in_window: bits of keys in [lo, hi].
  uint32_t (*word_below)(const float* s, uint32_t lo, uint32_t hi, uint32_t* in_window);
};

extern const Kernels kernels_default;
#if defined(__x86_64__)
extern const Kernels kernels_avx2;
extern const Kernels kernels_avx512;
#endif
#if defined(__aarch64__)
extern const Kernels kernels_neon;
#endif

// The table for this process: DOWSER_CPU_CAPABILITY (default|avx2|avx512|neon) if set (read on
// every call, so tests can switch paths), else the best the CPU supports. Throws
// std::runtime_error naming the problem for an unknown or unsupported value.
const Kernels& kernels();
// Best capability the CPU runs, and every one it runs (comma separated, best last).
const char* best_capability();
const char* supported_capabilities();

}  // namespace cpu
}  // namespace dowser
