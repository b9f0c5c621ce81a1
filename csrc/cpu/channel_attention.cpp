// CPU channel attention, forward and backward (fastfuse._cpu_channel_attention).
//
// Per problem n (a batch element and head) with Q (Cq × L), K and V (Ck × L), rows unit-stride:
//   G = Q Kᵀ and the squared row norms of Q and K, in ONE pass over Q and K (the norms are taken
//   from the chunk the Gram kernel just left in cache, so neither Q nor K is read from memory
//   twice and no normalised copy is written);
//   A = softmax(scale · G / (r_q r_kᵀ)) with r = max(‖row‖, eps), a tiny Cq × Ck step;
//   out = A V, a GEMM-shaped pass that reads V and writes out once.
// The backward recomputes A (its inputs are one more pass over Q, K, fused with the pass over
// dOut and V that gives dA = dOut Vᵀ), does the C × C softmax/normalisation algebra, then one
// apply pass writes dV = Aᵀ dOut, dQ = dG K + diag(a_q) Q and dK = dGᵀ Q + diag(a_k) K; nothing of
// size C × L is stored between the passes.
//
// Work is cut into tasks of (n, a fixed run of pixels): the number of runs depends on L only, and
// the Gram partials of the runs are summed in run order, so results do not depend on the thread
// count or the schedule. Sums inside a run are fp32 in 16-lane vectors; across runs in double.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace py = pybind11;

#include "cpu_common.h"  // FASTFUSE_CPU_CLONES
#include "scan_math.h"   // exp2_poly

namespace {

// One AVX-512 register (two AVX2, four SSE ones in the other clones). Every function taking or
// returning one is always inlined into a cloned caller, so no vector crosses a call boundary and
// GCC's note that such calls would change ABI without AVX-512 does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float vec16 __attribute__((vector_size(64)));
constexpr int kLanes = 16;
constexpr int64_t kChunk = 512;      // pixels a Gram task keeps in cache (Cq + Ck rows of 2 KiB)
constexpr int64_t kMaxRuns = 16;     // Gram runs per problem (bounds the partial buffers)
constexpr int64_t kApplyChunk = 256; // pixels an apply task writes

inline int threads_for(int64_t work, int nthreads) { return work < (int64_t(1) << 16) ? 1 : nthreads; }

#define FASTFUSE_INLINE inline __attribute__((always_inline))  // inlined into each clone's body

// Unaligned loads and stores (memcpy compiles to one vector move).
FASTFUSE_INLINE vec16 load(const float* p) {
  vec16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
FASTFUSE_INLINE void store(float* p, vec16 v) { std::memcpy(p, &v, sizeof v); }
FASTFUSE_INLINE float hsum(vec16 v) {
  float s = 0.f;
  for (int t = 0; t < kLanes; ++t) s += v[t];
  return s;
}

// A view of N problems of R rows × L pixels: element (n, r, l) at base + n·sn + r·sr + l.
struct Rows {
  const float* base;
  int64_t sn, sr;
  const float* row(int64_t n, int64_t r) const { return base + n * sn + r * sr; }
};

// acc[a][b] += Σ_l x_a[l] y_b[l] over l in [0, len) for RX rows of X and RY rows of Y.
template <int RX, int RY>
FASTFUSE_INLINE void gram_block(const float* const* x, const float* const* y, int64_t len, float* out, int64_t ld) {
  vec16 acc[RX][RY];
  for (int a = 0; a < RX; ++a)
    for (int b = 0; b < RY; ++b) acc[a][b] = vec16{};
  int64_t l = 0;
  for (; l + kLanes <= len; l += kLanes) {
    vec16 xv[RX];
    for (int a = 0; a < RX; ++a) xv[a] = load(x[a] + l);
    for (int b = 0; b < RY; ++b) {
      const vec16 yv = load(y[b] + l);
      for (int a = 0; a < RX; ++a) acc[a][b] += xv[a] * yv;
    }
  }
  for (int a = 0; a < RX; ++a)
    for (int b = 0; b < RY; ++b) {
      float s = hsum(acc[a][b]);
      for (int64_t t = l; t < len; ++t) s += x[a][t] * y[b][t];
      out[a * ld + b] += s;
    }
}

template <int RX>
FASTFUSE_INLINE void gram_row_block(const float* const* x, const float* const* y, int ry, int64_t len, float* out,
                           int64_t ld) {
  switch (ry) {
    case 4: gram_block<RX, 4>(x, y, len, out, ld); break;
    case 3: gram_block<RX, 3>(x, y, len, out, ld); break;
    case 2: gram_block<RX, 2>(x, y, len, out, ld); break;
    default: gram_block<RX, 1>(x, y, len, out, ld); break;
  }
}

// out (Cx × Cy, row-major) += X[:, l0:l1] Y[:, l0:l1]ᵀ; sq_x, sq_y (if given) += squared row sums.
FASTFUSE_CPU_CLONES
void gram_run(const Rows& X, int64_t Cx, const Rows& Y, int64_t Cy, int64_t n, int64_t l0, int64_t l1, float* out,
              float* sq_x, float* sq_y) {
  for (int64_t c0 = l0; c0 < l1; c0 += kChunk) {
    const int64_t len = std::min(kChunk, l1 - c0);
    for (int64_t i = 0; i < Cx; i += 4) {
      const int rx = int(std::min<int64_t>(4, Cx - i));
      const float* xp[4];
      for (int a = 0; a < rx; ++a) xp[a] = X.row(n, i + a) + c0;
      for (int64_t j = 0; j < Cy; j += 4) {
        const int ry = int(std::min<int64_t>(4, Cy - j));
        const float* yp[4];
        for (int b = 0; b < ry; ++b) yp[b] = Y.row(n, j + b) + c0;
        float* o = out + i * Cy + j;
        switch (rx) {
          case 4: gram_row_block<4>(xp, yp, ry, len, o, Cy); break;
          case 3: gram_row_block<3>(xp, yp, ry, len, o, Cy); break;
          case 2: gram_row_block<2>(xp, yp, ry, len, o, Cy); break;
          default: gram_row_block<1>(xp, yp, ry, len, o, Cy); break;
        }
      }
    }
    // The chunk of both operands is still in cache: the norms cost no memory traffic.
    for (int side = 0; side < 2; ++side) {
      float* sq = side ? sq_y : sq_x;
      if (!sq) continue;
      const Rows& R = side ? Y : X;
      const int64_t C = side ? Cy : Cx;
      for (int64_t r = 0; r < C; ++r) {
        const float* p = R.row(n, r) + c0;
        vec16 acc{};
        int64_t l = 0;
        for (; l + kLanes <= len; l += kLanes) {
          const vec16 v = load(p + l);
          acc += v * v;
        }
        float s = hsum(acc);
        for (; l < len; ++l) s += p[l] * p[l];
        sq[r] += s;
      }
    }
  }
}

// out[a][l] = Σ_j M[a][j] y_j[l] (+ d[a] x_a[l]) for RO output rows over pixels [0, len), 32 at a time,
// then 16, then one by one.
template <int RO>
FASTFUSE_INLINE void apply_block(const float* M, int64_t ldm, const Rows& Y, int64_t Cy, int64_t n, int64_t l0, int64_t len,
                        const float* d, const float* const* x, float* const* out) {
  int64_t l = 0;
  for (; l + 2 * kLanes <= len; l += 2 * kLanes) {
    vec16 acc0[RO], acc1[RO];
    for (int a = 0; a < RO; ++a) {
      if (d) {
        const float s = d[a];
        acc0[a] = s * load(x[a] + l);
        acc1[a] = s * load(x[a] + l + kLanes);
      } else {
        acc0[a] = vec16{};
        acc1[a] = vec16{};
      }
    }
    for (int64_t j = 0; j < Cy; ++j) {
      const float* yp = Y.row(n, j) + l0 + l;
      const vec16 y0 = load(yp), y1 = load(yp + kLanes);
      for (int a = 0; a < RO; ++a) {
        const float m = M[a * ldm + j];
        acc0[a] += m * y0;
        acc1[a] += m * y1;
      }
    }
    for (int a = 0; a < RO; ++a) {
      store(out[a] + l, acc0[a]);
      store(out[a] + l + kLanes, acc1[a]);
    }
  }
  if (l + kLanes <= len) {  // one more 16-pixel vector (SMIF-Net's pixel groups are 16 or 64 long)
    vec16 acc[RO];
    for (int a = 0; a < RO; ++a) acc[a] = d ? d[a] * load(x[a] + l) : vec16{};
    for (int64_t j = 0; j < Cy; ++j) {
      const vec16 y0 = load(Y.row(n, j) + l0 + l);
      for (int a = 0; a < RO; ++a) acc[a] += M[a * ldm + j] * y0;
    }
    for (int a = 0; a < RO; ++a) store(out[a] + l, acc[a]);
    l += kLanes;
  }
  for (; l < len; ++l) {
    float acc[RO];
    for (int a = 0; a < RO; ++a) acc[a] = d ? d[a] * x[a][l] : 0.f;
    for (int64_t j = 0; j < Cy; ++j) {
      const float yv = Y.row(n, j)[l0 + l];
      for (int a = 0; a < RO; ++a) acc[a] += M[a * ldm + j] * yv;
    }
    for (int a = 0; a < RO; ++a) out[a][l] = acc[a];
  }
}

// One apply task: rows of out (Co × L, contiguous per problem) over pixels [l0, l0 + len) for problem n:
// out = M Y (+ diag(d) X), M (Co × Cy) row-major.
FASTFUSE_CPU_CLONES
void apply_run(const float* M, const Rows& Y, int64_t Cy, int64_t n, int64_t l0, int64_t len, const float* d,
               const Rows* X, float* out, int64_t Co, int64_t L) {
  constexpr int kRows = 8;
  for (int64_t i = 0; i < Co; i += kRows) {
    const int ro = int(std::min<int64_t>(kRows, Co - i));
    const float* xp[kRows];
    float* op[kRows];
    for (int a = 0; a < ro; ++a) {
      xp[a] = X ? X->row(n, i + a) + l0 : nullptr;
      op[a] = out + (n * Co + i + a) * L + l0;
    }
    const float* Mi = M + i * Cy;
    const float* di = d ? d + i : nullptr;
    switch (ro) {
      case 8: apply_block<8>(Mi, Cy, Y, Cy, n, l0, len, di, xp, op); break;
      case 7: apply_block<7>(Mi, Cy, Y, Cy, n, l0, len, di, xp, op); break;
      case 6: apply_block<6>(Mi, Cy, Y, Cy, n, l0, len, di, xp, op); break;
      case 5: apply_block<5>(Mi, Cy, Y, Cy, n, l0, len, di, xp, op); break;
      case 4: apply_block<4>(Mi, Cy, Y, Cy, n, l0, len, di, xp, op); break;
      case 3: apply_block<3>(Mi, Cy, Y, Cy, n, l0, len, di, xp, op); break;
      case 2: apply_block<2>(Mi, Cy, Y, Cy, n, l0, len, di, xp, op); break;
      default: apply_block<1>(Mi, Cy, Y, Cy, n, l0, len, di, xp, op); break;
    }
  }
}

struct Problem {
  int64_t N, Cq, Ck, L, heads;
  Rows q, k;
  const float* scale;  // (heads,)
  bool normalize;
  double eps;
  int64_t runs() const { return std::max<int64_t>(1, std::min(kMaxRuns, (L + kChunk - 1) / kChunk)); }
  int64_t run_start(int64_t r) const {  // runs start on a chunk boundary
    const int64_t chunks = (L + kChunk - 1) / kChunk;
    return std::min(L, (chunks * r / runs()) * kChunk);
  }
};

// Gram partials of every (problem, run) summed over runs in order into double Gram matrices and
// squared norms: G (N × Cx × Cy) and sq_x (N × Cx), sq_y (N × Cy) when wanted.
struct GramSums {
  std::vector<double> g, sq_x, sq_y;
};

void reduce_runs(const std::vector<float>& part, int64_t N, int64_t runs, int64_t Cx, int64_t Cy, bool norms,
                 GramSums& s) {
  const int64_t stride = Cx * Cy + (norms ? Cx + Cy : 0);
  s.g.assign(N * Cx * Cy, 0.0);
  if (norms) {
    s.sq_x.assign(N * Cx, 0.0);
    s.sq_y.assign(N * Cy, 0.0);
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t r = 0; r < runs; ++r) {
      const float* p = part.data() + (n * runs + r) * stride;
      double* g = s.g.data() + n * Cx * Cy;
      for (int64_t e = 0; e < Cx * Cy; ++e) g[e] += p[e];
      if (norms) {
        for (int64_t e = 0; e < Cx; ++e) s.sq_x[n * Cx + e] += p[Cx * Cy + e];
        for (int64_t e = 0; e < Cy; ++e) s.sq_y[n * Cy + e] += p[Cx * Cy + Cx + e];
      }
    }
}

// e^x for x ≤ 0 (logits minus their row's peak), vectorisable (libm's expf is not without
// -ffast-math): the scans' 2^t polynomial at x·log2(e); below −87 (where e^x leaves fp32's normal
// range) it returns e^−87, which a softmax row cannot tell from 0.
FASTFUSE_INLINE float exp_nonpositive(float x) {
  return fastfuse_cpu::exp2_poly(std::max(x, -87.0f) * 1.44269504088896341f);
}

// The C × C step for problem n: the unit logits U (G over the clamped norms, or G) and the
// softmax A of scale·U, both Cq × Ck row-major.
FASTFUSE_CPU_CLONES
void attention(const Problem& P, const GramSums& s, int64_t n, float* unit, float* attn) {
  const int64_t Cq = P.Cq, Ck = P.Ck;
  const float scale = P.scale[n % P.heads];
  std::vector<float> inv_rk(Ck);
  for (int64_t j = 0; j < Ck; ++j)
    inv_rk[j] = P.normalize ? float(1.0 / std::max(std::sqrt(s.sq_y[n * Ck + j]), P.eps)) : 1.f;
  for (int64_t i = 0; i < Cq; ++i) {
    const float inv_rq = P.normalize ? float(1.0 / std::max(std::sqrt(s.sq_x[n * Cq + i]), P.eps)) : 1.f;
    const double* g = s.g.data() + (n * Cq + i) * Ck;
    float* u = unit + i * Ck;
    float* a = attn + i * Ck;
    float peak = -INFINITY;
    for (int64_t j = 0; j < Ck; ++j) {
      u[j] = float(g[j]) * inv_rq * inv_rk[j];
      a[j] = scale * u[j];
      peak = std::max(peak, a[j]);
    }
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < Ck; ++j) {
      a[j] = exp_nonpositive(a[j] - peak);
      total += a[j];
    }
    const float inv = 1.f / total;
    for (int64_t j = 0; j < Ck; ++j) a[j] *= inv;
  }
}

// Runs `pass(n, r)` for every (problem, Gram run) on the team, then sums the partials.
template <typename Pass>
void gram_tasks(const Problem& P, int64_t stride, std::vector<float>& part, int nthreads, Pass pass) {
  const int64_t runs = P.runs(), tasks = P.N * runs;
  part.assign(tasks * stride, 0.f);
  const int team = threads_for(P.N * (P.Cq + P.Ck) * P.Ck * P.L, nthreads);
#pragma omp parallel for schedule(dynamic, 1) num_threads(team)
  for (int64_t t = 0; t < tasks; ++t) pass(t / runs, t % runs, part.data() + t * stride);
}

template <typename Pass>
void apply_tasks(const Problem& P, int64_t rows, int nthreads, Pass pass) {
  const int64_t chunks = (P.L + kApplyChunk - 1) / kApplyChunk, tasks = P.N * chunks;
  const int team = threads_for(P.N * rows * P.Ck * P.L, nthreads);
#pragma omp parallel for schedule(dynamic, 1) num_threads(team)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t l0 = (t % chunks) * kApplyChunk;
    pass(t / chunks, l0, std::min(kApplyChunk, P.L - l0));
  }
}

Problem make_problem(uintptr_t q, uintptr_t k, const std::vector<int64_t>& dims, const std::vector<int64_t>& q_strides,
                     const std::vector<int64_t>& k_strides, uintptr_t scale, bool normalize, double eps) {
  Problem P;
  P.N = dims.at(0);
  P.Cq = dims.at(1);
  P.Ck = dims.at(2);
  P.L = dims.at(3);
  P.heads = dims.at(4);
  P.q = {reinterpret_cast<const float*>(q), q_strides.at(0), q_strides.at(1)};
  P.k = {reinterpret_cast<const float*>(k), k_strides.at(0), k_strides.at(1)};
  P.scale = reinterpret_cast<const float*>(scale);
  P.normalize = normalize;
  P.eps = eps;
  return P;
}

Rows rows_of(uintptr_t p, const std::vector<int64_t>& strides) {
  return {reinterpret_cast<const float*>(p), strides.at(0), strides.at(1)};
}

// dims = (N, Cq, Ck, L, heads); q, k, v fp32 with unit pixel stride, strides (problem, row);
// out contiguous N × Cq × L.
void forward(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, std::vector<int64_t> dims,
             std::vector<int64_t> q_strides, std::vector<int64_t> k_strides, std::vector<int64_t> v_strides,
             uintptr_t scale, bool normalize, double eps, int nthreads) {
  const Problem P = make_problem(q, k, dims, q_strides, k_strides, scale, normalize, eps);
  const Rows V = rows_of(v, v_strides);
  const int64_t Cq = P.Cq, Ck = P.Ck, stride = Cq * Ck + (normalize ? Cq + Ck : 0);
  std::vector<float> part;
  gram_tasks(P, stride, part, nthreads, [&](int64_t n, int64_t r, float* p) {
    gram_run(P.q, Cq, P.k, Ck, n, P.run_start(r), P.run_start(r + 1), p, normalize ? p + Cq * Ck : nullptr,
             normalize ? p + Cq * Ck + Cq : nullptr);
  });
  GramSums s;
  reduce_runs(part, P.N, P.runs(), Cq, Ck, normalize, s);
  std::vector<float> attn_all(P.N * Cq * Ck), unit(Cq * Ck);
  for (int64_t n = 0; n < P.N; ++n) attention(P, s, n, unit.data(), attn_all.data() + n * Cq * Ck);
  float* o = reinterpret_cast<float*>(out);
  apply_tasks(P, Cq, nthreads, [&](int64_t n, int64_t l0, int64_t len) {
    apply_run(attn_all.data() + n * Cq * Ck, V, Ck, n, l0, len, nullptr, nullptr, o, Cq, P.L);
  });
}

// Gradients of Σ grad · forward. grad_q/grad_k/grad_v (0 = not wanted) are contiguous N × C × L;
// grad_scale (0 = not wanted) receives one value per problem (the launcher sums over the batch).
void backward(uintptr_t grad, std::vector<int64_t> grad_strides, uintptr_t q, uintptr_t k, uintptr_t v,
              std::vector<int64_t> dims, std::vector<int64_t> q_strides, std::vector<int64_t> k_strides,
              std::vector<int64_t> v_strides, uintptr_t scale, bool normalize, double eps, uintptr_t grad_q,
              uintptr_t grad_k, uintptr_t grad_v, uintptr_t grad_scale, int nthreads) {
  const Problem P = make_problem(q, k, dims, q_strides, k_strides, scale, normalize, eps);
  const Rows V = rows_of(v, v_strides), GO = rows_of(grad, grad_strides);
  const int64_t Cq = P.Cq, Ck = P.Ck, CC = Cq * Ck;
  const bool need_qk = grad_q || grad_k || grad_scale;
  // One pass over q, k, dOut and v: the Gram and norms of (q, k), and dA = dOut Vᵀ if needed.
  const int64_t stride = CC + (normalize ? Cq + Ck : 0) + (need_qk ? CC : 0);
  std::vector<float> part;
  gram_tasks(P, stride, part, nthreads, [&](int64_t n, int64_t r, float* p) {
    const int64_t l0 = P.run_start(r), l1 = P.run_start(r + 1);
    gram_run(P.q, Cq, P.k, Ck, n, l0, l1, p, normalize ? p + CC : nullptr, normalize ? p + CC + Cq : nullptr);
    if (need_qk) gram_run(GO, Cq, V, Ck, n, l0, l1, p + stride - CC, nullptr, nullptr);
  });
  GramSums s, ds;
  {  // the (q, k) sums, then the dA sums, each from its slice of the partials
    const int64_t runs = P.runs(), first = CC + (normalize ? Cq + Ck : 0);
    std::vector<float> a(P.N * runs * first), b(need_qk ? P.N * runs * CC : 0);
    for (int64_t t = 0; t < P.N * runs; ++t) {
      std::copy(part.begin() + t * stride, part.begin() + t * stride + first, a.begin() + t * first);
      if (need_qk) std::copy(part.begin() + t * stride + first, part.begin() + (t + 1) * stride, b.begin() + t * CC);
    }
    reduce_runs(a, P.N, runs, Cq, Ck, normalize, s);
    if (need_qk) reduce_runs(b, P.N, runs, Cq, Ck, false, ds);
  }
  // The C × C algebra per problem: Aᵀ for dV; dG and dGᵀ and the norms' diagonal terms for dQ, dK.
  std::vector<float> attn_t(P.N * CC), dgram(need_qk ? P.N * CC : 0), dgram_t(need_qk ? P.N * CC : 0);
  std::vector<float> diag_q(normalize ? P.N * Cq : 0), diag_k(normalize ? P.N * Ck : 0);
  float* gscale = reinterpret_cast<float*>(grad_scale);
  std::vector<float> unit(CC), attn(CC);
  std::vector<double> dlog(CC), dk_acc(Ck);
  for (int64_t n = 0; n < P.N; ++n) {
    attention(P, s, n, unit.data(), attn.data());
    for (int64_t i = 0; i < Cq; ++i)
      for (int64_t j = 0; j < Ck; ++j) attn_t[n * CC + j * Cq + i] = float(attn[i * Ck + j]);
    if (!need_qk) continue;
    const double sc = P.scale[n % P.heads];
    double gs = 0.0;
    std::fill(dk_acc.begin(), dk_acc.end(), 0.0);
    for (int64_t i = 0; i < Cq; ++i) {
      const double* da = ds.g.data() + (n * Cq + i) * Ck;
      double dot = 0.0;
      for (int64_t j = 0; j < Ck; ++j) dot += da[j] * attn[i * Ck + j];
      double dq_acc = 0.0;
      const double rq = normalize ? std::max(std::sqrt(s.sq_x[n * Cq + i]), P.eps) : 1.0;
      for (int64_t j = 0; j < Ck; ++j) {
        const double dl = attn[i * Ck + j] * (da[j] - dot);  // d logits (softmax backward)
        gs += dl * unit[i * Ck + j];
        const double du = dl * sc;  // d unit
        dq_acc += du * unit[i * Ck + j];
        dk_acc[j] += du * unit[i * Ck + j];
        const double rk = normalize ? std::max(std::sqrt(s.sq_y[n * Ck + j]), P.eps) : 1.0;
        dlog[i * Ck + j] = du / (rq * rk);  // dG
      }
      if (normalize) {  // r_q = max(‖q‖, eps): ‖q‖ passes −Σ_j dU·U / (r_q ‖q‖) · q where above eps
        const double nq = std::sqrt(s.sq_x[n * Cq + i]);
        diag_q[n * Cq + i] = nq > P.eps ? float(-dq_acc / (rq * nq)) : 0.f;
      }
    }
    if (normalize)
      for (int64_t j = 0; j < Ck; ++j) {
        const double nk = std::sqrt(s.sq_y[n * Ck + j]);
        const double rk = std::max(nk, P.eps);
        diag_k[n * Ck + j] = nk > P.eps ? float(-dk_acc[j] / (rk * nk)) : 0.f;
      }
    for (int64_t i = 0; i < Cq; ++i)
      for (int64_t j = 0; j < Ck; ++j) {
        dgram[n * CC + i * Ck + j] = float(dlog[i * Ck + j]);
        dgram_t[n * CC + j * Cq + i] = float(dlog[i * Ck + j]);
      }
    if (gscale) gscale[n] = float(gs);
  }
  // One apply pass: each task writes its pixels of dV, dQ and dK.
  float* gv = reinterpret_cast<float*>(grad_v);
  float* gq = reinterpret_cast<float*>(grad_q);
  float* gk = reinterpret_cast<float*>(grad_k);
  const int64_t rows = (gv ? Ck : 0) + (gq ? Cq : 0) + (gk ? Ck : 0);
  if (rows == 0) return;
  apply_tasks(P, rows, nthreads, [&](int64_t n, int64_t l0, int64_t len) {
    if (gv) apply_run(attn_t.data() + n * CC, GO, Cq, n, l0, len, nullptr, nullptr, gv, Ck, P.L);
    if (gq) apply_run(dgram.data() + n * CC, P.k, Ck, n, l0, len, normalize ? diag_q.data() + n * Cq : nullptr,
                      &P.q, gq, Cq, P.L);
    if (gk) apply_run(dgram_t.data() + n * CC, P.q, Cq, n, l0, len, normalize ? diag_k.data() + n * Ck : nullptr,
                      &P.k, gk, Ck, P.L);
  });
}

}  // namespace

PYBIND11_MODULE(_cpu_channel_attention, m) {
  m.doc() = "fastfuse cpu backend: channel attention forward and backward (Gram + norms in one pass)";
  m.def("forward", &forward, py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, py::call_guard<py::gil_scoped_release>());
}
