// Standalone, torch-free check of every CPU instruction-set kernel table against the DEFAULT
// table of the same source (csrc/cpu/kernels_impl.h), bit for bit: masked AdamW and SGD steps
// (fp32/fp16/bf16, masked/unmasked, compact/dense state, fp32 masters, check/skip,
// maximize), the NaN/Inf count, pack/unpack, score tiles and the window test.
//
// Built by .ci/neon.sh: natively on x86-64 (avx2/avx512 against default, where this CPU runs
// them) and with aarch64-linux-gnu-g++ under qemu-aarch64 (neon against default), the path the
// test suite can never execute on an x86 host. Sizes straddle a 32-entry word, a 512-entry
// sub-block and an 8192-entry task. Prints one line per failure and ends with
// "isa_harness: N passed, M failed"; the exit status is 1 when anything failed.
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <random>
#include <string>
#include <vector>

#include "../cpu/kernels.h"

using namespace dowser::cpu;
using dowser::math::AdamScalars;
using dowser::math::SgdScalars;

namespace {

int g_pass = 0, g_fail = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_pass;
  } else {
    ++g_fail;
    printf("FAIL %s\n", what.c_str());
  }
}

template <class T>
bool same_bytes(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

const int64_t kSizes[] = {1, 31, 33, 1000, 8191, 8192, 8193, 3 * 8192 + 517};
const char* kKindName[] = {"f32", "f16", "bf16"};

uint16_t to_bf16(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
// fp16 bits of a value in fp16's normal range (the harness only needs plausible inputs; both
// tables read the same bits).
uint16_t to_f16(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  int32_t e = static_cast<int32_t>((u >> 23) & 0xFF) - 127 + 15;
  if (e <= 0) return static_cast<uint16_t>(sign);
  if (e >= 31) return static_cast<uint16_t>(sign | 0x7C00u);
  return static_cast<uint16_t>(sign | (e << 10) | ((u >> 13) & 0x3FFu));
}

// A tensor of n values of `kind` as raw bytes.
std::vector<uint8_t> values(int kind, int64_t n, std::mt19937& rng, float scale, double bad_frac) {
  std::normal_distribution<float> nd(0.0f, scale);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const float specials[] = {__builtin_nanf(""), __builtin_inff(), -__builtin_inff()};
  std::vector<uint8_t> out(n * (kind == kF32 ? 4 : 2));
  for (int64_t i = 0; i < n; ++i) {
    float x = nd(rng);
    if (bad_frac > 0 && u(rng) < bad_frac) x = specials[i % 3];
    if (kind == kF32) {
      memcpy(&out[i * 4], &x, 4);
    } else {
      const uint16_t h = kind == kBF16 ? (x != x ? uint16_t(0x7FC0) : to_bf16(x)) : (x != x ? uint16_t(0x7E00) : to_f16(x));
      memcpy(&out[i * 2], &h, 2);
    }
  }
  return out;
}

// Packed mask of n entries: density rho (1.0: all ones; 0: none); padding bits zero.
std::vector<uint32_t> mask_words(int64_t n, double rho, std::mt19937& rng) {
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<uint32_t> w((n + 31) / 32, 0u);
  for (int64_t i = 0; i < n; ++i)
    if (rho >= 1.0 || u(rng) < rho) w[i / 32] |= 1u << (i % 32);
  return w;
}

std::vector<int32_t> prefix(const std::vector<uint32_t>& words) {
  std::vector<int32_t> off(words.size());
  int32_t acc = 0;
  for (size_t w = 0; w < words.size(); ++w) {
    off[w] = acc;
    acc += __builtin_popcount(words[w]);
  }
  return off;
}

std::vector<Task> tasks_of(const std::vector<Item>& items) {  // as masked_adamw.cpp's make_tasks
  std::vector<Task> t;
  for (int i = 0; i < static_cast<int>(items.size()); ++i) {
    const int64_t words = (items[i].n + 31) / 32;
    for (int64_t w = 0; w < words; w += 256) t.push_back({i, w, w + 256 < words ? w + 256 : words});
  }
  return t;
}

// Everything one optimizer step reads and writes, owned; run() gives each table its own copy.
struct Case {
  int kind;
  int64_t n;
  bool masked, compact, master;
  std::vector<uint8_t> param, grad;
  std::vector<uint32_t> mask;
  std::vector<int32_t> offsets;
  std::vector<float> s1, s2, m;
  int64_t k = 0;  // state length

  Case(int kind_, int64_t n_, double rho, bool compact_, bool master_, double bad, std::mt19937& rng)
      : kind(kind_), n(n_), masked(rho >= 0), compact(compact_ && rho >= 0), master(master_) {
    param = values(kind, n, rng, 1.0f, 0.0);
    grad = values(kind, n, rng, 0.1f, bad);
    if (masked) {
      mask = mask_words(n, rho, rng);
      offsets = prefix(mask);
    }
    k = compact ? (mask.empty() ? 0 : offsets.back() + __builtin_popcount(mask.back())) : n;
    std::normal_distribution<float> nd(0.0f, 0.05f);
    s1.resize(k);
    s2.resize(k);
    for (auto& x : s1) x = nd(rng);
    for (auto& x : s2) x = __builtin_fabsf(nd(rng));
    if (master) {  // master = the parameter's value as fp32 plus a small offset (it differs)
      m.resize(k);
      for (auto& x : m) x = nd(rng);
    }
  }
  Item item(bool with_s2) {
    Item it{};
    it.param = param.data();
    it.grad = grad.data();
    it.s1 = s1.data();
    it.s2 = with_s2 ? s2.data() : nullptr;
    it.master = master ? m.data() : nullptr;
    it.mask = masked ? mask.data() : nullptr;
    it.offsets = compact ? offsets.data() : nullptr;
    it.n = n;
    it.kind = kind;
    it.step_size = 1e-3f / 0.1f;
    it.bc2_sqrt = 0.0316f;
    return it;
  }
  bool same(const Case& o) const {
    return same_bytes(param, o.param) && same_bytes(s1, o.s1) && same_bytes(s2, o.s2) && same_bytes(m, o.m);
  }
};

std::string name_of(const char* op, const Case& c, const char* extra) {
  char buf[256];
  snprintf(buf, sizeof(buf), "%s %s n=%lld %s%s%s %s", op, kKindName[c.kind], static_cast<long long>(c.n),
           c.masked ? "masked" : "unmasked", c.compact ? " compact" : (c.masked ? " dense-state" : ""),
           c.master ? " masters" : "", extra);
  return buf;
}

void test_optimizer_steps(const Kernels& ref, const Kernels& isa) {
  const double rhos[] = {-1.0, 0.1, 0.5, 1.0};  // -1: no mask
  uint32_t seed = 1;
  for (int kind : {kF32, kF16, kBF16})
    for (int64_t n : kSizes)
      for (double rho : rhos)
        for (bool compact : {true, false}) {
          if (rho < 0 && !compact) continue;
          for (bool master : {false, true}) {
            if (master && kind == kF32) continue;  // masters are for bf16/fp16 parameters
            for (int variant = 0; variant < 4; ++variant) {
              const bool skip = variant & 1, maximize = variant & 2;
              std::mt19937 rng(seed++);
              Case a(kind, n, rho, compact, master, skip ? 0.01 : 0.0, rng);
              Case b = a;
              // AdamW
              {
                AdamScalars s{1.0f - 1e-3f * 0.01f, 0.1f, 0.999f, 0.001f, 1e-8f, 0.01f, 0.0316f};
                Item ia = a.item(true), ib = b.item(true);
                std::vector<Item> va{ia}, vb{ib};
                std::vector<Task> t = tasks_of(va);
                std::vector<int64_t> pa(t.size(), -1), pb(t.size(), -1);
                ref.adamw(va.data(), t.data(), t.size(), s, maximize, skip, pa.data());
                isa.adamw(vb.data(), t.data(), t.size(), s, maximize, skip, pb.data());
                char extra[64];
                snprintf(extra, sizeof(extra), "rho=%g%s%s", rho, skip ? " skip" : " check",
                         maximize ? " maximize" : "");
                check(a.same(b) && pa == pb, name_of("adamw", a, extra) + " [" + isa.name + "]");
              }
              // SGD on fresh tensors with finite gradients (no skip mode; NaN payloads are
              // not part of the contract): momentum and nesterov by variant
              {
                std::mt19937 rng2(seed * 7919u);
                Case a(kind, n, rho, compact, master, 0.0, rng2);
                Case b = a;
                const bool momentum = variant != 0, nesterov = variant == 3;
                SgdScalars s{0.01f, momentum ? 0.9f : 0.0f, 0.9f, variant == 2 ? 0.01f : 0.0f, nesterov, momentum};
                for (bool first : {true, false}) {
                  Item ia = a.item(false), ib = b.item(false);
                  if (!momentum) ia.s1 = ib.s1 = nullptr;
                  ia.first = ib.first = first;
                  std::vector<Item> va{ia}, vb{ib};
                  std::vector<Task> t = tasks_of(va);
                  ref.sgd(va.data(), t.data(), t.size(), s, maximize);
                  isa.sgd(vb.data(), t.data(), t.size(), s, maximize);
                  char extra[64];
                  snprintf(extra, sizeof(extra), "rho=%g momentum=%d nesterov=%d first=%d", rho, momentum,
                           nesterov, first);
                  check(a.same(b), name_of("sgd", a, extra) + " [" + isa.name + "]");
                }
              }
            }
          }
        }
  // Several items in one call (tasks of different items interleave across threads).
  std::mt19937 rng(99);
  std::vector<Case> as, bs;
  for (int i = 0; i < 5; ++i) as.emplace_back(i % 3, kSizes[3 + i], i % 2 ? 0.1 : -1.0, true, i % 3 != 0, 0.0, rng);
  bs = as;
  std::vector<Item> va, vb;
  for (auto& c : as) va.push_back(c.item(true));
  for (auto& c : bs) vb.push_back(c.item(true));
  std::vector<Task> t = tasks_of(va);
  AdamScalars s{0.99999f, 0.1f, 0.999f, 0.001f, 1e-8f, 0.01f, 0.0316f};
  ref.adamw(va.data(), t.data(), t.size(), s, false, false, nullptr);
  isa.adamw(vb.data(), t.data(), t.size(), s, false, false, nullptr);
  bool ok = true;
  for (size_t i = 0; i < as.size(); ++i) ok = ok && as[i].same(bs[i]);
  check(ok, std::string("adamw five items of mixed kinds [") + isa.name + "]");
}

void test_count_bad(const Kernels& ref, const Kernels& isa) {
  uint32_t seed = 1000;
  for (int kind : {kF32, kF16, kBF16})
    for (int64_t n : kSizes)
      for (double rho : {-1.0, 0.1, 1.0})
        for (double bad : {0.0, 0.001, 0.2}) {
          std::mt19937 rng(seed++);
          Case c(kind, n, rho, true, false, bad, rng);
          std::vector<Item> v{c.item(true)};
          std::vector<Task> t = tasks_of(v);
          std::vector<int64_t> pa(t.size(), -1), pb(t.size(), -1);
          ref.count_bad(v.data(), t.data(), t.size(), pa.data());
          isa.count_bad(v.data(), t.data(), t.size(), pb.data());
          char extra[64];
          snprintf(extra, sizeof(extra), "rho=%g bad=%g", rho, bad);
          check(pa == pb, name_of("count_bad", c, extra) + " [" + isa.name + "]");
        }
}

void test_pack(const Kernels& ref, const Kernels& isa) {
  std::mt19937 rng(7);
  for (int64_t n : {int64_t(0), int64_t(1), int64_t(31), int64_t(32), int64_t(33), int64_t(8193),
                    int64_t(4097 * 32 + 5)}) {  // the last one takes the OpenMP branch
    std::vector<uint8_t> bits(n);
    for (auto& b : bits) b = (rng() % 3) == 0;
    std::vector<uint32_t> wa((n + 31) / 32, 0xDEADBEEFu), wb = wa;
    ref.pack(reinterpret_cast<const bool*>(bits.data()), n, wa.data());
    isa.pack(reinterpret_cast<const bool*>(bits.data()), n, wb.data());
    std::vector<uint8_t> ua(n, 7), ub(n, 7);
    ref.unpack(wa.data(), n, reinterpret_cast<bool*>(ua.data()));
    isa.unpack(wa.data(), n, reinterpret_cast<bool*>(ub.data()));
    check(wa == wb, "pack n=" + std::to_string(n) + " [" + isa.name + "]");
    check(ua == ub && ua == bits, "unpack n=" + std::to_string(n) + " [" + isa.name + "]");
  }
}

void test_scores(const Kernels& ref, const Kernels& isa) {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int64_t B : {1, 3, 16})
    for (int nr : {1, 3, 4, 7}) {
      const int64_t rows = nr + 2, cols_pad = 72, ld = 64;
      std::vector<float> p(rows * B), a(B * cols_pad), absw(nr * ld);
      for (auto& x : p) x = __builtin_fabsf(nd(rng));
      for (auto& x : a) x = __builtin_fabsf(nd(rng));
      for (auto& x : absw) x = __builtin_fabsf(nd(rng));
      const ScoreArgs L{p.data(), a.data(), B, cols_pad};
      for (int64_t j0 : {0, 8}) {
        std::vector<float> sa(nr * ld, -1.0f), sb = sa;
        ref.score_tile(L, 1, nr, j0, 64 - 8 * (j0 / 8), absw.data(), sa.data(), ld);
        isa.score_tile(L, 1, nr, j0, 64 - 8 * (j0 / 8), absw.data(), sb.data(), ld);
        check(same_bytes(sa, sb), "score_tile B=" + std::to_string(B) + " nr=" + std::to_string(nr) +
                                      " j0=" + std::to_string(j0) + " [" + isa.name + "]");
      }
    }
  // word_below: keys around a window, -0.0 and +0.0, negatives, infinities
  for (int trial = 0; trial < 200; ++trial) {
    float s[32];
    for (int q = 0; q < 32; ++q) s[q] = nd(rng);
    s[trial % 32] = -0.0f;
    s[(trial + 5) % 32] = 0.0f;
    s[(trial + 9) % 32] = __builtin_inff();
    uint32_t lo = static_cast<uint32_t>(rng()), hi = lo + (rng() >> (trial % 32));
    if (hi < lo) hi = 0xFFFFFFFFu;
    uint32_t wa = 0, wb = 0;
    const uint32_t va = ref.word_below(s, lo, hi, &wa), vb = isa.word_below(s, lo, hi, &wb);
    check(va == vb && wa == wb, "word_below trial " + std::to_string(trial) + " [" + isa.name + "]");
  }
}

}  // namespace

int main() {
  std::vector<const Kernels*> paths;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2"))
    paths.push_back(&kernels_avx2);
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    paths.push_back(&kernels_avx512);
#endif
#if defined(__aarch64__)
  paths.push_back(&kernels_neon);
#endif
  if (paths.empty()) {
    printf("isa_harness: no instruction-set path besides default on this CPU\n");
  }
  for (const Kernels* k : paths) {
    const int f0 = g_fail, p0 = g_pass;
    test_pack(kernels_default, *k);
    test_count_bad(kernels_default, *k);
    test_optimizer_steps(kernels_default, *k);
    test_scores(kernels_default, *k);
    printf("isa_harness: %s vs default: %d passed, %d failed\n", k->name, g_pass - p0, g_fail - f0);
  }
  printf("isa_harness: %d passed, %d failed\n", g_pass, g_fail);
  return g_fail == 0 && !paths.empty() ? 0 : 1;
}
