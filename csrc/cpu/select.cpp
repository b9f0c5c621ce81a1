// CPU top-k selection and gather/scatter of points, forward and backward (fastfuse._cpu_select).
//
// Points are the flat positions l = h·W + w of a (B, C, H, W) map (a (B, C, L) sequence comes in
// as H = 1). Maps are read through their four element strides, so a non-contiguous input costs
// no copy; every output is contiguous. Each call first turns the (B, K) slots into element
// offsets once (a slot that is invalid gets -1, an index outside [0, L) in a valid slot is
// reported to the launcher, which raises the op's IndexError, before anything is written). Work is
// then split by (b, c) rows: a row of the output is owned by one thread, and within a row the
// slots are applied in ascending k, so duplicate indices sum in a fixed order ("add") and the
// last valid slot wins ("replace") without atomics, whatever the thread count.
//
// Sums (gather_sum, scatter "add", add_scatter, the gather's adjoint) are taken in float (double
// for float64) and rounded once; copies (gather, scatter "replace" and its backward) move the
// elements' bits, so they serve every dtype of a given size.
//
// Selection orders points by an unsigned key of the score (NaN above +inf, -0.0 tied with +0.0,
// as fastfuse.reference.select) and finds the count-th smallest key by a radix select over
// 11-bit digits; one more pass takes every point below it and, in index order, as many of the
// points equal to it as still fit (ties toward the lower index), which yields the selection in
// ascending index order directly.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace py = pybind11;

#include "cpu_common.h"  // FASTFUSE_CPU_CLONES

namespace {

// ------------------------------------------------------------------------------ element types

struct Bf16 {
  uint16_t bits;
};
using Half = _Float16;

template <typename S>
using Acc = typename std::conditional<std::is_same<S, double>::value, double, float>::type;

inline float widen(float x) { return x; }
inline double widen(double x) { return x; }
inline float widen(Half x) { return float(x); }
inline float widen(Bf16 x) {
  const uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename S>
inline S narrow(Acc<S> x) {
  return S(x);
}
template <>
inline Bf16 narrow<Bf16>(float x) {
  // Round to nearest even, NaN to the canonical quiet NaN: torch's float -> bfloat16.
  if (std::isnan(x)) return Bf16{0x7fc0};
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return Bf16{uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

// dtype codes shared with fastfuse/cpu/select.py
enum Dtype { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Threads for a call touching `work` elements: small calls stay on the calling thread, where an
// OpenMP fork and barrier would cost more than they save (much more on a loaded machine).
inline int threads_for(int64_t work, int nthreads) { return work < (int64_t(1) << 16) ? 1 : nthreads; }

// ------------------------------------------------------------------------------ layouts

struct Map {  // a (B, C, H, W) tensor read through its element strides
  uintptr_t data;
  int64_t sb, sc, sh, sw;
};

Map make_map(uintptr_t data, const std::vector<int64_t>& strides) {
  return Map{data, strides.at(0), strides.at(1), strides.at(2), strides.at(3)};
}

struct Slots {  // idx (B, K) int64 and valid (B, K) bool (null: every slot valid), contiguous
  const int64_t* idx;
  const uint8_t* valid;
  int64_t B, K;
};

// Element offsets of every slot in a map with strides (sh, sw) and width W: -1 for an invalid slot.
// Returns the flat position b·K + k of the first valid slot whose index is outside [0, H·W), or -1.
int64_t slot_offsets(const Slots& s, int64_t H, int64_t W, int64_t sh, int64_t sw, std::vector<int64_t>& off) {
  const int64_t L = H * W, n = s.B * s.K;
  off.resize(n);
  const bool flat = H == 1 || sh == W * sw;  // the points are evenly spaced: no division
  for (int64_t j = 0; j < n; ++j) {
    if (s.valid != nullptr && !s.valid[j]) {
      off[j] = -1;
      continue;
    }
    const int64_t i = s.idx[j];
    if (i < 0 || i >= L) return j;
    off[j] = flat ? i * sw : (i / W) * sh + (i % W) * sw;
  }
  return -1;
}

// Reads row (b, c) of a map into `dst` (H·W elements, contiguous), converting to D.
template <typename D, typename S>
inline void read_row(const Map& m, int64_t b, int64_t c, int64_t H, int64_t W, D* dst) {
  const S* src = reinterpret_cast<const S*>(m.data) + b * m.sb + c * m.sc;
  if (m.sw == 1 && (H == 1 || m.sh == W)) {  // a contiguous row: one unit-stride loop
#pragma omp simd
    for (int64_t l = 0; l < H * W; ++l) dst[l] = D(widen(src[l]));
    return;
  }
  for (int64_t h = 0; h < H; ++h) {
    const S* r = src + h * m.sh;
    D* d = dst + h * W;
    if (m.sw == 1) {
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) d[w] = D(widen(r[w]));
    } else {
      for (int64_t w = 0; w < W; ++w) d[w] = D(widen(r[w * m.sw]));
    }
  }
}

// The same for raw element bits (R is an unsigned integer of the element's size).
template <typename R>
inline void copy_row(const Map& m, int64_t b, int64_t c, int64_t H, int64_t W, R* dst) {
  const R* src = reinterpret_cast<const R*>(m.data) + b * m.sb + c * m.sc;
  if (m.sw == 1 && (H == 1 || m.sh == W)) {  // a contiguous row: one copy
    std::memcpy(dst, src, H * W * sizeof(R));
    return;
  }
  for (int64_t h = 0; h < H; ++h) {
    const R* r = src + h * m.sh;
    R* d = dst + h * W;
    if (m.sw == 1) {
      std::memcpy(d, r, W * sizeof(R));
    } else {
      for (int64_t w = 0; w < W; ++w) d[w] = r[w * m.sw];
    }
  }
}

struct Shape {
  int64_t B, C, H, W, K;
  int64_t L() const { return H * W; }
};

// ------------------------------------------------------------------------------ gather

template <typename R>
FASTFUSE_CPU_CLONES void gather_rows(const Map& feat, const Shape& s, const int64_t* off, R* out, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(threads_for(s.B * s.C * s.K, nthreads))
  for (int64_t row = 0; row < s.B * s.C; ++row) {
    const int64_t b = row / s.C, c = row % s.C;
    const R* src = reinterpret_cast<const R*>(feat.data) + b * feat.sb + c * feat.sc;
    const int64_t* o = off + b * s.K;
    R* dst = out + row * s.K;
    for (int64_t k = 0; k < s.K; ++k) dst[k] = o[k] >= 0 ? src[o[k]] : R(0);
  }
}

template <typename S>
FASTFUSE_CPU_CLONES void gather_sum_rows(const Map& a, const Map& b2, const Shape& s, const int64_t* oa,
                                         const int64_t* ob, S* out, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(threads_for(2 * s.B * s.C * s.K, nthreads))
  for (int64_t row = 0; row < s.B * s.C; ++row) {
    const int64_t b = row / s.C, c = row % s.C;
    const S* pa = reinterpret_cast<const S*>(a.data) + b * a.sb + c * a.sc;
    const S* pb = reinterpret_cast<const S*>(b2.data) + b * b2.sb + c * b2.sc;
    const int64_t *ra = oa + b * s.K, *rb = ob + b * s.K;
    S* dst = out + row * s.K;
    for (int64_t k = 0; k < s.K; ++k)
      dst[k] = ra[k] >= 0 ? narrow<S>(widen(pa[ra[k]]) + widen(pb[rb[k]])) : narrow<S>(Acc<S>(0));
  }
}

// d feat of the gather: grad (B, C, K) summed into a zero (B, C, L) row by row, slots in order.
template <typename S>
FASTFUSE_CPU_CLONES void gather_adjoint_rows(const Map& grad, const Shape& s, const int64_t* pos, S* out,
                                             int nthreads) {
  const int64_t L = s.L();
#pragma omp parallel num_threads(threads_for(s.B * s.C * (L + s.K), nthreads))
  {
    std::vector<Acc<S>> scratch(std::is_same<S, Acc<S>>::value ? 0 : L);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < s.B * s.C; ++row) {
      const int64_t b = row / s.C, c = row % s.C;
      const S* g = reinterpret_cast<const S*>(grad.data) + b * grad.sb + c * grad.sc;
      const int64_t* p = pos + b * s.K;
      Acc<S>* acc = std::is_same<S, Acc<S>>::value ? reinterpret_cast<Acc<S>*>(out + row * L) : scratch.data();
      std::fill(acc, acc + L, Acc<S>(0));
      for (int64_t k = 0; k < s.K; ++k)
        if (p[k] >= 0) acc[p[k]] += widen(g[k * grad.sw]);
      if (!std::is_same<S, Acc<S>>::value) {
        S* dst = out + row * L;
        for (int64_t l = 0; l < L; ++l) dst[l] = narrow<S>(acc[l]);
      }
    }
  }
}

// ------------------------------------------------------------------------------ scatter

// out = (base [+ base2]) with values added at the slots, summed in Acc<S> and rounded once.
template <typename S>
FASTFUSE_CPU_CLONES void scatter_add_rows(const Map& base, const Map* base2, const Map& values, const Shape& s,
                                          const int64_t* pos, S* out, int nthreads) {
  const int64_t L = s.L();
  constexpr bool kInPlace = std::is_same<S, Acc<S>>::value;
#pragma omp parallel num_threads(threads_for(s.B * s.C * L, nthreads))
  {
    // fp32/float64 sum in the output row (the scratch row then holds base2); half types in scratch.
    std::vector<Acc<S>> scratch(kInPlace && base2 == nullptr ? 0 : L);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < s.B * s.C; ++row) {
      const int64_t b = row / s.C, c = row % s.C;
      S* dst = out + row * L;
      Acc<S>* acc = kInPlace ? reinterpret_cast<Acc<S>*>(dst) : scratch.data();
      read_row<Acc<S>, S>(base, b, c, s.H, s.W, acc);
      if (base2 != nullptr && kInPlace) {
        read_row<Acc<S>, S>(*base2, b, c, s.H, s.W, scratch.data());
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) acc[l] += scratch[l];
      } else if (base2 != nullptr) {
        const S* src = reinterpret_cast<const S*>(base2->data) + b * base2->sb + c * base2->sc;
        for (int64_t h = 0; h < s.H; ++h)
          for (int64_t w = 0; w < s.W; ++w) acc[h * s.W + w] += widen(src[h * base2->sh + w * base2->sw]);
      }
      const S* v = reinterpret_cast<const S*>(values.data) + b * values.sb + c * values.sc;
      const int64_t* p = pos + b * s.K;
      for (int64_t k = 0; k < s.K; ++k)
        if (p[k] >= 0) acc[p[k]] += widen(v[k * values.sw]);
      if (!kInPlace) {
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) dst[l] = narrow<S>(acc[l]);
      }
    }
  }
}

// out = base with values written at the slots, the last valid slot of a duplicate winning.
template <typename R>
FASTFUSE_CPU_CLONES void scatter_replace_rows(const Map& base, const Map& values, const Shape& s, const int64_t* pos,
                                              R* out, int nthreads) {
  const int64_t L = s.L();
#pragma omp parallel for schedule(static) num_threads(threads_for(s.B * s.C * L, nthreads))
  for (int64_t row = 0; row < s.B * s.C; ++row) {
    const int64_t b = row / s.C, c = row % s.C;
    R* dst = out + row * L;
    copy_row<R>(base, b, c, s.H, s.W, dst);
    const R* v = reinterpret_cast<const R*>(values.data) + b * values.sb + c * values.sc;
    const int64_t* p = pos + b * s.K;
    for (int64_t k = 0; k < s.K; ++k)
      if (p[k] >= 0) dst[p[k]] = v[k * values.sw];
  }
}

// Backward of "replace": d base is grad with the written points zeroed; a slot gets the gradient
// of its point only if it won the point. `written` (B, L) and `won` (B, K) come from slot_winners.
template <typename R>
FASTFUSE_CPU_CLONES void scatter_replace_adjoint_rows(const Map& grad, const Shape& s, const int64_t* off,
                                                      const uint8_t* written, const uint8_t* won, R* dbase,
                                                      R* dvalues, int nthreads) {
  const int64_t L = s.L();
#pragma omp parallel for schedule(static) num_threads(threads_for(s.B * s.C * L, nthreads))
  for (int64_t row = 0; row < s.B * s.C; ++row) {
    const int64_t b = row / s.C, c = row % s.C;
    R* dst = dbase + row * L;
    copy_row<R>(grad, b, c, s.H, s.W, dst);
    const uint8_t* wr = written + b * L;
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) dst[l] = wr[l] ? R(0) : dst[l];
    const R* g = reinterpret_cast<const R*>(grad.data) + b * grad.sb + c * grad.sc;
    const int64_t* o = off + b * s.K;
    const uint8_t* wn = won + b * s.K;
    R* dv = dvalues + row * s.K;
    for (int64_t k = 0; k < s.K; ++k) dv[k] = wn[k] ? g[o[k]] : R(0);
  }
}

// Which points a "replace" writes and which slots win them (the highest valid slot of each point).
void slot_winners(const Slots& sl, int64_t L, const std::vector<int64_t>& pos, std::vector<uint8_t>& written,
                  std::vector<uint8_t>& won) {
  written.assign(sl.B * L, 0);
  won.assign(sl.B * sl.K, 0);
  for (int64_t b = 0; b < sl.B; ++b) {
    uint8_t* wr = written.data() + b * L;
    for (int64_t k = sl.K - 1; k >= 0; --k) {  // from the last slot: the first seen wins
      const int64_t p = pos[b * sl.K + k];
      if (p < 0) continue;
      won[b * sl.K + k] = !wr[p];
      wr[p] = 1;
    }
  }
}

// ------------------------------------------------------------------------------ select

template <typename U>
struct KeyOf;
template <>
struct KeyOf<uint32_t> {
  using F = float;
  static constexpr uint32_t kNaN = 0x7fc00000u;
};
template <>
struct KeyOf<uint64_t> {
  using F = double;
  static constexpr uint64_t kNaN = 0x7ff8000000000000ull;
};

// Monotone unsigned key: x < y  <=>  key(x) < key(y); NaN (one canonical +NaN) above +inf, -0 = +0.
template <typename U>
inline U order_key(typename KeyOf<U>::F x) {
  x = x + typename KeyOf<U>::F(0);  // -0.0 + 0.0 is +0.0: the zeros tie
  U u;
  std::memcpy(&u, &x, sizeof u);
  if (x != x) u = KeyOf<U>::kNaN;
  constexpr U kSign = U(1) << (sizeof(U) * 8 - 1);
  return (u & kSign) ? U(~u) : U(u | kSign);
}

// The rank-th smallest (1-based) of keys[0, n); on return `rank` is its rank among the keys equal to it.
template <typename U>
U radix_select(const U* keys, int64_t n, int64_t& rank, std::vector<U>& buf_a, std::vector<U>& buf_b) {
  constexpr int kDigit = 11;
  const U* cur = keys;
  int64_t m = n;
  std::vector<int64_t> hist(int64_t(1) << kDigit);
  for (int shift = int(sizeof(U) * 8); shift > 0;) {
    const int width = std::min(kDigit, shift);
    shift -= width;
    const U mask = (U(1) << width) - 1;
    std::fill(hist.begin(), hist.end(), 0);
    for (int64_t i = 0; i < m; ++i) ++hist[(cur[i] >> shift) & mask];
    U d = 0;
    while (rank > hist[d]) rank -= hist[d++];
    if (hist[d] == m) continue;  // every candidate has this digit
    U* dst = cur == buf_a.data() ? buf_b.data() : buf_a.data();
    int64_t j = 0;
    for (int64_t i = 0; i < m; ++i)
      if (((cur[i] >> shift) & mask) == d) dst[j++] = cur[i];
    cur = dst;
    m = j;
  }
  return cur[0];
}

template <typename U, typename S>
void select_rows(const S* score, int64_t s_b, int64_t s_l, int64_t B, int64_t L, const int64_t* counts,
                 int64_t capacity, bool largest, int64_t* idx, uint8_t* valid, int nthreads) {
  const int64_t limit = std::min(capacity, L);
#pragma omp parallel num_threads(threads_for(B * L, nthreads))
  {
    std::vector<U> keys(L), buf_a(L), buf_b(L);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t count = std::max<int64_t>(0, std::min(counts[b], limit));
      int64_t* out = idx + b * capacity;
      if (valid != nullptr)
        for (int64_t j = 0; j < capacity; ++j) valid[b * capacity + j] = j < count;
      std::fill(out + count, out + capacity, int64_t(0));
      if (count == L) {  // every point
        for (int64_t l = 0; l < L; ++l) out[l] = l;
        continue;
      }
      if (count == 0) continue;
      const S* row = score + b * s_b;
      for (int64_t l = 0; l < L; ++l) {
        const U key = order_key<U>(typename KeyOf<U>::F(widen(row[l * s_l])));
        keys[l] = largest ? U(~key) : key;
      }
      int64_t room = count;
      const U threshold = radix_select<U>(keys.data(), L, room, buf_a, buf_b);
      int64_t j = 0;
      for (int64_t l = 0; l < L && j < count; ++l) {
        const U key = keys[l];
        if (key < threshold || (key == threshold && room > 0)) {
          room -= key == threshold;
          out[j++] = l;
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------ entry points

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<R>{}) with R the unsigned integer of the element's size (kernels that only move bits).
template <typename F>
void by_bits(int element_size, F&& f) {
  switch (element_size) {
    case 2: f(Tag<uint16_t>{}); break;
    case 4: f(Tag<uint32_t>{}); break;
    case 8: f(Tag<uint64_t>{}); break;
    default: throw std::invalid_argument("fastfuse._cpu_select: unsupported element size");
  }
}

// Calls f(Tag<S>{}) with S the element type of the dtype code (kernels that do arithmetic).
template <typename F>
void by_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(Tag<float>{}); break;
    case kFloat64: f(Tag<double>{}); break;
    case kFloat16: f(Tag<Half>{}); break;
    case kBFloat16: f(Tag<Bf16>{}); break;
    default: throw std::invalid_argument("fastfuse._cpu_select: unsupported dtype");
  }
}

#define FASTFUSE_TYPE(tag) typename decltype(tag)::type

Slots make_slots(uintptr_t idx, uintptr_t valid, int64_t B, int64_t K) {
  return Slots{reinterpret_cast<const int64_t*>(idx), reinterpret_cast<const uint8_t*>(valid), B, K};
}

Shape make_shape(const std::vector<int64_t>& bchw, int64_t K) {
  return Shape{bchw.at(0), bchw.at(1), bchw.at(2), bchw.at(3), K};
}

// Maps with the same point strides share one offset table.
int64_t offsets_of(const Slots& sl, const Shape& s, const Map& m, std::vector<int64_t>& off) {
  return slot_offsets(sl, s.H, s.W, m.sh, m.sw, off);
}

// Every entry returns the flat slot b·K + k of the first out-of-range index of a valid slot
// (then nothing was written), or -1.

int64_t gather(int element_size, uintptr_t feat, std::vector<int64_t> shape, std::vector<int64_t> strides,
               uintptr_t idx, uintptr_t valid, int64_t K, uintptr_t out, int nthreads) {
  const Shape s = make_shape(shape, K);
  const Map m = make_map(feat, strides);
  std::vector<int64_t> off;
  const int64_t bad = offsets_of(make_slots(idx, valid, s.B, K), s, m, off);
  if (bad >= 0) return bad;
  by_bits(element_size, [&](auto t) {
    using R = FASTFUSE_TYPE(t);
    gather_rows<R>(m, s, off.data(), reinterpret_cast<R*>(out), nthreads);
  });
  return -1;
}

int64_t gather_sum(int dtype, uintptr_t a, std::vector<int64_t> a_strides, uintptr_t b,
                   std::vector<int64_t> b_strides, std::vector<int64_t> shape, uintptr_t idx, uintptr_t valid,
                   int64_t K, uintptr_t out, int nthreads) {
  const Shape s = make_shape(shape, K);
  const Slots sl = make_slots(idx, valid, s.B, K);
  const Map ma = make_map(a, a_strides), mb = make_map(b, b_strides);
  std::vector<int64_t> oa, ob;
  const int64_t bad = offsets_of(sl, s, ma, oa);
  if (bad >= 0) return bad;
  const bool same = ma.sh == mb.sh && ma.sw == mb.sw;
  if (!same) offsets_of(sl, s, mb, ob);
  by_dtype(dtype, [&](auto t) {
    using S = FASTFUSE_TYPE(t);
    gather_sum_rows<S>(ma, mb, s, oa.data(), same ? oa.data() : ob.data(), reinterpret_cast<S*>(out), nthreads);
  });
  return -1;
}

// grad (B, C, K) with strides (sb, sc, -, sk) -> d feat (B, C, L) contiguous.
int64_t gather_backward(int dtype, uintptr_t grad, std::vector<int64_t> grad_strides, std::vector<int64_t> shape,
                        uintptr_t idx, uintptr_t valid, int64_t K, uintptr_t out, int nthreads) {
  const Shape s = make_shape(shape, K);
  std::vector<int64_t> pos;  // offsets into the contiguous output row: the flat index itself
  const int64_t bad = slot_offsets(make_slots(idx, valid, s.B, K), 1, s.L(), 0, 1, pos);
  if (bad >= 0) return bad;
  by_dtype(dtype, [&](auto t) {
    using S = FASTFUSE_TYPE(t);
    gather_adjoint_rows<S>(make_map(grad, grad_strides), s, pos.data(), reinterpret_cast<S*>(out), nthreads);
  });
  return -1;
}

// reduce_add: base (+ base2 when given) + values summed; else values written ("replace").
int64_t scatter(int dtype, int element_size, bool reduce_add, uintptr_t base, std::vector<int64_t> base_strides,
                uintptr_t base2, std::vector<int64_t> base2_strides, std::vector<int64_t> shape, uintptr_t values,
                std::vector<int64_t> values_strides, uintptr_t idx, uintptr_t valid, int64_t K, uintptr_t out,
                int nthreads) {
  const Shape s = make_shape(shape, K);
  std::vector<int64_t> pos;
  const int64_t bad = slot_offsets(make_slots(idx, valid, s.B, K), 1, s.L(), 0, 1, pos);
  if (bad >= 0) return bad;
  const Map mb = make_map(base, base_strides), mv = make_map(values, values_strides);
  if (reduce_add) {
    const Map second = base2 != 0 ? make_map(base2, base2_strides) : Map{};
    by_dtype(dtype, [&](auto t) {
      using S = FASTFUSE_TYPE(t);
      scatter_add_rows<S>(mb, base2 != 0 ? &second : nullptr, mv, s, pos.data(), reinterpret_cast<S*>(out), nthreads);
    });
  } else {
    by_bits(element_size, [&](auto t) {
      using R = FASTFUSE_TYPE(t);
      scatter_replace_rows<R>(mb, mv, s, pos.data(), reinterpret_cast<R*>(out), nthreads);
    });
  }
  return -1;
}

int64_t scatter_replace_backward(int element_size, uintptr_t grad, std::vector<int64_t> grad_strides,
                                 std::vector<int64_t> shape, uintptr_t idx, uintptr_t valid, int64_t K,
                                 uintptr_t dbase, uintptr_t dvalues, int nthreads) {
  const Shape s = make_shape(shape, K);
  const Slots sl = make_slots(idx, valid, s.B, K);
  const Map mg = make_map(grad, grad_strides);
  std::vector<int64_t> pos, off;
  const int64_t bad = slot_offsets(sl, 1, s.L(), 0, 1, pos);
  if (bad >= 0) return bad;
  offsets_of(sl, s, mg, off);
  std::vector<uint8_t> written, won;
  slot_winners(sl, s.L(), pos, written, won);
  by_bits(element_size, [&](auto t) {
    using R = FASTFUSE_TYPE(t);
    scatter_replace_adjoint_rows<R>(mg, s, off.data(), written.data(), won.data(), reinterpret_cast<R*>(dbase),
                                    reinterpret_cast<R*>(dvalues), nthreads);
  });
  return -1;
}

void top_k(int dtype, uintptr_t score, int64_t s_b, int64_t s_l, int64_t B, int64_t L, uintptr_t counts,
            int64_t capacity, bool largest, uintptr_t idx, uintptr_t valid, int nthreads) {
  by_dtype(dtype, [&](auto t) {
    using S = FASTFUSE_TYPE(t);
    using U = typename std::conditional<std::is_same<S, double>::value, uint64_t, uint32_t>::type;
    select_rows<U, S>(reinterpret_cast<const S*>(score), s_b, s_l, B, L, reinterpret_cast<const int64_t*>(counts),
                      capacity, largest, reinterpret_cast<int64_t*>(idx), reinterpret_cast<uint8_t*>(valid), nthreads);
  });
}

}  // namespace

PYBIND11_MODULE(_cpu_select, m) {
  m.doc() = "fastfuse cpu kernels: top-k selection, gather and scatter of points";
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("gather", &gather, nogil);
  m.def("gather_sum", &gather_sum, nogil);
  m.def("gather_backward", &gather_backward, nogil);
  m.def("scatter", &scatter, nogil);
  m.def("scatter_replace_backward", &scatter_replace_backward, nogil);
  m.def("top_k", &top_k, nogil);
}
