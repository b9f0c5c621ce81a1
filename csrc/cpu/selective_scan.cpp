// CPU selective scan, forward and backward (fastfuse._cpu_selective_scan).
//
// Conventions of every csrc/cpu/<family>.cpp (csrc/cpu/README.md): raw addresses + sizes + element
// strides from the launcher, no libtorch; exactly `nthreads` OpenMP threads (the launcher passes
// torch.get_num_threads()); the GIL released around the call; reductions over threads in a fixed
// order; 64-bit offsets.
//
// Work split: a task is (batch, group, block of channels of that group). Time is walked in chunks
// of `chunk` steps (the op's CHUNK): B_t and C_t of the chunk are transposed once per task into
// (t, n) tiles shared by the block's channels, so the per-step loop over the N states is
// unit-stride and vectorises (exp included: exp2_poly below, no libm call); the state of a
// channel lives in a stack array of N ≤ 256 floats.
//
// Forward stores the state at every chunk start (batch, D, n_chunks, N) and the last state.
// Backward walks the chunks last to first; per channel it re-runs the chunk from its saved start
// state keeping x_t, exp(delta_t·A) and y_t of each step (a chunk-sized scratch), then runs the
// adjoint recurrence backwards through it:
//     h_t = g_t + dy_t·C_t    (g_t = a_{t+1}·h_{t+1}, or dL/dx_L at the end)
//     dB_t += h_t·delta_t·u_t,  dC_t += dy_t·x_t,  dA += h_t·a_t·x_{t-1}·delta_t,
//     du_t = delta_t·Σ_n h_t·B_t + D·dy_t,  ddelta_t = u_t·Σ_n h_t·B_t + Σ_n h_t·a_t·x_{t-1}·A.
// dB/dC are sums over the channels of a group: each channel block adds into its own (L, N)
// partial, and the partials are summed block by block in a second parallel loop (a fixed order,
// independent of the thread count: deterministic). dA, dD, ddelta_bias are written per (batch,
// channel) and summed over the batch by the launcher.
//
// T is the compute type: float (fp32/fp16/bf16 inputs, the launcher widens half types) or double.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "scan_math.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace py = pybind11;

#include "cpu_common.h"  // FASTFUSE_CPU_CLONES

namespace {

constexpr int64_t kMaxState = 256;
constexpr double kLog2e = 1.4426950408889634;
// Channel blocks per (batch, group): the parallel tasks, and the dB/dC partials of the backward
// (memory: kMaxBlocks × the size of dB and dC at most).
constexpr int64_t kMaxBlocks = 16;
constexpr int64_t kMinBlockChannels = 4;

using fastfuse_cpu::exp2_poly;  // scan_math.h

template <typename T>
inline T softplus(T v) {  // identity above 20, as torch's softplus(threshold=20) and mamba-ssm
  return v > T(20) ? v : std::log1p(std::exp(v));
}
template <typename T>
inline T sigmoid(T v) { return T(1) / (T(1) + std::exp(-v)); }

struct Strides3 { int64_t b, d, l; };

template <typename T>
struct Problem {
  int64_t batch, dim, length, n_state, groups, per_group, chunk, n_chunks, block_ch, n_blocks;
  const T *u, *delta, *A, *B, *C, *Dv, *z, *bias;
  Strides3 su, sdt, sz;
  int64_t sA_d, sA_n, sB[4], sC[4], sD, sbias;
  bool softplus;

  T delta_at(int64_t b, int64_t d, int64_t t) const {
    T v = delta[b * sdt.b + d * sdt.d + t * sdt.l];
    if (bias) v += bias[d * sbias];
    return softplus ? ::softplus<T>(v) : v;
  }
  T u_at(int64_t b, int64_t d, int64_t t) const { return u[b * su.b + d * su.d + t * su.l]; }
  T z_at(int64_t b, int64_t d, int64_t t) const { return z[b * sz.b + d * sz.d + t * sz.l]; }
};

// B and C of steps [t0, t0 + steps) of (batch b, group g) as (step, n) tiles.
template <typename T>
void transpose_bc(const Problem<T>& p, int64_t b, int64_t g, int64_t t0, int64_t steps, T* bt, T* ct) {
  const int64_t N = p.n_state;
  for (int64_t n = 0; n < N; ++n) {
    const T* Bp = p.B + b * p.sB[0] + g * p.sB[1] + n * p.sB[2] + t0 * p.sB[3];
    const T* Cp = p.C + b * p.sC[0] + g * p.sC[1] + n * p.sC[2] + t0 * p.sC[3];
    for (int64_t s = 0; s < steps; ++s) {
      bt[s * N + n] = Bp[s * p.sB[3]];
      ct[s * N + n] = Cp[s * p.sC[3]];
    }
  }
}

// One channel through one chunk: advances x in place, writes y (before D and z) per step.
// With the optional scratch it also keeps x_t (rows 1..steps; row 0 = the start state) and a_t.
template <typename T>
FASTFUSE_CPU_CLONES void scan_chunk(int64_t N, int64_t steps, const T* dts, const T* us, const T* A2, const T* bt,
                                    const T* ct, T* x, T* ys, T* xs, T* as) {
  if (xs) std::copy(x, x + N, xs);
  for (int64_t s = 0; s < steps; ++s) {
    const T dt = dts[s], dtu = dts[s] * us[s];
    const T* Bs = bt + s * N;
    const T* Cs = ct + s * N;
    T y = 0;
    if (xs) {
      T* xo = xs + (s + 1) * N;
      T* ao = as + s * N;
#pragma omp simd reduction(+ : y)
      for (int64_t n = 0; n < N; ++n) {
        const T a = exp2_poly(dt * A2[n]);
        const T xn = a * x[n] + dtu * Bs[n];
        x[n] = xn;
        xo[n] = xn;
        ao[n] = a;
        y += xn * Cs[n];
      }
    } else {
#pragma omp simd reduction(+ : y)
      for (int64_t n = 0; n < N; ++n) {
        const T xn = exp2_poly(dt * A2[n]) * x[n] + dtu * Bs[n];
        x[n] = xn;
        y += xn * Cs[n];
      }
    }
    ys[s] = y;
  }
}

// Per-thread buffers, sized once per call.
template <typename T>
struct Scratch {
  std::vector<T> bt, ct, dts, us, ys, xs, as, dys, zs, raws;
  Scratch(int64_t chunk, int64_t N, bool backward)
      : bt(chunk * N), ct(chunk * N), dts(chunk), us(chunk), ys(chunk) {
    if (backward) {
      xs.resize((chunk + 1) * N);
      as.resize(chunk * N);
      dys.resize(chunk);
      zs.resize(chunk);
      raws.resize(chunk);
    }
  }
};

template <typename T>
void load_A2(const Problem<T>& p, int64_t d, T* A, T* A2) {
  for (int64_t n = 0; n < p.n_state; ++n) {
    A[n] = p.A[d * p.sA_d + n * p.sA_n];
    A2[n] = A[n] * T(kLog2e);  // exp(dt·A) = 2^(dt·A·log2 e)
  }
}

template <typename T>
void forward_impl(const Problem<T>& p, T* out, T* last, T* states, int nthreads) {
  const int64_t N = p.n_state, L = p.length;
  const int64_t tasks = p.batch * p.groups * p.n_blocks;
#pragma omp parallel num_threads(nthreads)
  {
    Scratch<T> sc(p.chunk, N, false);
    std::vector<T> block_state(p.block_ch * N);
    alignas(64) T A[kMaxState], A2[kMaxState];
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t blk = task % p.n_blocks, g = (task / p.n_blocks) % p.groups, b = task / (p.n_blocks * p.groups);
      const int64_t c0 = blk * p.block_ch, c1 = std::min(p.per_group, c0 + p.block_ch);
      std::fill(block_state.begin(), block_state.end(), T(0));
      for (int64_t c = 0; c < p.n_chunks; ++c) {
        const int64_t t0 = c * p.chunk, steps = std::min(p.chunk, L - t0);
        transpose_bc(p, b, g, t0, steps, sc.bt.data(), sc.ct.data());
        for (int64_t i = c0; i < c1; ++i) {
          const int64_t d = g * p.per_group + i, row = b * p.dim + d;
          T* x = block_state.data() + (i - c0) * N;
          std::copy(x, x + N, states + (row * p.n_chunks + c) * N);
          load_A2(p, d, A, A2);
          for (int64_t s = 0; s < steps; ++s) {
            sc.dts[s] = p.delta_at(b, d, t0 + s);
            sc.us[s] = p.u_at(b, d, t0 + s);
          }
          scan_chunk<T>(N, steps, sc.dts.data(), sc.us.data(), A2, sc.bt.data(), sc.ct.data(), x, sc.ys.data(),
                        nullptr, nullptr);
          const T Dd = p.Dv ? p.Dv[d * p.sD] : T(0);
          T* o = out + row * L + t0;
          for (int64_t s = 0; s < steps; ++s) {
            T y = sc.ys[s] + Dd * sc.us[s];
            if (p.z) {
              const T zv = p.z_at(b, d, t0 + s);
              y *= zv * sigmoid(zv);
            }
            o[s] = y;
          }
          if (c == p.n_chunks - 1) std::copy(x, x + N, last + row * N);
        }
      }
    }
  }
}

// The adjoint pass of one channel through one chunk (scratch from scan_chunk with xs/as).
template <typename T>
FASTFUSE_CPU_CLONES void adjoint_chunk(int64_t N, int64_t steps, const T* A, const T* bt, const T* ct,
                                       const T* xs, const T* as, const T* dts, const T* us, const T* dys, T* g,
                                       T* dA, T* dBp, T* dCp, T* hB_out, T* hax_out) {
  for (int64_t s = steps - 1; s >= 0; --s) {
    const T dt = dts[s], dtu = dts[s] * us[s], dy = dys[s];
    const T* Bs = bt + s * N;
    const T* Cs = ct + s * N;
    const T* xp = xs + s * N;
    const T* xt = xs + (s + 1) * N;
    const T* a = as + s * N;
    T* dBs = dBp + s * N;
    T* dCs = dCp + s * N;
    T hB = 0, haxA = 0;
#pragma omp simd reduction(+ : hB, haxA)
    for (int64_t n = 0; n < N; ++n) {
      const T h = g[n] + dy * Cs[n];
      const T hax = h * a[n] * xp[n];
      hB += h * Bs[n];
      haxA += hax * A[n];
      dA[n] += hax * dt;
      dBs[n] += h * dtu;
      dCs[n] += dy * xt[n];
      g[n] = h * a[n];
    }
    hB_out[s] = hB;
    hax_out[s] = haxA;
  }
}

template <typename T>
void backward_impl(const Problem<T>& p, const T* dout, Strides3 sdo, const T* dlast, T* du, T* ddelta, T* dz,
                   T* dB, T* dC, T* dA, T* dD, T* dbias, const T* states, int nthreads) {
  const int64_t N = p.n_state, L = p.length;
  const int64_t tasks = p.batch * p.groups * p.n_blocks;
  // dB/dC partials: (task, L, N), one per channel block.
  std::vector<T> dBp(static_cast<size_t>(tasks) * L * N), dCp(static_cast<size_t>(tasks) * L * N);
#pragma omp parallel num_threads(nthreads)
  {
    Scratch<T> sc(p.chunk, N, true);
    std::vector<T> g_block(p.block_ch * N), dA_block(p.block_ch * N), hB(p.chunk), haxA(p.chunk);
    std::vector<T> dD_acc(p.block_ch), dbias_acc(p.block_ch);
    alignas(64) T A[kMaxState], A2[kMaxState], x[kMaxState];
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t blk = task % p.n_blocks, g = (task / p.n_blocks) % p.groups, b = task / (p.n_blocks * p.groups);
      const int64_t c0 = blk * p.block_ch, c1 = std::min(p.per_group, c0 + p.block_ch);
      T* dBt = dBp.data() + task * L * N;
      T* dCt = dCp.data() + task * L * N;
      std::fill(dBt, dBt + L * N, T(0));
      std::fill(dCt, dCt + L * N, T(0));
      for (int64_t i = c0; i < c1; ++i) {
        const int64_t row = b * p.dim + g * p.per_group + i;
        std::copy(dlast + row * N, dlast + (row + 1) * N, g_block.begin() + (i - c0) * N);
      }
      std::fill(dA_block.begin(), dA_block.end(), T(0));
      std::fill(dD_acc.begin(), dD_acc.end(), T(0));
      std::fill(dbias_acc.begin(), dbias_acc.end(), T(0));
      for (int64_t c = p.n_chunks - 1; c >= 0; --c) {
        const int64_t t0 = c * p.chunk, steps = std::min(p.chunk, L - t0);
        transpose_bc(p, b, g, t0, steps, sc.bt.data(), sc.ct.data());
        for (int64_t i = c0; i < c1; ++i) {
          const int64_t d = g * p.per_group + i, row = b * p.dim + d;
          load_A2(p, d, A, A2);
          const T Dd = p.Dv ? p.Dv[d * p.sD] : T(0);
          for (int64_t s = 0; s < steps; ++s) {
            const int64_t t = t0 + s;
            T raw = p.delta[b * p.sdt.b + d * p.sdt.d + t * p.sdt.l];
            if (p.bias) raw += p.bias[d * p.sbias];
            sc.raws[s] = raw;
            sc.dts[s] = p.softplus ? softplus(raw) : raw;
            sc.us[s] = p.u_at(b, d, t);
            sc.dys[s] = dout[b * sdo.b + d * sdo.d + t * sdo.l];
          }
          const T* start = states + (row * p.n_chunks + c) * N;
          std::copy(start, start + N, x);
          scan_chunk<T>(N, steps, sc.dts.data(), sc.us.data(), A2, sc.bt.data(), sc.ct.data(), x, sc.ys.data(),
                        sc.xs.data(), sc.as.data());
          // Through the gate: dy of the scan output y (before D·u and silu(z)), and dz.
          T dDsum = 0;
          for (int64_t s = 0; s < steps; ++s) {
            T dy = sc.dys[s];
            if (p.z) {
              const T zv = p.z_at(b, d, t0 + s), sig = sigmoid(zv);
              const T pre = sc.ys[s] + Dd * sc.us[s];
              dz[row * L + t0 + s] = dy * pre * sig * (T(1) + zv * (T(1) - sig));
              dy *= zv * sig;
            }
            sc.dys[s] = dy;
            dDsum += dy * sc.us[s];
          }
          dD_acc[i - c0] += dDsum;
          adjoint_chunk<T>(N, steps, A, sc.bt.data(), sc.ct.data(), sc.xs.data(), sc.as.data(), sc.dts.data(),
                           sc.us.data(), sc.dys.data(), g_block.data() + (i - c0) * N,
                           dA_block.data() + (i - c0) * N, dBt + t0 * N, dCt + t0 * N, hB.data(), haxA.data());
          T dbsum = 0;
          for (int64_t s = 0; s < steps; ++s) {
            T ddt = sc.us[s] * hB[s] + haxA[s];
            if (p.softplus && sc.raws[s] <= T(20)) ddt *= sigmoid(sc.raws[s]);
            dbsum += ddt;
            du[row * L + t0 + s] = sc.dts[s] * hB[s] + sc.dys[s] * Dd;
            ddelta[row * L + t0 + s] = ddt;
          }
          dbias_acc[i - c0] += dbsum;
        }
      }
      for (int64_t i = c0; i < c1; ++i) {
        const int64_t row = b * p.dim + g * p.per_group + i;
        std::copy(dA_block.begin() + (i - c0) * N, dA_block.begin() + (i - c0 + 1) * N, dA + row * N);
        dD[row] = dD_acc[i - c0];
        dbias[row] = dbias_acc[i - c0];
      }
    }
    // Sum the blocks' partials, block 0 first, into the contiguous (batch, G, N, L) dB and dC.
    const int64_t tiles_l = (L + 63) / 64;
#pragma omp for schedule(static)
    for (int64_t job = 0; job < p.batch * p.groups * tiles_l; ++job) {
      const int64_t bg = job / tiles_l, l0 = (job % tiles_l) * 64, l1 = std::min(L, l0 + 64);
      for (int64_t n = 0; n < N; ++n) {
        T* ob = dB + (bg * N + n) * L;
        T* oc = dC + (bg * N + n) * L;
        for (int64_t l = l0; l < l1; ++l) {
          T sb = 0, scc = 0;
          for (int64_t blk = 0; blk < p.n_blocks; ++blk) {
            const int64_t off = ((bg * p.n_blocks + blk) * L + l) * N + n;
            sb += dBp[off];
            scc += dCp[off];
          }
          ob[l] = sb;
          oc[l] = scc;
        }
      }
    }
  }
}

template <typename T>
Problem<T> make_problem(const std::vector<int64_t>& sizes, const std::vector<uintptr_t>& ptrs,
                        const std::vector<int64_t>& st, bool softplus) {
  // sizes: batch, dim, length, n_state, groups, chunk. ptrs: u, delta, A, B, C, D, z, bias (0 = absent).
  // st: u(3) delta(3) A(2) B(4) C(4) D(1) z(3) bias(1) = 21 strides.
  Problem<T> p{};
  p.batch = sizes[0];
  p.dim = sizes[1];
  p.length = sizes[2];
  p.n_state = sizes[3];
  p.groups = sizes[4];
  p.chunk = sizes[5];
  p.per_group = p.dim / p.groups;
  p.n_chunks = (p.length + p.chunk - 1) / p.chunk;
  // Fixed by the shape only (never by the thread count), so the dB/dC sums are reproducible.
  p.n_blocks = std::max<int64_t>(1, std::min(kMaxBlocks, p.per_group / kMinBlockChannels));
  p.block_ch = (p.per_group + p.n_blocks - 1) / p.n_blocks;
  p.n_blocks = (p.per_group + p.block_ch - 1) / p.block_ch;
  auto ptr = [&](int i) { return reinterpret_cast<const T*>(ptrs[i]); };
  p.u = ptr(0);
  p.delta = ptr(1);
  p.A = ptr(2);
  p.B = ptr(3);
  p.C = ptr(4);
  p.Dv = ptr(5);
  p.z = ptr(6);
  p.bias = ptr(7);
  p.su = {st[0], st[1], st[2]};
  p.sdt = {st[3], st[4], st[5]};
  p.sA_d = st[6];
  p.sA_n = st[7];
  for (int i = 0; i < 4; ++i) {
    p.sB[i] = st[8 + i];
    p.sC[i] = st[12 + i];
  }
  p.sD = st[16];
  p.sz = {st[17], st[18], st[19]};
  p.sbias = st[20];
  p.softplus = softplus;
  return p;
}

void check_sizes(const std::vector<int64_t>& sizes, const std::vector<uintptr_t>& ptrs, const std::vector<int64_t>& st) {
  if (sizes.size() != 6 || ptrs.size() != 8 || st.size() != 21)
    throw std::invalid_argument("_cpu_selective_scan: expected 6 sizes, 8 pointers and 21 strides");
  if (sizes[3] < 1 || sizes[3] > kMaxState)
    throw std::invalid_argument("_cpu_selective_scan: the state size N must be in [1, 256]");
  if (sizes[4] < 1 || sizes[1] % sizes[4] != 0 || sizes[5] < 1)
    throw std::invalid_argument("_cpu_selective_scan: groups must divide D and chunk must be positive");
}

// out (batch, D, L), last (batch, D, N), states (batch, D, n_chunks, N): contiguous, compute type.
void forward(std::vector<int64_t> sizes, std::vector<uintptr_t> ptrs, std::vector<int64_t> strides, bool softplus,
             uintptr_t out, uintptr_t last, uintptr_t states, bool is_double, int nthreads) {
  check_sizes(sizes, ptrs, strides);
  if (is_double) {
    auto p = make_problem<double>(sizes, ptrs, strides, softplus);
    forward_impl(p, reinterpret_cast<double*>(out), reinterpret_cast<double*>(last),
                 reinterpret_cast<double*>(states), nthreads);
  } else {
    auto p = make_problem<float>(sizes, ptrs, strides, softplus);
    forward_impl(p, reinterpret_cast<float*>(out), reinterpret_cast<float*>(last), reinterpret_cast<float*>(states),
                 nthreads);
  }
}

// grads: du, ddelta, dz (batch, D, L; dz 0 without z), dB, dC (batch, G, N, L), dA (batch, D, N),
// dD, dbias (batch, D); all contiguous in the compute type. dlast and states contiguous.
template <typename T>
void backward_typed(const std::vector<int64_t>& sizes, const std::vector<uintptr_t>& ptrs,
                    const std::vector<int64_t>& strides, bool softplus, uintptr_t dout,
                    const std::vector<int64_t>& sdo, uintptr_t dlast, uintptr_t states,
                    const std::vector<uintptr_t>& g, int nthreads) {
  auto p = make_problem<T>(sizes, ptrs, strides, softplus);
  auto out = [&](int i) { return reinterpret_cast<T*>(g[i]); };
  backward_impl(p, reinterpret_cast<const T*>(dout), Strides3{sdo[0], sdo[1], sdo[2]},
                reinterpret_cast<const T*>(dlast), out(0), out(1), out(2), out(3), out(4), out(5), out(6), out(7),
                reinterpret_cast<const T*>(states), nthreads);
}

void backward(std::vector<int64_t> sizes, std::vector<uintptr_t> ptrs, std::vector<int64_t> strides, bool softplus,
              uintptr_t dout, std::vector<int64_t> sdo, uintptr_t dlast, uintptr_t states,
              std::vector<uintptr_t> grads, bool is_double, int nthreads) {
  check_sizes(sizes, ptrs, strides);
  if (sdo.size() != 3 || grads.size() != 8)
    throw std::invalid_argument("_cpu_selective_scan: expected 3 dout strides and 8 gradient pointers");
  if (is_double)
    backward_typed<double>(sizes, ptrs, strides, softplus, dout, sdo, dlast, states, grads, nthreads);
  else
    backward_typed<float>(sizes, ptrs, strides, softplus, dout, sdo, dlast, states, grads, nthreads);
}

}  // namespace

PYBIND11_MODULE(_cpu_selective_scan, m) {
  m.doc() = "fastfuse cpu backend: selective scan forward and backward";
  m.def("forward", &forward, py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, py::call_guard<py::gil_scoped_release>());
}
