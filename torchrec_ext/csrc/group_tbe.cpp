// Native CPU backward (= update) of GroupTBE, the table-batched Group-optimizer kernel.
//
// One call per training step and kernel: the (row, index) pairs of the batch are radix-sorted,
// the per-index gradients summed per unique row and checked for NaN/Inf (phase A, which touches
// no table memory, so a refusal changes nothing), then every unique row takes one step of
// Algorithm 1 -- moment rule -> dual -> prox -- in registers, is checked again, and is written
// back in place with its `seen` flag and its table's incremental feature counts (phase B).
//
// The math is a transcription of the Python ground truth -- lightning_sgl/optim/_moments.py
// (moment rules), _dual.py (dual update) and _prox.py (soft threshold, group norm, shrink) --
// with the same operation order and the same guards; the tests compare it with the eager path for
// every rule, element-wise and row-wise, float32 and float64. Compiled with -ffp-contract=off so
// that no multiply-add is fused where the eager path rounds twice.
//
// Speed: sorted unique rows come grouped by table, so phase B runs one loop per table, compiled
// for the rule, the state layout and (for the common widths 8..128) the row width: every
// per-coordinate loop unrolls and vectorizes, states are loaded and stored in place. The arrays
// of the row a few rows ahead are prefetched so that their cache misses overlap. Buffers are
// reused across calls; table buffers are allocated in 2 MiB-aligned memory advised for huge
// pages (`huge_zeros`), so random rows rarely miss the TLB.
//
// Cost per step: O(N) to build and sort the N pairs (1-2 radix passes of <= 12 bits), O(N x D) to
// sum the gradients, O(U x D) for the U unique rows. Nothing outside the U rows is touched.

#include <ATen/ATen.h>
#include <Python.h>
#include <sys/mman.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// Moment rules (ids of torchrec_ext/kernel/native.py: RULE_IDS).
enum Rule : int64_t { SGD = 0, MOMENTUM = 1, ADAGRAD = 2, ADAM = 3, AMSGRAD = 4 };

// Columns of the per-table hyperparameter matrix (torchrec_ext/kernel/native.py: HP_COLUMNS).
enum Col : int64_t {
  LR = 0,       // lr
  L1,           // lambda1
  L21,          // lambda21
  L2X2,         // 2 * lambda2
  L2,           // lambda2
  EPS,          // eps
  B1,           // beta1
  OMB1,         // 1 - beta1
  B2,           // beta2
  OMB2,         // 1 - beta2 (the weight of the squares)
  MOM,          // momentum
  BC1,          // 1 - beta1^t
  BC2S,         // sqrt(1 - beta2^t)
  CLR,          // Adagrad's lr / (1 + (t - 1) lr_decay)
  SIGMA_CONST,  // SGD: sqrt(t) / lr, Momentum: 1 / lr
  THRESH,       // sqrt(group width) * lambda21
  FIXED,        // 1: the table's support is fixed (a refit), else 0
  NCOL
};

constexpr int kPrefetch = 8;  // rows ahead whose lines are prefetched
constexpr int kMaxStatic = 128;

// always_inline: GCC's pure-const analysis takes a function whose only effect is a prefetch for
// one without side effects and deletes its calls (no prefetch was emitted at all before this).
#define SGL_INLINE inline __attribute__((always_inline))

SGL_INLINE void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

// Non-finite test on the bit pattern (all exponent bits set): branch-free, so that the check
// loops vectorize (an OR of integers is associative, unlike a float sum).
inline uint32_t nonfinite_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return static_cast<uint32_t>((b & 0x7f800000u) == 0x7f800000u);
}
inline uint32_t nonfinite_bits(double v) {
  uint64_t b;
  std::memcpy(&b, &v, 8);
  return static_cast<uint32_t>((b & 0x7ff0000000000000ull) == 0x7ff0000000000000ull);
}

// Sum of a[j] * b[j] over j < D in 8 interleaved partial sums combined as a tree: the order is
// fixed (results do not depend on the build), and unlike one serial sum the loop vectorizes.
// The eager path reduces in its own order too; the tests compare to a relative 2e-6.
template <typename T, int DW>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t D) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= D; j += 8)
    for (int k = 0; k < 8; ++k) acc[k] += a[j + k] * b[j + k];
  for (int k = 0; k < 8 && j < D; ++j, ++k) acc[k] += a[j] * b[j];  // the < 8 left
  return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

// LSD radix sort of n 64-bit values by bits [lo, lo + bits); stable. As few passes as digits of
// at most 12 bits allow (count arrays stay in L1). Returns the buffer that holds the result.
uint64_t* radix_sort(uint64_t* a, uint64_t* tmp, int64_t n, int lo, int bits,
                     std::vector<int64_t>& count) {
  if (n < 256) {
    std::stable_sort(a, a + n, [lo](uint64_t x, uint64_t y) { return (x >> lo) < (y >> lo); });
    return a;
  }
  const int passes = std::max(1, (bits + 11) / 12);
  const int digit = (bits + passes - 1) / passes;
  const uint64_t mask = (uint64_t(1) << digit) - 1;
  count.resize(size_t(1) << digit);
  for (int shift = lo; shift < lo + bits; shift += digit) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++count[(a[i] >> shift) & mask];
    int64_t sum = 0;
    for (auto& c : count) {
      const int64_t v = c;
      c = sum;
      sum += v;
    }
    for (int64_t i = 0; i < n; ++i) tmp[count[(a[i] >> shift) & mask]++] = a[i];
    std::swap(a, tmp);
  }
  return a;
}

constexpr int n_states_of(Rule r) {
  return r == SGD ? 0 : (r == MOMENTUM || r == ADAGRAD) ? 1 : (r == ADAM ? 2 : 3);
}
// whether state k of rule r is one value per row under rowwise=True
constexpr bool state_rowwise(Rule r, int k) {
  return (r == ADAGRAD && k == 0) || ((r == ADAM || r == AMSGRAD) && k >= 1);
}

// ---- the shrink-norm index (torchrec_ext/kernel/index.py): every seen row is linked into the
// bucket of its shrink norm u = ||s|| / sqrt(d) (float32), one count per (table, bucket) and
// doubly linked lists. Bucket b holds (E_b, E_{b+1}] with E_b the float32 of bit pattern
// b << kShift: 2^(23 - kShift) buckets per octave, monotone in u, computed from the bits.
// Each bucket is kFine runs of 2^kFineShift consecutive float32 values ("fine buckets"; a row's
// fine id, bkt[r], is its bucket << kFineBits | its run). A bucket holding more than `split`
// rows gets a block from the pool: a count and lists per run, so that the run counts come
// without a walk and the rows of one run (or of a value range) from a walk of that run only.
// Its block goes back to the pool (the rows back to the bucket's lists) when it holds fewer than
// `merge` rows: every split bucket holds >= merge rows, so a table of n rows uses at most
// n / merge blocks and the pool is sized for that (pool: [split, merge, free, ids...]).
constexpr int kShift = 16;
constexpr int64_t kBuckets = int64_t(1) << (31 - kShift);
constexpr int kFineBits = 8;
constexpr int64_t kFine = int64_t(1) << kFineBits;
constexpr int kFineShift = kShift - kFineBits;
// Each list's rows are spread over kLanes lists by row id (r % kLanes): a walk follows the
// lanes in turn, so that kLanes independent pointer chases overlap their cache misses (a single
// list walks at one miss per row).
constexpr int64_t kLanes = 8;

SGL_INLINE uint32_t shrink_bits(float u) {
  uint32_t b = 0;
  if (u > 0.0f) std::memcpy(&b, &u, 4);
  return b;
}

// The fine id of a value: bucket << kFineBits | run (0 for u <= 0).
SGL_INLINE int32_t shrink_fine(float u) {
  const uint32_t b = shrink_bits(u);
  if (b == 0) return 0;
  return static_cast<int32_t>(std::min<uint32_t>((b - 1u) >> kFineShift, kBuckets * kFine - 1));
}

// The value the index stores for a row: its u, moved (by at most the rounding between u and the
// kernel's own norm <= sqrt(d) * lambda21 test, which only ever differs for u within a float32
// step of lambda21) so that u > lambda21 exactly when the row came out non-zero: the index's
// count above lambda21 is then the feature count.
SGL_INLINE float consistent_u(float u, bool nonzero, double lambda21) {
  float below = static_cast<float>(lambda21);  // the largest float32 <= lambda21
  if (static_cast<double>(below) > lambda21) below = std::nextafter(below, -INFINITY);
  if (nonzero) {
    const float above = std::nextafter(below, INFINITY);  // the smallest float32 > lambda21
    return static_cast<double>(u) > lambda21 ? u : above;
  }
  return static_cast<double>(u) > lambda21 ? below : u;
}

// f(r) for every row of the kLanes lists starting at h, the lanes in turn; returns the rows
// walked (stops at `limit`, so that a corrupted (cyclic) list cannot loop for ever).
template <typename F>
SGL_INLINE int64_t walk_lists(const int32_t* h, const int32_t* nxt, const float* u, int64_t limit,
                              F&& f) {
  int32_t cur[kLanes];
  int live = 0;
  int64_t n = 0;
  for (int64_t l = 0; l < kLanes; ++l) live += (cur[l] = h[l]) >= 0;
  while (live > 0) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const int32_t r = cur[l];
      if (r < 0) continue;
      if (n++ >= limit) return n;
      f(r);
      cur[l] = nxt[r];
      if (cur[l] < 0) --live; else __builtin_prefetch(u + cur[l], 0, 1);
    }
  }
  return n;
}

struct Index {
  float* u = nullptr;  // nullptr: no index kept
  int32_t* bkt = nullptr;  // per row: its fine id, -1 unlinked
  int32_t* nxt = nullptr;
  int32_t* prv = nullptr;
  int32_t* heads = nullptr;  // [tables, kBuckets, kLanes]
  int64_t* hist = nullptr;  // [tables, kBuckets]
  int32_t* blk = nullptr;  // [tables, kBuckets]: the bucket's block, -1 none
  int32_t* fheads = nullptr;  // [blocks, kFine, kLanes]
  int64_t* fhist = nullptr;  // [blocks, kFine]
  int32_t* pool = nullptr;  // [3 + blocks]: split, merge, free count, free block ids

  int32_t block(int64_t t, int64_t b) const { return blk[t * kBuckets + b]; }

  // The lists of bucket b (its own, or those of run j of its block) of table t.
  int32_t* lists(int64_t t, int64_t b, int64_t j) const {
    const int32_t k = block(t, b);
    return k >= 0 ? fheads + (static_cast<int64_t>(k) * kFine + j) * kLanes
                  : heads + (t * kBuckets + b) * kLanes;
  }

  SGL_INLINE void unlink(int64_t r, int64_t t, int32_t f) const {
    const int64_t b = f >> kFineBits, j = f & (kFine - 1);
    const int32_t p = prv[r], n = nxt[r];
    if (p >= 0) nxt[p] = n; else lists(t, b, j)[r & (kLanes - 1)] = n;
    if (n >= 0) prv[n] = p;
    const int32_t k = block(t, b);
    if (k >= 0) --fhist[static_cast<int64_t>(k) * kFine + j];
  }

  SGL_INLINE void link(int64_t r, int64_t t, int32_t f) const {
    const int64_t b = f >> kFineBits, j = f & (kFine - 1);
    int32_t* h = lists(t, b, j) + (r & (kLanes - 1));
    nxt[r] = *h;
    prv[r] = -1;
    if (*h >= 0) prv[*h] = static_cast<int32_t>(r);
    *h = static_cast<int32_t>(r);
    const int32_t k = block(t, b);
    if (k >= 0) ++fhist[static_cast<int64_t>(k) * kFine + j];
    bkt[r] = f;
  }

  // Every row of bucket b of table t (its lists, or its block's): O(rows of the bucket).
  std::vector<int32_t> take(int64_t t, int64_t b) const {
    std::vector<int32_t> rows;
    rows.reserve(static_cast<size_t>(hist[t * kBuckets + b]));
    walk(t, b, [&](int32_t r) { rows.push_back(r); });
    return rows;
  }

  // Give bucket b of table t a block (none left in the pool: it stays as it is). O(its rows).
  void split(int64_t t, int64_t b) const {
    if (pool[2] <= 0) return;
    const std::vector<int32_t> rows = take(t, b);
    const int32_t k = pool[3 + --pool[2]];
    std::fill_n(fheads + static_cast<int64_t>(k) * kFine * kLanes, kFine * kLanes, -1);
    std::fill_n(fhist + static_cast<int64_t>(k) * kFine, kFine, int64_t(0));
    std::fill_n(heads + (t * kBuckets + b) * kLanes, kLanes, -1);
    blk[t * kBuckets + b] = k;
    for (const int32_t r : rows) link(r, t, bkt[r]);
  }

  // Take bucket b's block back: its rows return to the bucket's own lists. O(its rows + kFine).
  void merge(int64_t t, int64_t b) const {
    const std::vector<int32_t> rows = take(t, b);
    pool[3 + pool[2]++] = blk[t * kBuckets + b];
    blk[t * kBuckets + b] = -1;
    std::fill_n(heads + (t * kBuckets + b) * kLanes, kLanes, -1);
    for (const int32_t r : rows) link(r, t, bkt[r]);
  }

  // Move row r (of local table t) into the bucket (and run) of value v: O(1) amortised.
  SGL_INLINE void relink(int64_t r, int64_t t, float v) const {
    u[r] = v;
    const int32_t nf = shrink_fine(v);
    const int32_t of = bkt[r];
    if (of == nf) return;
    const int64_t nb = nf >> kFineBits;
    if (of >= 0) {
      const int64_t ob = of >> kFineBits;
      if (ob == nb && block(t, ob) < 0) {  // the same bucket, which has no runs
        bkt[r] = nf;
        return;
      }
      unlink(r, t, of);
      if (ob == nb) {
        link(r, t, nf);
        return;
      }
      if (--hist[t * kBuckets + ob] < pool[1] && block(t, ob) >= 0) merge(t, ob);
    }
    link(r, t, nf);
    if (++hist[t * kBuckets + nb] > pool[0] && block(t, nb) < 0) split(t, nb);
  }

  // f(r) for every row of bucket b of table t. O(rows of the bucket); checks the lists
  // against the counts.
  template <typename F>
  void walk(int64_t t, int64_t b, F&& f) const {
    const int32_t k = block(t, b);
    if (k < 0) {
      const int64_t want = hist[t * kBuckets + b];
      TORCH_CHECK(walk_lists(lists(t, b, 0), nxt, u, want, f) == want,
                  "shrink index: a bucket's lists disagree with its count");
      return;
    }
    for (int64_t j = 0; j < kFine; ++j) walk_run(t, b, j, f);
  }

  // f(r) for every row of run j of bucket b of table t: O(rows of the run) when the bucket has
  // a block, else O(rows of the bucket) (at most `split`).
  template <typename F>
  void walk_run(int64_t t, int64_t b, int64_t j, F&& f) const {
    const int32_t k = block(t, b);
    if (k < 0) {  // (not through walk: its template would recurse)
      const int64_t want = hist[t * kBuckets + b];
      TORCH_CHECK(walk_lists(lists(t, b, 0), nxt, u, want, [&](int32_t r) {
                    if ((bkt[r] & (kFine - 1)) == j) f(r);
                  }) == want,
                  "shrink index: a bucket's lists disagree with its count");
      return;
    }
    const int64_t want = fhist[static_cast<int64_t>(k) * kFine + j];
    TORCH_CHECK(walk_lists(lists(t, b, j), nxt, u, want, f) == want,
                "shrink index: a run's lists disagree with its count");
  }
};

Index make_index(at::TensorList index) {
  Index ix;
  if (index.size() == 0) return ix;
  TORCH_CHECK(index.size() == 10,
              "index: shrink, bucket, next, prev, heads, hist, block, fine heads, fine hist, pool");
  ix.u = index[0].data_ptr<float>();
  ix.bkt = index[1].data_ptr<int32_t>();
  ix.nxt = index[2].data_ptr<int32_t>();
  ix.prv = index[3].data_ptr<int32_t>();
  ix.heads = index[4].data_ptr<int32_t>();
  ix.hist = index[5].data_ptr<int64_t>();
  ix.blk = index[6].data_ptr<int32_t>();
  ix.fheads = index[7].data_ptr<int32_t>();
  ix.fhist = index[8].data_ptr<int64_t>();
  ix.pool = index[9].data_ptr<int32_t>();
  return ix;
}

template <typename T>
struct Work {
  // tables
  const int64_t* w_off;
  const int64_t* row_off;
  const int64_t* dims;
  // buffers
  T* W;
  T* Du;
  T* S[3];
  uint8_t* seen;
  int64_t* counts;
  const double* H;
  Index ix;  // the shrink-norm index (ix.u == nullptr: none)
  // the batch's unique rows (sorted), their tables, summed gradients, input flags
  const int64_t* urow;
  const int64_t* utab;
  const int64_t* gpos;
  const T* gsum;
  const uint8_t* bad;
  int64_t U;
  // results
  int64_t refused = 0;
  int64_t refused_table = -1;
  int n_states = 0;
  bool srw[3] = {false, false, false};
  T* scratch = nullptr;  // 7 x max width, for widths without a compiled loop

  SGL_INLINE int64_t elem(int64_t u) const {
    const int64_t t = utab[u];
    return w_off[t] + (urow[u] - row_off[t]) * dims[t];
  }
  SGL_INLINE void prefetch(int64_t u) const {
    const int64_t e = elem(u);
    const int64_t bytes = dims[utab[u]] * static_cast<int64_t>(sizeof(T));
    prefetch_row(W + e, bytes);
    prefetch_row(Du + e, bytes);
    __builtin_prefetch(seen + urow[u], 0, 3);
    if (ix.u) {  // the relink reads the row's value and fine id
      __builtin_prefetch(ix.u + urow[u], 1, 3);
      __builtin_prefetch(ix.bkt + urow[u], 1, 3);
    }
    for (int k = 0; k < n_states; ++k) {
      if (srw[k])
        __builtin_prefetch(S[k] + urow[u], 0, 3);
      else
        prefetch_row(S[k] + e, bytes);
    }
  }
};

// One step of Algorithm 1 on the unique rows [u0, u1) of one table, in place. Transcribes
// group_step: second_moment_input -> rule.update -> rule.sigma -> dual_update -> prox (soft
// threshold, group norm, group shrink) -> dual_carry, then the row guard: a row whose new
// values are not all finite keeps its old ones (and is counted as refused).
template <typename T, Rule R, bool RW, bool EX, int DW>
void update_rows(Work<T>& w, int64_t t, int64_t u0, int64_t u1) {
  constexpr int NS = n_states_of(R);
  const int64_t D = DW ? DW : w.dims[t];
  const double* h = w.H + t * NCOL;
  const T lr = static_cast<T>(h[LR]), l1 = static_cast<T>(h[L1]), l2 = static_cast<T>(h[L2]);
  const T l2x2 = static_cast<T>(h[L2X2]), eps = static_cast<T>(h[EPS]);
  const T b1 = static_cast<T>(h[B1]), omb1 = static_cast<T>(h[OMB1]);
  const T b2 = static_cast<T>(h[B2]), omb2 = static_cast<T>(h[OMB2]);
  const T mom = static_cast<T>(h[MOM]), bc1 = static_cast<T>(h[BC1]);
  const T bc2s = static_cast<T>(h[BC2S]), clr = static_cast<T>(h[CLR]);
  const T sigma_const = static_cast<T>(h[SIGMA_CONST]), thresh = static_cast<T>(h[THRESH]);
  const T inv_d = T(1) / static_cast<T>(D);
  const T sqrt_d = std::sqrt(static_cast<T>(D));
  const bool fixed = h[FIXED] != 0;
  constexpr int CAP = DW ? DW : 1;
  T xs[CAP], ds[CAP], sgs[CAP], ss[CAP], ns[NS > 0 ? NS : 1][CAP];
  T* xn = DW ? xs : w.scratch;
  T* dn = DW ? ds : w.scratch + D;
  T* sb = DW ? sgs : w.scratch + 2 * D;
  T* qb = DW ? ss : w.scratch + 3 * D;
  T* sn[3] = {DW ? ns[0] : w.scratch + 4 * D,
              DW ? ns[NS > 1 ? 1 : 0] : w.scratch + 5 * D,
              DW ? ns[NS > 2 ? 2 : 0] : w.scratch + 6 * D};
  for (int64_t u = u0; u < u1; ++u) {
    if (u + kPrefetch < w.U) w.prefetch(u + kPrefetch);
    if (w.bad[u]) continue;  // non-finite gradient, nonfinite="skip": the row stays as it was
    const int64_t r = w.urow[u];
    const int64_t e = w.w_off[t] + (r - w.row_off[t]) * D;
    T* __restrict x = w.W + e;
    T* __restrict d = w.Du + e;
    const T* __restrict g = w.gsum + w.gpos[u];
    if (fixed) {  // the support is fixed (a refit): support_rows of optim/_functional.py
      if (w.seen[r] == 0) {  // first seen now: outside the support, zero (as it is served)
        for (int64_t j = 0; j < D; ++j) x[j] = T(0);
        w.seen[r] = 1;
        w.counts[2 * t] += 1;
        if (w.ix.u) w.ix.relink(r, t, 0.0f);
        continue;
      }
      uint32_t nz = 0;
      for (int64_t j = 0; j < D; ++j) nz |= static_cast<uint32_t>(x[j] != 0);
      if (!nz) continue;  // a zero row stays zero and keeps its state
    }
    T* s[3] = {nullptr, nullptr, nullptr};
    for (int k = 0; k < NS; ++k) s[k] = w.S[k] + ((RW && state_rowwise(R, k)) ? r : e);
    // --- the row-wise second moment: the row mean of (w * g) * g
    T sigma_row = 0;
    if constexpr (RW) {
      T g2;
      if constexpr (R == ADAGRAD) {
        g2 = dot<T, DW>(g, g, D);
      } else {
        T* wg = sb;  // sigma's buffer, filled only below
        for (int64_t j = 0; j < D; ++j) wg[j] = omb2 * g[j];
        g2 = dot<T, DW>(wg, g, D);
      }
      g2 = g2 * inv_d;
      if constexpr (R == ADAGRAD) {
        const T acc = s[0][0] + g2;
        sn[0][0] = acc;
        sigma_row = (std::sqrt(acc) + eps) / clr;
      } else {  // ADAM, AMSGRAD: exp_avg element-wise, exp_avg_sq (and its max) per row
        const T v = b2 * s[1][0] + g2;
        sn[1][0] = v;
        T vs = v;
        if constexpr (R == AMSGRAD) {
          vs = std::max(s[2][0], v);
          sn[2][0] = vs;
        }
        sigma_row = (std::sqrt(vs) / bc2s + eps) / lr;
      }
    }
    // --- moments, sigma, z = u + m - sigma x, s = -sign(z) max(|z| - l1, 0), q for the norm
    for (int64_t j = 0; j < D; ++j) {
      T m, sigma;
      if constexpr (R == SGD) {
        m = g[j];
        sigma = sigma_const;
      } else if constexpr (R == MOMENTUM) {
        const T buf = mom * s[0][j] + g[j];
        sn[0][j] = buf;
        m = buf;
        sigma = sigma_const;
      } else if constexpr (R == ADAGRAD) {
        m = g[j];
        if constexpr (RW) {
          sigma = sigma_row;
        } else {
          const T acc = s[0][j] + g[j] * g[j];
          sn[0][j] = acc;
          sigma = (std::sqrt(acc) + eps) / clr;
        }
      } else {  // ADAM, AMSGRAD
        const T ea = b1 * s[0][j] + omb1 * g[j];
        sn[0][j] = ea;
        m = ea / bc1;
        if constexpr (RW) {
          sigma = sigma_row;
        } else {
          const T v = b2 * s[1][j] + (omb2 * g[j]) * g[j];
          sn[1][j] = v;
          T vs = v;
          if constexpr (R == AMSGRAD) {
            vs = std::max(s[2][j], v);
            sn[2][j] = vs;
          }
          sigma = (std::sqrt(vs) / bc2s + eps) / lr;
        }
      }
      const T z = (d[j] + m) - sigma * x[j];
      const T sv = -std::copysign(std::max(std::abs(z) - l1, T(0)), z);
      dn[j] = z;
      xn[j] = sv;
      sb[j] = sigma;
      if constexpr (EX) {
        const T a = sigma * T(0.5) + l2;
        qb[j] = a > 0 ? sv / std::sqrt(a > 0 ? a : T(1)) : T(0);
      } else {
        qb[j] = sv;
      }
    }
    const T normsq = dot<T, DW>(qb, qb, D);
    // --- group shrink: (norm - t) / norm above the threshold; 1 if the norm overflowed
    const T norm = std::sqrt(normsq);
    T factor;
    if (norm > thresh) {
      factor = std::isinf(norm) ? T(1) : (norm - thresh) / norm;
    } else {
      factor = (thresh == 0) ? T(1) : T(0);
    }
    const T fallback = l1 == 0 ? factor : T(0);  // eps = 0 before any gradient: eps -> 0+
    uint32_t bad = 0, was_nz = 0, now_nz = 0;
    for (int64_t j = 0; j < D; ++j) {
      const T sigma = sb[j];
      const T denom = sigma + l2x2;
      const T xnew = denom > 0 ? xn[j] * factor / (denom > 0 ? denom : T(1)) : fallback * x[j];
      const T dnew = dn[j] + sigma * xnew;  // dual_carry
      xn[j] = xnew;
      dn[j] = dnew;
      bad |= nonfinite_bits(xnew) | nonfinite_bits(dnew);
      was_nz |= static_cast<uint32_t>(x[j] != 0);
      now_nz |= static_cast<uint32_t>(xnew != 0);
    }
    for (int k = 0; k < NS; ++k) {
      const int64_t n = (RW && state_rowwise(R, k)) ? 1 : D;
      for (int64_t j = 0; j < n; ++j) bad |= nonfinite_bits(sn[k][j]);
    }
    if (bad) {  // overflow from finite inputs: the row keeps its values; the caller reports it
      ++w.refused;
      if (w.refused_table < 0) w.refused_table = t;
      continue;
    }
    const bool was_seen = w.seen[r] != 0;
    w.counts[2 * t] += was_seen ? 0 : 1;
    w.counts[2 * t + 1] += static_cast<int64_t>(now_nz != 0) -
                           static_cast<int64_t>(was_seen && was_nz != 0);
    for (int64_t j = 0; j < D; ++j) {
      x[j] = xn[j];
      d[j] = dn[j];
    }
    for (int k = 0; k < NS; ++k) {
      const int64_t n = (RW && state_rowwise(R, k)) ? 1 : D;
      for (int64_t j = 0; j < n; ++j) s[k][j] = sn[k][j];
    }
    w.seen[r] = 1;
    if (w.ix.u) w.ix.relink(r, t, consistent_u(static_cast<float>(norm / sqrt_d), now_nz != 0, h[L21]));
  }
}

template <typename T>
using RowsFn = void (*)(Work<T>&, int64_t, int64_t, int64_t);

template <typename T, Rule R, bool RW, bool EX>
RowsFn<T> pick_width(int64_t D) {
  if constexpr (std::is_same_v<T, float>) {
    switch (D) {  // the common embedding widths get a loop compiled for them
      case 8: return update_rows<T, R, RW, EX, 8>;
      case 16: return update_rows<T, R, RW, EX, 16>;
      case 32: return update_rows<T, R, RW, EX, 32>;
      case 64: return update_rows<T, R, RW, EX, 64>;
      case 128: return update_rows<T, R, RW, EX, kMaxStatic>;
      default: break;
    }
  }
  return update_rows<T, R, RW, EX, 0>;
}

template <typename T, Rule R>
RowsFn<T> pick2(bool rw, bool ex, int64_t D) {
  if constexpr (R == SGD || R == MOMENTUM) {  // no second moment: rowwise is meaningless
    return ex ? pick_width<T, R, false, true>(D) : pick_width<T, R, false, false>(D);
  } else {
    if (rw) return ex ? pick_width<T, R, true, true>(D) : pick_width<T, R, true, false>(D);
    return ex ? pick_width<T, R, false, true>(D) : pick_width<T, R, false, false>(D);
  }
}

template <typename T>
RowsFn<T> pick(Rule r, bool rw, bool ex, int64_t D) {
  switch (r) {
    case SGD: return pick2<T, SGD>(false, ex, D);
    case MOMENTUM: return pick2<T, MOMENTUM>(false, ex, D);
    case ADAGRAD: return pick2<T, ADAGRAD>(rw, ex, D);
    case ADAM: return pick2<T, ADAM>(rw, ex, D);
    case AMSGRAD: return pick2<T, AMSGRAD>(rw, ex, D);
  }
  TORCH_CHECK(false, "unknown rule ", static_cast<int64_t>(r));
}

// Scratch reused across calls on a thread: no allocation (and no page faults) per step.
template <typename T>
struct Scratch {
  std::vector<uint64_t> pairs, tmp;
  std::vector<int64_t> src, urow, utab, gpos, run, count;
  std::vector<T> scale, gsum, buf;
  std::vector<uint8_t> bad;
  void reserve(int64_t n) {
    const size_t m = static_cast<size_t>(n) + 1;
    if (pairs.size() >= m) return;
    for (auto* v : {&pairs, &tmp}) v->resize(m);
    for (auto* v : {&src, &urow, &utab, &gpos, &run}) v->resize(m);
    scale.resize(m);
    bad.resize(m);
  }
};

// Phase B of an update: Algorithm 1 on the U unique rows urow (sorted, grouped by table utab),
// each with its summed gradient at gsum + gpos[u] (bad[u]: skip it). Writes the refused rows and
// the first refusing table into st[1], st[2].
template <typename T>
void update_unique(const int64_t* urow, const int64_t* utab, const int64_t* gpos, const T* gsum,
                   const uint8_t* bad, int64_t U, const int64_t* t_woff, const int64_t* t_roff,
                   const int64_t* t_dims, int64_t max_d, at::Tensor& weights, at::Tensor& dual,
                   at::TensorList states, at::Tensor& seen, const at::Tensor& hp,
                   at::Tensor& counts, at::TensorList index, int64_t rule, bool rowwise,
                   bool exact, Scratch<T>& S, int64_t* st) {
  Work<T> w{};
  w.w_off = t_woff;
  w.row_off = t_roff;
  w.dims = t_dims;
  w.W = weights.data_ptr<T>();
  w.Du = dual.data_ptr<T>();
  w.n_states = static_cast<int>(states.size());
  TORCH_CHECK(w.n_states == n_states_of(static_cast<Rule>(rule)), "state count of the rule");
  for (int k = 0; k < w.n_states; ++k) {
    w.S[k] = states[k].data_ptr<T>();
    w.srw[k] = rowwise && state_rowwise(static_cast<Rule>(rule), k);
  }
  w.seen = seen.data_ptr<uint8_t>();
  w.counts = counts.data_ptr<int64_t>();
  w.H = hp.data_ptr<double>();
  w.ix = make_index(index);
  w.urow = urow;
  w.utab = utab;
  w.gpos = gpos;
  w.gsum = gsum;
  w.bad = bad;
  w.U = U;
  if (S.buf.size() < static_cast<size_t>(max_d) * 7) S.buf.resize(static_cast<size_t>(max_d) * 7);
  w.scratch = S.buf.data();
  for (int64_t u = 0; u < std::min<int64_t>(U, kPrefetch); ++u) w.prefetch(u);
  for (int64_t u0 = 0; u0 < U;) {
    const int64_t t = utab[u0];
    int64_t u1 = u0 + 1;
    while (u1 < U && utab[u1] == t) ++u1;
    pick<T>(static_cast<Rule>(rule), rowwise, exact, t_dims[t])(w, t, u0, u1);
    u0 = u1;
  }
  st[1] = w.refused;
  if (w.refused_table >= 0 && st[2] < 0) st[2] = w.refused_table;
}

template <typename T>
at::Tensor backward_impl(const at::Tensor& grad_out, const at::Tensor& indices,
                         const at::Tensor& offsets, const c10::optional<at::Tensor>& psw,
                         const at::Tensor& feature_table, const at::Tensor& feature_col,
                         const at::Tensor& w_off, const at::Tensor& row_off, const at::Tensor& dims,
                         const at::Tensor& rows, at::Tensor weights, at::Tensor dual,
                         at::TensorList states, at::Tensor seen, const at::Tensor& hp,
                         at::Tensor counts, at::TensorList index, int64_t rule, bool rowwise,
                         bool exact, bool mean_pool, bool skip_nonfinite) {
  const int64_t F = feature_table.numel();
  const int64_t n_bags = offsets.numel() - 1;
  TORCH_CHECK(F > 0 && n_bags % F == 0, "offsets must have F*B+1 entries");
  const int64_t B = n_bags / F;
  const int64_t N = indices.numel();
  TORCH_CHECK(N < (int64_t(1) << 32), "too many indices in one batch");
  const int64_t total_d = grad_out.size(1);
  const T* go = grad_out.data_ptr<T>();
  const int64_t* idx = indices.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const T* w8 = psw.has_value() && psw->defined() ? psw->data_ptr<T>() : nullptr;
  const int64_t* ftab = feature_table.data_ptr<int64_t>();
  const int64_t* fcol = feature_col.data_ptr<int64_t>();
  const int64_t* t_woff = w_off.data_ptr<int64_t>();
  const int64_t* t_roff = row_off.data_ptr<int64_t>();
  const int64_t* t_dims = dims.data_ptr<int64_t>();
  const int64_t* t_rows = rows.data_ptr<int64_t>();
  const int64_t n_tables = dims.numel();
  int64_t total_rows = 0, max_d = 1;
  for (int64_t t = 0; t < n_tables; ++t) {
    total_rows = std::max(total_rows, t_roff[t] + t_rows[t]);
    max_d = std::max(max_d, t_dims[t]);
  }
  std::vector<int64_t> by_row(n_tables);  // tables in row order (sorted rows come grouped so)
  for (int64_t t = 0; t < n_tables; ++t) by_row[t] = t;
  std::sort(by_row.begin(), by_row.end(),
            [&](int64_t a, int64_t b) { return t_roff[a] < t_roff[b]; });
  at::Tensor status = at::zeros({4}, at::kLong);  // code, refused rows, table, bad input rows
  int64_t* st = status.data_ptr<int64_t>();
  st[2] = -1;
  thread_local Scratch<T> scratch_tls;
  Scratch<T>& S = scratch_tls;
  S.reserve(N);
  uint64_t* pairs = S.pairs.data();
  int64_t* src = S.src.data();
  T* scale = S.scale.data();
  // ---- (row, index) pairs; each index's gradient source (its bag's output slice) and scale
  for (int64_t f = 0; f < F; ++f) {
    const int64_t t = ftab[f];
    const int64_t base = t_roff[t], limit = t_rows[t];
    for (int64_t s = 0; s < B; ++s) {
      const int64_t b = f * B + s;
      const int64_t lo = off[b], hi = off[b + 1];
      TORCH_CHECK(lo <= hi && hi <= N, "offsets must be non-decreasing and end at len(indices)");
      const T inv = (mean_pool && hi > lo) ? T(1) / static_cast<T>(hi - lo) : T(1);
      const int64_t col = s * total_d + fcol[f];
      for (int64_t k = lo; k < hi; ++k) {
        const int64_t id = idx[k];
        if (id < 0 || id >= limit) {  // never write out of bounds (the forward checks too)
          st[0] = 2;
          st[2] = t;
          return status;
        }
        pairs[k] = (static_cast<uint64_t>(base + id) << 32) | static_cast<uint64_t>(k);
        src[k] = col;
        scale[k] = w8 ? w8[k] * inv : inv;
      }
    }
  }
  int key_bits = 1;
  while ((int64_t(1) << key_bits) < total_rows) ++key_bits;
  pairs = radix_sort(pairs, S.tmp.data(), N, 32, key_bits, S.count);
  // ---- phase A: unique rows (runs of equal keys), tables, summed gradients, input checks
  int64_t* urow = S.urow.data();
  int64_t* utab = S.utab.data();
  int64_t* gpos = S.gpos.data();
  int64_t* run = S.run.data();
  int64_t U = 0, width_sum = 0, cursor = 0;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t key = static_cast<int64_t>(pairs[i] >> 32);
    if (U > 0 && key == urow[U - 1]) continue;
    while (cursor + 1 < n_tables && t_roff[by_row[cursor + 1]] <= key) ++cursor;
    const int64_t t = by_row[cursor];
    urow[U] = key;
    utab[U] = t;
    gpos[U] = width_sum;
    run[U] = i;
    width_sum += t_dims[t];
    ++U;
  }
  run[U] = N;
  if (S.gsum.size() < static_cast<size_t>(width_sum)) S.gsum.resize(static_cast<size_t>(width_sum));
  T* gsum = S.gsum.data();
  uint8_t* bad = S.bad.data();
  int64_t n_bad = 0;
  for (int64_t u = 0; u < U; ++u) {
    const int64_t D = t_dims[utab[u]];
    T* __restrict gr = gsum + gpos[u];
    {  // the first index writes, the others add (in index order, as the eager path sums)
      const int64_t k = static_cast<int64_t>(pairs[run[u]] & 0xffffffffULL);
      const T* __restrict gsrc = go + src[k];
      const T sc = scale[k];
      for (int64_t c = 0; c < D; ++c) gr[c] = T(0) + gsrc[c] * sc;
    }
    for (int64_t i = run[u] + 1; i < run[u + 1]; ++i) {
      const int64_t k = static_cast<int64_t>(pairs[i] & 0xffffffffULL);
      const T* __restrict gsrc = go + src[k];
      const T sc = scale[k];
      for (int64_t c = 0; c < D; ++c) gr[c] += gsrc[c] * sc;
    }
    uint32_t b = 0;
    for (int64_t c = 0; c < D; ++c) b |= nonfinite_bits(gr[c]);
    bad[u] = static_cast<uint8_t>(b);
    if (b) {
      ++n_bad;
      if (st[2] < 0) st[2] = utab[u];
    }
  }
  st[3] = n_bad;
  if (n_bad && !skip_nonfinite) {
    st[0] = 1;  // refused: nothing was modified
    return status;
  }
  // ---- phase B: per table (its unique rows are contiguous), a loop compiled for it
  update_unique<T>(urow, utab, gpos, gsum, bad, U, t_woff, t_roff, t_dims, max_d, weights, dual,
                   states, seen, hp, counts, index, rule, rowwise, exact, S, st);
  return status;
}

at::Tensor group_tbe_backward(const at::Tensor& grad_out, const at::Tensor& indices,
                              const at::Tensor& offsets, const c10::optional<at::Tensor>& psw,
                              const at::Tensor& feature_table, const at::Tensor& feature_col,
                              const at::Tensor& w_off, const at::Tensor& row_off,
                              const at::Tensor& dims, const at::Tensor& rows, at::Tensor weights,
                              at::Tensor dual, at::TensorList states,
                              const at::Tensor& state_rowwise, at::Tensor seen,
                              const at::Tensor& hp, at::Tensor counts, at::TensorList index,
                              int64_t rule, bool rowwise, bool exact, bool mean_pool,
                              bool skip_nonfinite) {
  (void)state_rowwise;  // the layout follows from the rule and `rowwise`
  TORCH_CHECK(grad_out.is_contiguous() && weights.is_contiguous() && dual.is_contiguous(),
              "contiguous tensors expected");
  TORCH_CHECK(hp.scalar_type() == at::kDouble && hp.size(1) == NCOL, "hp must be double [T, ",
              static_cast<int64_t>(NCOL), "]");
  TORCH_CHECK(rule >= SGD && rule <= AMSGRAD, "unknown rule ", rule);
  if (weights.scalar_type() == at::kFloat) {
    return backward_impl<float>(grad_out, indices, offsets, psw, feature_table, feature_col, w_off,
                                row_off, dims, rows, weights, dual, states, seen, hp, counts, index,
                                rule, rowwise, exact, mean_pool, skip_nonfinite);
  }
  TORCH_CHECK(weights.scalar_type() == at::kDouble, "float32 or float64 tables expected");
  return backward_impl<double>(grad_out, indices, offsets, psw, feature_table, feature_col, w_off,
                               row_off, dims, rows, weights, dual, states, seen, hp, counts, index,
                               rule, rowwise, exact, mean_pool, skip_nonfinite);
}

// The prox re-applied to the seen kernel rows `rows` (sorted) with the current hyperparameters
// `hp`: phase B with a zero gradient, which for SGD and Adagrad leaves every moment as it is
// (m = 0, the squares' sum unchanged), so that the step is exactly reprox (z recovered from the
// carried dual, the prox, the dual carried again); counts and index follow as in an update.
// Returns [0, refused rows, table, 0]. O(len(rows) x D).
template <typename T>
at::Tensor reprox_impl(const at::Tensor& rows, const at::Tensor& w_off, const at::Tensor& row_off,
                       const at::Tensor& dims, const at::Tensor& trows, at::Tensor weights,
                       at::Tensor dual, at::TensorList states, at::Tensor seen,
                       const at::Tensor& hp, at::Tensor counts, at::TensorList index,
                       int64_t rule, bool rowwise, bool exact) {
  TORCH_CHECK(rule == SGD || rule == ADAGRAD,
              "reprox: a zero-gradient step is the prox alone only for SGD and Adagrad");
  const int64_t* t_woff = w_off.data_ptr<int64_t>();
  const int64_t* t_roff = row_off.data_ptr<int64_t>();
  const int64_t* t_dims = dims.data_ptr<int64_t>();
  const int64_t* t_rows = trows.data_ptr<int64_t>();
  const int64_t n_tables = dims.numel();
  int64_t max_d = 1;
  for (int64_t t = 0; t < n_tables; ++t) max_d = std::max(max_d, t_dims[t]);
  std::vector<int64_t> by_row(n_tables);
  for (int64_t t = 0; t < n_tables; ++t) by_row[t] = t;
  std::sort(by_row.begin(), by_row.end(),
            [&](int64_t a, int64_t b) { return t_roff[a] < t_roff[b]; });
  at::Tensor status = at::zeros({4}, at::kLong);
  int64_t* st = status.data_ptr<int64_t>();
  st[2] = -1;
  thread_local Scratch<T> scratch_tls;
  Scratch<T>& S = scratch_tls;
  const int64_t U = rows.numel();
  S.reserve(U);
  const int64_t* r = rows.data_ptr<int64_t>();
  int64_t* urow = S.urow.data();
  int64_t* utab = S.utab.data();
  int64_t* gpos = S.gpos.data();
  uint8_t* bad = S.bad.data();
  int64_t cursor = 0;
  for (int64_t u = 0; u < U; ++u) {
    TORCH_CHECK(u == 0 || r[u] > r[u - 1], "reprox: rows must be sorted and unique");
    while (cursor + 1 < n_tables && t_roff[by_row[cursor + 1]] <= r[u]) ++cursor;
    const int64_t t = by_row[cursor];
    TORCH_CHECK(r[u] >= t_roff[t] && r[u] < t_roff[t] + t_rows[t], "reprox: row out of range");
    urow[u] = r[u];
    utab[u] = t;
    gpos[u] = 0;  // every row reads the same zero gradient
    bad[u] = 0;
  }
  if (S.gsum.size() < static_cast<size_t>(max_d)) S.gsum.resize(static_cast<size_t>(max_d));
  std::fill(S.gsum.begin(), S.gsum.begin() + max_d, T(0));
  update_unique<T>(urow, utab, gpos, S.gsum.data(), bad, U, t_woff, t_roff, t_dims, max_d,
                   weights, dual, states, seen, hp, counts, index, rule, rowwise, exact, S, st);
  return status;
}

at::Tensor group_tbe_reprox(const at::Tensor& rows, const at::Tensor& w_off,
                            const at::Tensor& row_off, const at::Tensor& dims,
                            const at::Tensor& trows, at::Tensor weights, at::Tensor dual,
                            at::TensorList states, at::Tensor seen, const at::Tensor& hp,
                            at::Tensor counts, at::TensorList index, int64_t rule, bool rowwise,
                            bool exact) {
  TORCH_CHECK(weights.is_contiguous() && dual.is_contiguous(), "contiguous tensors expected");
  TORCH_CHECK(hp.scalar_type() == at::kDouble && hp.size(1) == NCOL, "hp must be double [T, ",
              static_cast<int64_t>(NCOL), "]");
  if (weights.scalar_type() == at::kFloat)
    return reprox_impl<float>(rows, w_off, row_off, dims, trows, weights, dual, states, seen, hp,
                              counts, index, rule, rowwise, exact);
  TORCH_CHECK(weights.scalar_type() == at::kDouble, "float32 or float64 tables expected");
  return reprox_impl<double>(rows, w_off, row_off, dims, trows, weights, dual, states, seen, hp,
                             counts, index, rule, rowwise, exact);
}

// Relink rows[i] (local table tables[i]) into the bucket of values[i], writing the value to the
// index's shrink array: O(len(rows)). The index entry point of every writer but the native update.
void shrink_index_relink(const at::Tensor& rows, const at::Tensor& tables,
                         const at::Tensor& values, at::TensorList index) {
  const Index ix = make_index(index);
  TORCH_CHECK(ix.u != nullptr, "an index is needed");
  const int64_t n = rows.numel();
  TORCH_CHECK(tables.numel() == n && values.numel() == n, "rows, tables, values: same length");
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t* t = tables.data_ptr<int64_t>();
  const float* v = values.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) ix.relink(r[i], t[i], v[i]);
}

// f(r) for every row linked into buckets [lo, hi] of table t whose value u lies in (a, z]. A
// bucket with runs walks only its runs that meet (a, z]: O(rows of the runs and of the buckets
// without runs walked + buckets + kFine per bucket with runs). f must not relink.
template <typename F>
void walk_between(const Index& ix, int64_t t, int64_t lo, int64_t hi, double a, double z, F&& f) {
  const auto take = [&](int32_t r) {
    const double v = ix.u[r];
    if (v > a && v <= z) f(r);
  };
  for (int64_t b = std::max<int64_t>(lo, 0); b <= std::min<int64_t>(hi, kBuckets - 1); ++b) {
    if (ix.hist[t * kBuckets + b] == 0) continue;
    if (ix.block(t, b) < 0) {
      ix.walk(t, b, take);
      continue;
    }
    for (int64_t j = 0; j < kFine; ++j) {
      // run j holds the float32 values of bit patterns first..first + 2^kFineShift - 1
      const uint32_t first = (static_cast<uint32_t>(b) << kShift) + 1u +
                             (static_cast<uint32_t>(j) << kFineShift);
      const uint32_t last = first + (1u << kFineShift) - 1u;
      float lo_v, hi_v;
      std::memcpy(&lo_v, &first, 4);
      std::memcpy(&hi_v, &last, 4);
      const bool zeros = b == 0 && j == 0;  // also holds u <= 0
      if (!zeros && (static_cast<double>(hi_v) <= a || static_cast<double>(lo_v) > z)) continue;
      ix.walk_run(t, b, j, take);
    }
  }
}

// The rows linked into buckets [lo, hi] of table t whose value u lies in (a, b], for every row
// (t, lo, hi) of `ranges` ([K, 3] int64) and (a, b) of `bounds` ([K, 2] float64), concatenated
// (walk_between).
at::Tensor shrink_index_rows(const at::Tensor& ranges, const at::Tensor& bounds,
                             at::TensorList index) {
  const Index ix = make_index(index);
  TORCH_CHECK(ix.u != nullptr, "an index is needed");
  const int64_t K = ranges.size(0);
  TORCH_CHECK(bounds.numel() == 2 * K, "bounds: [K, 2]");
  const int64_t* q = ranges.data_ptr<int64_t>();
  const double* lim = bounds.data_ptr<double>();
  std::vector<int64_t> out;
  for (int64_t k = 0; k < K; ++k)
    walk_between(ix, q[3 * k], q[3 * k + 1], q[3 * k + 2], lim[2 * k], lim[2 * k + 1],
                 [&](int32_t r) { out.push_back(r); });
  at::Tensor res = at::empty({static_cast<int64_t>(out.size())}, at::kLong);
  std::copy(out.begin(), out.end(), res.data_ptr<int64_t>());
  return res;
}

// The prox re-applied (a zero-gradient update, SGD and Adagrad: as reprox_impl) to the seen
// rows linked into buckets [lo, hi] of table t whose stored u lies in (a, b], for every
// (t, lo, hi) of `ranges` ([K, 3] int64) and (a, b) of `bounds` ([K, 2] float64): the rows are
// collected by the walk (walk_between) and updated in the walk's order, grouped by table -- no
// sort (each row's step reads and writes only that row, its table's counts and the index, so
// the order changes only the index's inner layout -- the order of its lists, which crowded
// buckets hold a block -- never a value, a count or the rows of a bucket or run; a linked row
// is always seen: the index links only seen rows, and rebuilds after any outside write).
// Returns int64 [2]: rows re-applied, rows refused (a non-finite result: the row keeps its
// values). O(rows of the runs walked + rows re-applied x D).
template <typename T>
at::Tensor reprox_between_impl(const at::Tensor& ranges, const at::Tensor& bounds,
                               const at::Tensor& w_off, const at::Tensor& row_off,
                               const at::Tensor& dims, at::Tensor weights, at::Tensor dual,
                               at::TensorList states, at::Tensor seen, const at::Tensor& hp,
                               at::Tensor counts, at::TensorList index, int64_t rule,
                               bool rowwise, bool exact) {
  TORCH_CHECK(rule == SGD || rule == ADAGRAD,
              "reprox: a zero-gradient step is the prox alone only for SGD and Adagrad");
  const Index ix = make_index(index);
  TORCH_CHECK(ix.u != nullptr, "an index is needed");
  const int64_t K = ranges.size(0);
  TORCH_CHECK(bounds.numel() == 2 * K, "bounds: [K, 2]");
  const int64_t* q = ranges.data_ptr<int64_t>();
  const double* lim = bounds.data_ptr<double>();
  const int64_t n_tables = dims.numel();
  const int64_t* t_dims = dims.data_ptr<int64_t>();
  int64_t max_d = 1;
  for (int64_t t = 0; t < n_tables; ++t) max_d = std::max(max_d, t_dims[t]);
  thread_local Scratch<T> scratch_tls;
  Scratch<T>& S = scratch_tls;
  std::vector<int64_t>& urow = S.src;
  std::vector<int64_t>& utab = S.run;
  urow.clear();
  utab.clear();
  for (int64_t k = 0; k < K; ++k) {
    const int64_t t = q[3 * k];
    TORCH_CHECK(t >= 0 && t < n_tables, "reprox_between: table out of range");
    walk_between(ix, t, q[3 * k + 1], q[3 * k + 2], lim[2 * k], lim[2 * k + 1],
                 [&](int32_t r) {
                   urow.push_back(r);
                   utab.push_back(t);
                 });
  }
  const int64_t U = static_cast<int64_t>(urow.size());
  at::Tensor out = at::zeros({2}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  o[0] = U;
  if (U == 0) return out;
  S.gpos.assign(static_cast<size_t>(U), 0);  // every row reads the same zero gradient
  S.bad.assign(static_cast<size_t>(U), 0);
  if (S.gsum.size() < static_cast<size_t>(max_d)) S.gsum.resize(static_cast<size_t>(max_d));
  std::fill(S.gsum.begin(), S.gsum.begin() + max_d, T(0));
  int64_t st[4] = {0, 0, -1, 0};
  update_unique<T>(urow.data(), utab.data(), S.gpos.data(), S.gsum.data(), S.bad.data(), U,
                   w_off.data_ptr<int64_t>(), row_off.data_ptr<int64_t>(), t_dims, max_d,
                   weights, dual, states, seen, hp, counts, index, rule, rowwise, exact, S, st);
  o[1] = st[1];
  return out;
}

at::Tensor group_tbe_reprox_between(const at::Tensor& ranges, const at::Tensor& bounds,
                                    const at::Tensor& w_off, const at::Tensor& row_off,
                                    const at::Tensor& dims, at::Tensor weights, at::Tensor dual,
                                    at::TensorList states, at::Tensor seen, const at::Tensor& hp,
                                    at::Tensor counts, at::TensorList index, int64_t rule,
                                    bool rowwise, bool exact) {
  TORCH_CHECK(weights.is_contiguous() && dual.is_contiguous(), "contiguous tensors expected");
  TORCH_CHECK(hp.scalar_type() == at::kDouble && hp.size(1) == NCOL, "hp must be double [T, ",
              static_cast<int64_t>(NCOL), "]");
  TORCH_CHECK(ranges.scalar_type() == at::kLong && bounds.scalar_type() == at::kDouble,
              "ranges int64, bounds float64");
  if (weights.scalar_type() == at::kFloat)
    return reprox_between_impl<float>(ranges, bounds, w_off, row_off, dims, weights, dual, states,
                                      seen, hp, counts, index, rule, rowwise, exact);
  TORCH_CHECK(weights.scalar_type() == at::kDouble, "float32 or float64 tables expected");
  return reprox_between_impl<double>(ranges, bounds, w_off, row_off, dims, weights, dual, states,
                                     seen, hp, counts, index, rule, rowwise, exact);
}

// The rows of bucket b of table t per run: int64 [kFine], out[j] counting the rows whose u has a
// bit pattern in (b << kShift) + 1 + j * 2^kFineShift + [0, 2^kFineShift) (u <= 0, in bucket 0,
// counts in run 0). O(kFine) for a bucket with runs, else O(rows of the bucket) (< split).
at::Tensor shrink_index_runs(int64_t t, int64_t b, at::TensorList index) {
  const Index ix = make_index(index);
  TORCH_CHECK(ix.u != nullptr, "an index is needed");
  TORCH_CHECK(b >= 0 && b < kBuckets, "bucket out of range");
  at::Tensor out = at::zeros({kFine}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  const int32_t k = ix.block(t, b);
  if (k >= 0) {
    std::copy_n(ix.fhist + static_cast<int64_t>(k) * kFine, kFine, o);
  } else {
    ix.walk(t, b, [&](int32_t r) { ++o[ix.bkt[r] & (kFine - 1)]; });
  }
  return out;
}

// The values of the rows in run j of bucket b of table t, as a count per float32 value: out[i]
// counts the rows whose u has the bit pattern (b << kShift) + 1 + j * 2^kFineShift + i (u <= 0
// counts as i = 0 of run 0). int64 [2^kFineShift]; O(rows of the run) for a bucket with runs,
// else O(rows of the bucket).
at::Tensor shrink_index_patterns(int64_t t, int64_t b, int64_t j, at::TensorList index) {
  const Index ix = make_index(index);
  TORCH_CHECK(ix.u != nullptr, "an index is needed");
  TORCH_CHECK(b >= 0 && b < kBuckets && j >= 0 && j < kFine, "bucket or run out of range");
  constexpr int64_t P = int64_t(1) << kFineShift;
  at::Tensor out = at::zeros({P}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  const uint32_t base = (static_cast<uint32_t>(b) << kShift) + 1u +
                        (static_cast<uint32_t>(j) << kFineShift);
  ix.walk_run(t, b, j, [&](int32_t r) {
    const uint32_t bits = shrink_bits(ix.u[r]);
    ++o[bits >= base ? std::min<int64_t>(bits - base, P - 1) : 0];
  });
  return out;
}

// A zero-filled CPU tensor in 2 MiB-aligned memory advised for transparent huge pages: the
// random row accesses of a large table then miss the TLB far less often. A plain allocation
// below 2 MiB or where the aligned allocation fails.
at::Tensor huge_zeros(int64_t numel, at::ScalarType dtype) {
  const int64_t itemsize = static_cast<int64_t>(c10::elementSize(dtype));
  const size_t bytes = static_cast<size_t>(std::max<int64_t>(numel, 1) * itemsize);
  constexpr size_t kHuge = size_t(2) << 20;
  if (bytes < kHuge) return at::zeros({numel}, at::TensorOptions().dtype(dtype));
  const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
  void* ptr = nullptr;
  if (posix_memalign(&ptr, kHuge, rounded) != 0 || ptr == nullptr)
    return at::zeros({numel}, at::TensorOptions().dtype(dtype));
#ifdef MADV_HUGEPAGE
  madvise(ptr, rounded, MADV_HUGEPAGE);
#endif
  std::memset(ptr, 0, rounded);  // fault the pages in now (as huge pages where granted)
  return at::from_blob(ptr, {numel}, [](void* p) { free(p); }, at::TensorOptions().dtype(dtype));
}

}  // namespace

TORCH_LIBRARY(lightning_sgl, m) {
  m.def("huge_zeros(int numel, ScalarType dtype) -> Tensor");
  m.def(
      "group_tbe_backward(Tensor grad_out, Tensor indices, Tensor offsets, Tensor? "
      "per_sample_weights, Tensor feature_table, Tensor feature_col, Tensor w_off, Tensor "
      "row_off, Tensor dims, Tensor rows, Tensor(a!) weights, Tensor(b!) dual, Tensor(c!)[] "
      "states, Tensor state_rowwise, Tensor(d!) seen, Tensor hp, Tensor(e!) counts, Tensor(f!)[] "
      "index, int rule, bool rowwise, bool exact, bool mean_pool, bool skip_nonfinite) -> Tensor");
  m.def(
      "group_tbe_reprox(Tensor rows, Tensor w_off, Tensor row_off, Tensor dims, Tensor rows_per_table, "
      "Tensor(a!) weights, Tensor(b!) dual, Tensor(c!)[] states, Tensor(d!) seen, Tensor hp, "
      "Tensor(e!) counts, Tensor(f!)[] index, int rule, bool rowwise, bool exact) -> Tensor");
  m.def(
      "group_tbe_reprox_between(Tensor ranges, Tensor bounds, Tensor w_off, Tensor row_off, "
      "Tensor dims, Tensor(a!) weights, Tensor(b!) dual, "
      "Tensor(c!)[] states, Tensor(d!) seen, Tensor hp, Tensor(e!) counts, Tensor(f!)[] index, "
      "int rule, bool rowwise, bool exact) -> Tensor");
  m.def("shrink_index_relink(Tensor rows, Tensor tables, Tensor values, Tensor(a!)[] index) -> ()");
  m.def("shrink_index_rows(Tensor ranges, Tensor bounds, Tensor[] index) -> Tensor");
  m.def("shrink_index_runs(int table, int bucket, Tensor[] index) -> Tensor");
  m.def("shrink_index_patterns(int table, int bucket, int run, Tensor[] index) -> Tensor");
}

TORCH_LIBRARY_IMPL(lightning_sgl, CPU, m) {
  m.impl("group_tbe_backward", &group_tbe_backward);
  m.impl("group_tbe_reprox", &group_tbe_reprox);
  m.impl("group_tbe_reprox_between", &group_tbe_reprox_between);
  m.impl("shrink_index_relink", &shrink_index_relink);
  m.impl("shrink_index_rows", &shrink_index_rows);
  m.impl("shrink_index_runs", &shrink_index_runs);
  m.impl("shrink_index_patterns", &shrink_index_patterns);
}

TORCH_LIBRARY_IMPL(lightning_sgl, CompositeExplicitAutograd, m) {
  m.impl("huge_zeros", &huge_zeros);
}

// A Python module, so that `import torchrec_ext._C` loads the library (and registers the ops).
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
