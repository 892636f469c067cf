// CPU scores and exact bottom-k selection into bit-packed masks (issue 4, DESIGN.md §2).
//
// S_ij = |W_ij| * sum_b P[i,b] * A[b,j], P = Psi^T * w / sum(w) (prepared in Python, fp32).
// The selection never holds S: every pass recomputes score rows with the same code
// (`score_rows`), so the mask is exactly the k smallest of this backend's own scores.
//   pass 1: histogram of the top 16 bits of the order-preserving key of each score;
//   pass 2: collect (low 16 bits, global index) of the entries in the threshold bin when
//           they are few (<= n/64), then nth_element finds the k-th (key, index) exactly;
//           else (heavy ties) histogram the low 16 bits, count ties per row, find the cut row;
//   pass 3: write the words: bit = key < T or (key == T and index <= cut).
// Threads own contiguous row ranges (static, by element count), so per-thread counts from one
// pass are valid offsets in the next.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <cstring>
#include <vector>

#include <stdexcept>

#include "../dowser.h"
#include "kernels.h"

namespace dowser {
namespace {

constexpr int64_t V = 8;  // floats per vector

struct Layer {
  const char* w;       // weight data
  at::ScalarType dtype;
  int64_t s0, s1;      // strides in elements
  int64_t rows, cols, cols_pad;
  const float* p;      // (rows, B) row factors
  std::vector<float> a;  // (B, cols_pad) column factors, zero padded
  int64_t B;
  int64_t offset;      // global flat index of entry (0, 0)
  uint32_t* out;       // packed words (zeroed)
};

inline uint32_t key_of(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits << 1) == 0) bits = 0;  // -0.0 ranks as +0.0
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Tiles of up to RB rows x JB columns are scored at once, all in L1/L2: the A block is reused
// by every row of the tile.
constexpr int RB = 16;
constexpr int64_t JB = 256;

// |W| of rows i0.. (nr of them), columns [j0, j0 + jb), as fp32 into absw[r * JB + j].
void abs_tile(const Layer& L, int64_t i0, int nr, int64_t j0, int64_t jb, float* absw) {
  const int64_t jn = std::min(jb, L.cols - j0);  // real columns (the rest is padding)
  for (int r = 0; r < nr; ++r) {
    float* dst = absw + r * JB;
    const int64_t base = (i0 + r) * L.s0 + j0 * L.s1;
    switch (L.dtype) {
      case at::kFloat: {
        const float* src = reinterpret_cast<const float*>(L.w) + base;
        if (L.s1 == 1)
          for (int64_t j = 0; j < jn; ++j) dst[j] = std::fabs(src[j]);
        else
          for (int64_t j = 0; j < jn; ++j) dst[j] = std::fabs(src[j * L.s1]);
        break;
      }
      case at::kBFloat16: {
        const uint16_t* src = reinterpret_cast<const uint16_t*>(L.w) + base;
        for (int64_t j = 0; j < jn; ++j) {
          const uint32_t bits = static_cast<uint32_t>(src[j * L.s1] & 0x7FFFu) << 16;
          std::memcpy(dst + j, &bits, 4);
        }
        break;
      }
      case at::kHalf: {
        const at::Half* src = reinterpret_cast<const at::Half*>(L.w) + base;
        for (int64_t j = 0; j < jn; ++j) dst[j] = std::fabs(static_cast<float>(src[j * L.s1]));
        break;
      }
      case at::kDouble: {
        const double* src = reinterpret_cast<const double*>(L.w) + base;
        for (int64_t j = 0; j < jn; ++j) dst[j] = static_cast<float>(std::fabs(src[j * L.s1]));
        break;
      }
      default:
        TORCH_CHECK(false, "dowser select: unsupported weight dtype");
    }
    for (int64_t j = jn; j < jb; ++j) dst[j] = 0.f;
  }
}

// Score tiles come from the per-ISA kernel table (kernels_impl.h: each score is
// ((p0*a0 + p1*a1) + ...) * |w| with separate mul and add, so every path gives the same bits);
// the table is chosen once per call (select_masks_cpu / scores_cpu).
const cpu::Kernels* g_kernels = nullptr;

const cpu::Kernels& pick_kernels() {
  try {
    return cpu::kernels();
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
}

inline void score_tile(const Layer& L, int64_t i0, int nr, int64_t j0, int64_t jb, const float* absw,
                       float* s) {
  const cpu::ScoreArgs args{L.p, L.a.data(), L.B, L.cols_pad};
  g_kernels->score_tile(args, i0, nr, j0, jb, absw, s, JB);
}

// Global row g -> (layer, row). Rows of all layers in order.
struct Rows {
  std::vector<Layer>* layers;
  std::vector<int64_t> start;  // first global row of each layer (+ total)
  int64_t total = 0;
  void locate(int64_t g, int& l, int64_t& i) const {
    l = static_cast<int>(std::upper_bound(start.begin(), start.end(), g) - start.begin()) - 1;
    i = g - start[l];
  }
};

// Contiguous global row ranges per thread, balanced by element count.
std::vector<int64_t> partition(const Rows& R, int nt) {
  std::vector<Layer>& Ls = *R.layers;
  int64_t n = 0;
  for (auto& L : Ls) n += L.rows * L.cols;
  std::vector<int64_t> cut(nt + 1, R.total);
  cut[0] = 0;
  int64_t acc = 0, g = 0;
  int t = 1;
  for (size_t l = 0; l < Ls.size() && t < nt; ++l) {
    for (int64_t i = 0; i < Ls[l].rows && t < nt; ++i, ++g) {
      while (t < nt && acc >= n * t / nt) cut[t++] = g;
      acc += Ls[l].cols;
    }
  }
  while (t < nt) cut[t++] = R.total;
  return cut;
}

struct Scratch {
  std::vector<float> absw, s;
  Scratch() : absw(RB * JB), s(RB * JB) {}
};

// Scores rows of one layer [i0, i0 + nr) (nr <= RB) tile by tile; calls
// fn(layer, row, j0, j1, scores of columns j0..j1-1) in row order within each column block.
template <class Fn>
void for_tile_rows(const Layer& L, int64_t i0, int nr, Scratch& sc, Fn&& fn) {
  for (int64_t j0 = 0; j0 < L.cols; j0 += JB) {
    const int64_t jb = std::min(JB, L.cols_pad - j0);
    abs_tile(L, i0, nr, j0, jb, sc.absw.data());
    score_tile(L, i0, nr, j0, jb, sc.absw.data(), sc.s.data());
    const int64_t j1 = std::min(j0 + JB, L.cols);
    for (int r = 0; r < nr; ++r) fn(L, i0 + r, j0, j1, sc.s.data() + r * JB);
  }
}

// Every row segment of global rows [g0, g1).
template <class Fn>
void for_rows(const Rows& R, int64_t g0, int64_t g1, Scratch& sc, Fn&& fn) {
  int64_t g = g0;
  while (g < g1) {
    int l;
    int64_t i;
    R.locate(g, l, i);
    const Layer& L = (*R.layers)[l];
    const int64_t in_layer = std::min(g1 - g, L.rows - i);
    for (int64_t r = 0; r < in_layer; r += RB)
      for_tile_rows(L, i + r, static_cast<int>(std::min<int64_t>(RB, in_layer - r)), sc, fn);
    g += in_layer;
  }
}

void atomic_or(uint32_t* p, uint32_t v) {
  if (v) __atomic_fetch_or(p, v, __ATOMIC_RELAXED);
}

// Write the mask bits of row i, columns [j0, j1): bit = key < T or (key == T and global
// index <= cut).
void write_seg(const Layer& L, int64_t i, int64_t j0, int64_t j1, const float* s, uint32_t T,
               int64_t cut) {
  const int64_t f0 = i * L.cols;  // flat index of the row's first entry
  const int64_t gbase = L.offset + f0;
  int64_t j = j0;
  while (j < j1) {
    const int64_t f = f0 + j;
    const int64_t word = f >> 5;
    const int bit0 = static_cast<int>(f & 31);
    const int64_t m = std::min<int64_t>(32 - bit0, j1 - j);
    uint32_t v = 0;
    for (int64_t q = 0; q < m; ++q) {
      const uint32_t k = key_of(s[j - j0 + q]);
      const bool on = k < T || (k == T && gbase + j + q <= cut);
      v |= static_cast<uint32_t>(on) << (bit0 + q);
    }
    if (m == 32)
      L.out[word] = v;  // the whole word lies in this segment: no other writer
    else
      atomic_or(L.out + word, v);  // shared with a neighbouring segment (maybe another thread)
    j += m;
  }
}

Layer make_layer(const torch::Tensor& w, const torch::Tensor& p, const torch::Tensor& a,
                 int64_t offset, uint32_t* out) {
  TORCH_CHECK(w.device().is_cpu() && p.device().is_cpu() && a.device().is_cpu(),
              "dowser select (cpu): tensors must be on CPU");
  TORCH_CHECK(w.dim() == 2, "weight must be 2-D");
  TORCH_CHECK(p.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat &&
                  p.is_contiguous() && a.is_contiguous(),
              "factors must be contiguous fp32");
  TORCH_CHECK(p.dim() == 2 && a.dim() == 2 && p.size(0) == w.size(0) && a.size(1) == w.size(1) &&
                  p.size(1) == a.size(0) && a.size(0) >= 1,
              "factor shapes do not fit the weight");
  Layer L;
  L.w = static_cast<const char*>(w.data_ptr());
  L.dtype = w.scalar_type();
  L.s0 = w.stride(0);
  L.s1 = w.stride(1);
  L.rows = w.size(0);
  L.cols = w.size(1);
  L.cols_pad = (L.cols + V - 1) / V * V;
  L.B = a.size(0);
  L.p = p.data_ptr<float>();
  L.a.assign(L.B * L.cols_pad, 0.f);
  const float* asrc = a.data_ptr<float>();
  for (int64_t b = 0; b < L.B; ++b)
    std::memcpy(L.a.data() + b * L.cols_pad, asrc + b * L.cols, L.cols * sizeof(float));
  L.offset = offset;
  L.out = out;
  return L;
}

}  // namespace

// One score computed alone (for the sample); the value need not match the tiles bit for bit:
// the sample only places the window, and the window pass checks that it holds the k-th entry.
float score_one(const Layer& L, int64_t i, int64_t j) {
  float w;
  abs_tile(L, i, 1, j, 1, &w);
  const float* p = L.p + i * L.B;
  float acc = p[0] * L.a[j];
  for (int64_t b = 1; b < L.B; ++b) acc = acc + p[b] * L.a[b * L.cols_pad + j];
  return acc * w;
}

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

inline uint32_t word_below(const float* s, uint32_t lo, uint32_t hi, uint32_t* in_window) {
  return g_kernels->word_below(s, lo, hi, in_window);
}

typedef unsigned __int128 u128;  // (key << 64) | global index: sorts by key, then index

// Fast path, one pass over the scores: a fixed pseudo-random sample brackets the k-th key in a
// window [lo, hi]; the pass sets every bit with key < lo, counts them, and collects the window's
// (key, index) pairs; the k - count smallest pairs are then set. Returns false (nothing useful
// written; the caller clears the words) when the window misses the k-th entry or would need
// more than `cap` pairs (heavy ties), leaving the exact radix passes to do it.
bool select_window(const Rows& R, std::vector<Layer>& Ls, const std::vector<int64_t>& cut, int nt,
                   int64_t n, int64_t k, uint32_t& T_out, int64_t& count_lt_out) {
  // Sample size: the window holds ~12 standard deviations of the sample quantile, a fraction
  // ~ 12 sqrt(q(1-q)/m) of n; a larger sample for larger n keeps its pairs a few % of |S|.
  const int64_t m = std::min<int64_t>(n, std::max<int64_t>(int64_t(1) << 16,
                                                           std::min<int64_t>(n >> 10, int64_t(1) << 18)));
  const bool dbg = std::getenv("DOWSER_SELECT_DEBUG") != nullptr;
  double t0 = omp_get_wtime();
  std::vector<uint32_t> sample(m);
  std::vector<int64_t> layer_end(Ls.size());
  for (size_t l = 0; l < Ls.size(); ++l) layer_end[l] = Ls[l].offset + Ls[l].rows * Ls[l].cols;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t q = 0; q < m; ++q) {
    const int64_t g = m == n ? q : static_cast<int64_t>(splitmix64(q) % static_cast<uint64_t>(n));
    const size_t l = std::upper_bound(layer_end.begin(), layer_end.end(), g) - layer_end.begin();
    const Layer& L = Ls[l];
    const int64_t f = g - L.offset;
    sample[q] = key_of(score_one(L, f / L.cols, f % L.cols));
  }
  std::sort(sample.begin(), sample.end());
  const double qf = static_cast<double>(k) / static_cast<double>(n);
  const double rank = qf * static_cast<double>(m);
  const double sd = std::sqrt(static_cast<double>(m) * qf * (1.0 - qf)) + 1.0;
  const int64_t lo_rank = static_cast<int64_t>(std::floor(rank - 6.0 * sd - 2.0));
  const int64_t hi_rank = static_cast<int64_t>(std::ceil(rank + 6.0 * sd + 2.0));
  const uint32_t lo = lo_rank < 0 ? 0u : sample[lo_rank];
  const uint32_t hi = hi_rank >= m ? 0xFFFFFFFFu : sample[hi_rank];
  std::vector<uint32_t>().swap(sample);
  if (dbg) {
    fprintf(stderr, "select_window: sample %lld in %.3fs\n", (long long)m, omp_get_wtime() - t0);
    t0 = omp_get_wtime();
#pragma omp parallel num_threads(nt)
    {
      const int t = omp_get_thread_num();
      Scratch sc;
      float sink = 0;
      for_rows(R, cut[t], cut[t + 1], sc,
               [&](const Layer&, int64_t, int64_t, int64_t, const float* seg) { sink += seg[0]; });
      if (sink == -1.f) fprintf(stderr, "?");
    }
    fprintf(stderr, "select_window: scores only %.3fs\n", omp_get_wtime() - t0);
  }
  t0 = omp_get_wtime();

  const int64_t cap = std::max<int64_t>(int64_t(1) << 16, n / 64);
  // Untouched capacity costs no resident memory; only the pairs written do.
  std::unique_ptr<u128[]> win(new u128[cap]);
  std::atomic<int64_t> used{0};
  std::atomic<bool> overflow{false};
  std::vector<int64_t> below(nt, 0);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    Scratch sc;
    constexpr int LB = 1024;
    u128 local[LB];
    int nl = 0;
    int64_t c_lo = 0;
    auto flush = [&]() {
      const int64_t at = used.fetch_add(nl);
      if (at + nl > cap) overflow = true;
      else std::memcpy(win.get() + at, local, nl * sizeof(u128));
      nl = 0;
    };
    for_rows(R, cut[t], cut[t + 1], sc,
             [&](const Layer& L, int64_t i, int64_t j0, int64_t j1, const float* seg) {
               if (overflow.load(std::memory_order_relaxed)) return;
               const int64_t f0 = i * L.cols;
               const uint64_t gbase = static_cast<uint64_t>(L.offset + f0 + j0);
               int64_t j = j0;
               while (j < j1) {
                 const int64_t f = f0 + j;
                 const int bit0 = static_cast<int>(f & 31);
                 const int64_t cnt = std::min<int64_t>(32 - bit0, j1 - j);
                 uint32_t v = 0, win = 0;
                 if (cnt == 32) {
                   v = word_below(seg + (j - j0), lo, hi, &win);
                   for (; win; win &= win - 1) {  // the few keys inside the window
                     const int q = __builtin_ctz(win);
                     local[nl++] = (static_cast<u128>(key_of(seg[j - j0 + q])) << 64) |
                                   (gbase + (j - j0) + q);
                     if (nl == LB) flush();
                   }
                 } else {  // a word shared with the neighbouring segment
                   v = 0;
                   for (int64_t q = 0; q < cnt; ++q) {
                     const uint32_t key = key_of(seg[j - j0 + q]);
                     v |= static_cast<uint32_t>(key < lo) << (bit0 + q);
                     if (key >= lo && key <= hi) {
                       local[nl++] = (static_cast<u128>(key) << 64) | (gbase + (j - j0) + q);
                       if (nl == LB) flush();
                     }
                   }
                 }
                 c_lo += __builtin_popcount(v);
                 if (cnt == 32) L.out[f >> 5] = v;
                 else atomic_or(L.out + (f >> 5), v);
                 j += cnt;
               }
             });
    if (nl) flush();
    below[t] = c_lo;
  }
  if (dbg) fprintf(stderr, "select_window: pass %.3fs, %lld pairs%s\n", omp_get_wtime() - t0,
                   (long long)used.load(), overflow ? " (overflow)" : "");
  if (overflow) return false;
  int64_t c_lo = 0;
  for (int64_t b : below) c_lo += b;
  const int64_t w = used.load();
  const int64_t need = k - c_lo;
  if (need < 0 || need > w) return false;
  if (need == 0) {  // every key < lo is taken and nothing more: T is the largest key below lo
    return false;   // rare (k exactly at a gap); the radix passes report its stats exactly
  }
  u128* begin = win.get();
  std::nth_element(begin, begin + (need - 1), begin + w);
  const uint32_t T = static_cast<uint32_t>(begin[need - 1] >> 64);
  int64_t c_lt = c_lo;
  for (int64_t q = 0; q < w; ++q) c_lt += static_cast<uint32_t>(begin[q] >> 64) < T;
  // The need smallest pairs are begin[0 .. need): set their bits.
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t q = 0; q < need; ++q) {
    const int64_t g = static_cast<int64_t>(static_cast<uint64_t>(begin[q]));
    const size_t l = std::upper_bound(layer_end.begin(), layer_end.end(), g) - layer_end.begin();
    const int64_t f = g - Ls[l].offset;
    atomic_or(Ls[l].out + (f >> 5), 1u << (f & 31));
  }
  T_out = T;
  count_lt_out = c_lt;
  return true;
}

torch::Tensor scores_cpu(const torch::Tensor& weight, const torch::Tensor& p, const torch::Tensor& a) {
  g_kernels = &pick_kernels();
  torch::Tensor out = torch::empty({weight.size(0), weight.size(1)}, torch::dtype(torch::kFloat));
  std::vector<Layer> Ls;
  Ls.push_back(make_layer(weight, p, a, 0, nullptr));
  Rows R{&Ls, {0, Ls[0].rows}, Ls[0].rows};
  float* dst = out.data_ptr<float>();
  const int nt = std::max(1, std::min<int>(omp_get_max_threads(), static_cast<int>(R.total)));
  const std::vector<int64_t> cut = partition(R, nt);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    Scratch sc;
    for_rows(R, cut[t], cut[t + 1], sc,
             [&](const Layer& L, int64_t i, int64_t j0, int64_t j1, const float* seg) {
               std::memcpy(dst + i * L.cols + j0, seg, (j1 - j0) * sizeof(float));
             });
  }
  return out;
}

std::tuple<std::vector<torch::Tensor>, torch::Tensor> select_masks_cpu(
    const std::vector<torch::Tensor>& weights, const std::vector<torch::Tensor>& ps,
    const std::vector<torch::Tensor>& as, int64_t k) {
  g_kernels = &pick_kernels();
  TORCH_CHECK(weights.size() == ps.size() && weights.size() == as.size(),
              "select_masks_cpu: list lengths differ");
  std::vector<torch::Tensor> outs;
  std::vector<Layer> Ls;
  Ls.reserve(weights.size());
  Rows R;
  R.layers = &Ls;
  int64_t n = 0;
  for (size_t l = 0; l < weights.size(); ++l) {
    const int64_t numel = weights[l].numel();
    outs.push_back(torch::zeros({(numel + 31) / 32}, torch::dtype(torch::kInt32)));
    Ls.push_back(make_layer(weights[l], ps[l], as[l], n,
                            reinterpret_cast<uint32_t*>(outs.back().data_ptr<int32_t>())));
    R.start.push_back(R.total);
    R.total += Ls.back().rows;
    n += numel;
  }
  R.start.push_back(R.total);
  TORCH_CHECK(0 <= k && k <= n, "select_masks_cpu: k=", k, " outside [0, ", n, "]");
  TORCH_CHECK(n < (int64_t(1) << 48), "select_masks_cpu: more than 2^48 entries");
  torch::Tensor stats = torch::tensor({int64_t(-1), int64_t(0), int64_t(0)}, torch::dtype(torch::kInt64));
  if (k == 0 || R.total == 0) return {outs, stats};

  const int nt = std::max(1, std::min<int>(omp_get_max_threads(), static_cast<int>(R.total)));
  const std::vector<int64_t> cut = partition(R, nt);
  {
    uint32_t T = 0;
    int64_t c_lt = 0;
    if (std::getenv("DOWSER_SELECT_RADIX") == nullptr &&  // tests force the radix passes
        select_window(R, Ls, cut, nt, n, k, T, c_lt)) {
      auto st = stats.accessor<int64_t, 1>();
      st[0] = static_cast<int64_t>(T);
      st[1] = c_lt;
      st[2] = k - c_lt;
      return {outs, stats};
    }
    for (auto& o : outs) o.zero_();  // the window missed: start over with the radix passes
  }
  constexpr int NB = 1 << 16;
  std::vector<int64_t> hist(static_cast<size_t>(nt) * NB, 0);  // per thread, then reduced

  // Pass 1: histogram of the top 16 key bits.
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    Scratch sc;
    std::vector<uint32_t> h(NB, 0);
    int64_t since = 0;
    int64_t* mine = hist.data() + static_cast<size_t>(t) * NB;
    for_rows(R, cut[t], cut[t + 1], sc,
             [&](const Layer&, int64_t, int64_t j0, int64_t j1, const float* seg) {
               for (int64_t j = 0; j < j1 - j0; ++j) ++h[key_of(seg[j]) >> 16];
               since += j1 - j0;
               if (since > (int64_t(1) << 31)) {  // flush before a uint32 bin can overflow
                 for (int b = 0; b < NB; ++b) mine[b] += h[b], h[b] = 0;
                 since = 0;
               }
             });
    for (int b = 0; b < NB; ++b) mine[b] += h[b];
  }
  std::vector<int64_t> total(NB, 0);
  for (int t = 0; t < nt; ++t)
    for (int b = 0; b < NB; ++b) total[b] += hist[static_cast<size_t>(t) * NB + b];
  int64_t below = 0;
  int hi = 0;
  while (below + total[hi] < k) below += total[hi++];
  const int64_t in_bin = total[hi];
  const int64_t need = k - below;  // 1 .. in_bin entries of bin `hi` are taken

  uint32_t T = 0;
  int64_t cut_index = 0, count_lt = 0;
  const int64_t cap = std::max<int64_t>(4096, n / 64);
  if (in_bin <= cap) {
    // Pass 2: collect (low 16 bits << 48 | global index) of the bin; the need-th smallest of
    // these composite keys is the last entry taken.
    std::vector<uint64_t> cand(in_bin);
    std::vector<int64_t> off(nt + 1, 0);
    for (int t = 0; t < nt; ++t) off[t + 1] = off[t] + hist[static_cast<size_t>(t) * NB + hi];
    std::atomic<bool> mismatch{false};
#pragma omp parallel num_threads(nt)
    {
      const int t = omp_get_thread_num();
      Scratch sc;
      int64_t pos = off[t];
      const int64_t end = off[t + 1];
      for_rows(R, cut[t], cut[t + 1], sc,
               [&](const Layer& L, int64_t i, int64_t j0, int64_t j1, const float* seg) {
                 const uint64_t gbase = static_cast<uint64_t>(L.offset + i * L.cols + j0);
                 for (int64_t j = 0; j < j1 - j0; ++j) {
                   const uint32_t key = key_of(seg[j]);
                   if (static_cast<int>(key >> 16) == hi && pos < end)
                     cand[pos++] = (static_cast<uint64_t>(key & 0xFFFFu) << 48) | (gbase + j);
                 }
               });
      if (pos != end) mismatch = true;  // cannot throw inside a parallel region
    }
    TORCH_CHECK(!mismatch, "select_masks_cpu: pass 2 disagrees with pass 1");
    std::nth_element(cand.begin(), cand.begin() + (need - 1), cand.end());
    const uint64_t last = cand[need - 1];
    const uint32_t lo = static_cast<uint32_t>(last >> 48);
    T = (static_cast<uint32_t>(hi) << 16) | lo;
    cut_index = static_cast<int64_t>(last & ((uint64_t(1) << 48) - 1));
    count_lt = below;
    for (int64_t q = 0; q < in_bin; ++q) count_lt += (cand[q] >> 48) < lo;
  } else {
    // Heavy ties. Pass 2b: histogram of the low 16 bits inside bin `hi`.
    std::fill(hist.begin(), hist.end(), 0);
#pragma omp parallel num_threads(nt)
    {
      const int t = omp_get_thread_num();
      Scratch sc;
      int64_t* mine = hist.data() + static_cast<size_t>(t) * NB;
      for_rows(R, cut[t], cut[t + 1], sc,
               [&](const Layer&, int64_t, int64_t j0, int64_t j1, const float* seg) {
                 for (int64_t j = 0; j < j1 - j0; ++j) {
                   const uint32_t key = key_of(seg[j]);
                   if (static_cast<int>(key >> 16) == hi) ++mine[key & 0xFFFFu];
                 }
               });
    }
    std::fill(total.begin(), total.end(), 0);
    for (int t = 0; t < nt; ++t)
      for (int b = 0; b < NB; ++b) total[b] += hist[static_cast<size_t>(t) * NB + b];
    int64_t below2 = below;
    int lo = 0;
    while (below2 + total[lo] < k) below2 += total[lo++];
    T = (static_cast<uint32_t>(hi) << 16) | static_cast<uint32_t>(lo);
    count_lt = below2;
    const int64_t ties = k - below2;
    // Pass 3: ties per row (O(rows) counts), then the row holding the ties-th tie.
    std::vector<int64_t> row_ties(R.total, 0);
#pragma omp parallel num_threads(nt)
    {
      const int t = omp_get_thread_num();
      Scratch sc;
      for_rows(R, cut[t], cut[t + 1], sc,
               [&](const Layer& L, int64_t i, int64_t j0, int64_t j1, const float* seg) {
                 int64_t c = 0;
                 for (int64_t j = 0; j < j1 - j0; ++j) c += key_of(seg[j]) == T;
                 const int l = static_cast<int>(&L - Ls.data());
                 row_ties[R.start[l] + i] += c;
               });
    }
    int64_t seen = 0, g = 0;
    while (seen + row_ties[g] < ties) seen += row_ties[g++];
    // Rescore that row alone (same arithmetic) to find the column of the last tie taken.
    int l;
    int64_t i;
    R.locate(g, l, i);
    Scratch sc;
    bool found = false;
    for_tile_rows(Ls[l], i, 1, sc,
                  [&](const Layer& L, int64_t, int64_t j0, int64_t j1, const float* seg) {
                    for (int64_t j = 0; j < j1 - j0 && !found; ++j) {
                      seen += key_of(seg[j]) == T;
                      if (seen == ties) {
                        cut_index = L.offset + i * L.cols + j0 + j;
                        found = true;
                      }
                    }
                  });
    TORCH_CHECK(found, "select_masks_cpu: tie pass disagrees with the rescored row");
  }

  // Final pass: write the words.
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    Scratch sc;
    for_rows(R, cut[t], cut[t + 1], sc,
             [&](const Layer& L, int64_t i, int64_t j0, int64_t j1, const float* seg) {
               write_seg(L, i, j0, j1, seg, T, cut_index);
             });
  }
  auto st = stats.accessor<int64_t, 1>();
  st[0] = static_cast<int64_t>(T);
  st[1] = count_lt;
  st[2] = k - count_lt;
  return {outs, stats};
}

}  // namespace dowser
