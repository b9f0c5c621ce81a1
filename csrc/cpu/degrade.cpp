// CPU observation model of HSI–MSI fusion (fastfuse._cpu_degrade): spectral response, the blur +
// decimation of spatial_degrade, its exact adjoint, the kernel gradient, and spatial_degrade fused
// with the SAM map against the observed LR-HSI. Conventions in fastfuse/reference/degrade.py.
//
// Every kernel reads fp32 (the launcher widens fp16/bf16 and routes float64 to the reference) and
// writes fp32; tensors are raw pointers with element strides, 64-bit offsets throughout.
//
// spatial_degrade as a strided correlation on the padded frame (T = padded index, image pixel
// T − lead, lead = k − 1 − k // 2) with the kernel flipped, Kf[ii][jj] = K[k−1−ii][k−1−jj]:
//     out[p][q] = Σ_{ii,jj} Kf[ii][jj] · Zpad[p·r + off_h + ii][q·r + off_w + jj].
// Writing jj = g·r + s (g < G = ⌈k/r⌉, s < r) and t = q·r + s, the columns become one unit-stride
// pass per (ii, g) over an accumulator of Wo·r values, acc[t] += w_g[t mod r] · row[t + g·r], whose
// r consecutive entries are then summed into out[q]. Only the kept pixels' taps are computed
// (k²/r² multiply-adds per input pixel), the image is read once, and padding is the row buffer's
// index map, never a padded copy. The weights are stored over a period P (a multiple of r, >= 32)
// so the inner loops are plain vector loops. When r does not divide k some (g, s) are no tap at
// all: there a mask keeps a NaN/inf pixel that no tap reads out of the sum (0 · NaN would be NaN).
// The adjoint is the same loop run backwards (per image row, gathering from the padded rows that
// copied it, deterministic without atomics); the kernel gradient the same loop with the product
// kept per (ii, g, t mod P) and reduced per task into double partials of fixed task chunks.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace py = pybind11;

#include "cpu_common.h"  // FASTFUSE_CPU_CLONES

namespace {

// Small calls run on the calling thread: an OpenMP fork and barrier cost more than they save.
inline int threads_for(int64_t work, int nthreads) { return work < (int64_t(1) << 16) ? 1 : nthreads; }

// Reductions over tasks (the kernel and response gradients): the tasks are split into a fixed
// number of chunks, independent of the thread count, each summed in task order into its own
// double partial; the partials are added in chunk order. The result is the same to the bit for
// any number of threads and any schedule. At most 2^20 partial values (8 MB).
inline int64_t reduction_chunks(int64_t tasks, int64_t partial_size) {
  const int64_t cap = std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(partial_size, 1));
  return std::max<int64_t>(1, std::min({tasks, int64_t(64), cap}));
}

inline void sum_partials(const std::vector<double>& partials, int64_t chunks, int64_t size, double* out) {
  std::fill(out, out + size, 0.0);
  for (int64_t ch = 0; ch < chunks; ++ch)
    for (int64_t e = 0; e < size; ++e) out[e] += partials[ch * size + e];
}

enum Padding { kZero = 0, kCircular = 1, kReflect = 2 };

int64_t pad_index(int64_t u, int64_t n, int mode) {
  if (mode == kZero) return (u >= 0 && u < n) ? u : -1;
  if (mode == kCircular || n == 1) return ((u % n) + n) % n;
  const int64_t period = 2 * n - 2;
  const int64_t f = ((u % period) + period) % period;
  return f >= n ? period - f : f;
}

// The blur's geometry for one (H, W) → (Ho, Wo) problem, shared read-only by every thread.
struct Geometry {
  int64_t H, W, Ho, Wo, k, r, off_h, off_w, G, P, lead;
  int64_t row_len, acc_len;            // row buffer (Wo + G − 1)·r, accumulator Wo·r
  int64_t interior_lo, interior_hi;    // row-buffer positions that are image columns, in order
  std::vector<int64_t> rowsrc, colsrc; // padded index → image pixel, −1 for a zero pad
  std::vector<int64_t> copies_ptr, copies;  // image row h → the padded rows that copy it
  std::vector<float> mask;             // (G, P): 1 where g·r + (s mod r) is a tap
  bool masked;

  Geometry(int64_t H_, int64_t W_, int64_t k_, int64_t r_, int64_t oh, int64_t ow, int mode)
      : H(H_), W(W_), Ho(H_ / r_), Wo(W_ / r_), k(k_), r(r_), off_h(oh), off_w(ow) {
    G = (k + r - 1) / r;
    P = r * ((32 + r - 1) / r);
    lead = k - 1 - k / 2;
    row_len = (Wo + G - 1) * r;
    acc_len = Wo * r;
    rowsrc.resize(H + k - 1);
    colsrc.resize(W + k - 1);
    for (int64_t T = 0; T < H + k - 1; ++T) rowsrc[T] = pad_index(T - lead, H, mode);
    for (int64_t T = 0; T < W + k - 1; ++T) colsrc[T] = pad_index(T - lead, W, mode);
    interior_lo = std::min(std::max<int64_t>(lead - off_w, 0), row_len);
    interior_hi = std::max(std::min(lead + W - off_w, row_len), interior_lo);
    copies_ptr.assign(H + 1, 0);
    for (int64_t T = 0; T < H + k - 1; ++T)
      if (rowsrc[T] >= 0) ++copies_ptr[rowsrc[T] + 1];
    for (int64_t h = 0; h < H; ++h) copies_ptr[h + 1] += copies_ptr[h];
    copies.resize(copies_ptr[H]);
    std::vector<int64_t> fill(copies_ptr.begin(), copies_ptr.end() - 1);
    for (int64_t T = 0; T < H + k - 1; ++T)
      if (rowsrc[T] >= 0) copies[fill[rowsrc[T]]++] = T;
    masked = k % r != 0;
    mask.resize(G * P);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t s = 0; s < P; ++s) mask[g * P + s] = (g * r + s % r < k) ? 1.f : 0.f;
  }

  // Flipped kernel weights per (ck, ii, g, s < P): Kf[ii][g·r + s mod r], 0 where no tap.
  std::vector<float> weight_table(const float* kernel, int64_t kernels) const {
    std::vector<float> tab(kernels * k * G * P);
    for (int64_t c = 0; c < kernels; ++c)
      for (int64_t ii = 0; ii < k; ++ii)
        for (int64_t g = 0; g < G; ++g)
          for (int64_t s = 0; s < P; ++s) {
            const int64_t jj = g * r + s % r;
            tab[((c * k + ii) * G + g) * P + s] =
                jj < k ? kernel[(c * k + (k - 1 - ii)) * k + (k - 1 - jj)] : 0.f;
          }
    return tab;
  }
};

struct Plane {  // one (b, c) image plane: base pointer and row / column strides
  const float* p;
  int64_t sh, sw;
};

// Padded row T of a plane over row-buffer positions t (padded column off_w + t).
void load_row(const Plane& z, const Geometry& g, int64_t T, float* buf) {
  const int64_t src = g.rowsrc[T];
  if (src < 0) {
    std::fill(buf, buf + g.row_len, 0.f);
    return;
  }
  const float* zr = z.p + src * z.sh;
  const int64_t edge = g.W + g.k - 1;
  auto at = [&](int64_t t) {
    const int64_t T2 = g.off_w + t;
    if (T2 >= edge) return 0.f;
    const int64_t c = g.colsrc[T2];
    return c < 0 ? 0.f : zr[c * z.sw];
  };
  for (int64_t t = 0; t < g.interior_lo; ++t) buf[t] = at(t);
  const float* direct = zr + (g.off_w - g.lead) * z.sw;
  if (z.sw == 1) {
    std::memcpy(buf + g.interior_lo, direct + g.interior_lo, (g.interior_hi - g.interior_lo) * sizeof(float));
  } else {
    for (int64_t t = g.interior_lo; t < g.interior_hi; ++t) buf[t] = direct[t * z.sw];
  }
  for (int64_t t = g.interior_hi; t < g.row_len; ++t) buf[t] = at(t);
}

// acc[t] += Σ_{i < NR} w_i[t mod P] · v_i[t] for t < n (masked: only where the tap exists). Up to
// four padded rows per sweep, so the accumulator is loaded and stored once per four rows.
template <int NR>
FASTFUSE_CPU_CLONES
void periodic_mac(float* acc, const float* const* v, const float* const* w, const float* m, int64_t n, int64_t P,
                  bool masked) {
  const float *w0 = w[0], *w1 = w[NR > 1 ? 1 : 0], *w2 = w[NR > 2 ? 2 : 0], *w3 = w[NR > 3 ? 3 : 0];
  for (int64_t t0 = 0; t0 < n; t0 += P) {
    const int64_t len = std::min(P, n - t0);
    float* a = acc + t0;
    const float *v0 = v[0] + t0, *v1 = v[NR > 1 ? 1 : 0] + t0, *v2 = v[NR > 2 ? 2 : 0] + t0;
    const float* v3 = v[NR > 3 ? 3 : 0] + t0;
    if (masked) {
#pragma omp simd
      for (int64_t s = 0; s < len; ++s) {
        float sum = w0[s] * v0[s];
        if (NR > 1) sum += w1[s] * v1[s];
        if (NR > 2) sum += w2[s] * v2[s];
        if (NR > 3) sum += w3[s] * v3[s];
        a[s] += m[s] != 0.f ? sum : 0.f;
      }
    } else {
#pragma omp simd
      for (int64_t s = 0; s < len; ++s) {
        float sum = w0[s] * v0[s];
        if (NR > 1) sum += w1[s] * v1[s];
        if (NR > 2) sum += w2[s] * v2[s];
        if (NR > 3) sum += w3[s] * v3[s];
        a[s] += sum;
      }
    }
  }
}

void mac_rows(int nr, float* acc, const float* const* v, const float* const* w, const float* m, int64_t n, int64_t P,
              bool masked) {
  switch (nr) {
    case 1: periodic_mac<1>(acc, v, w, m, n, P, masked); break;
    case 2: periodic_mac<2>(acc, v, w, m, n, P, masked); break;
    case 3: periodic_mac<3>(acc, v, w, m, n, P, masked); break;
    default: periodic_mac<4>(acc, v, w, m, n, P, masked); break;
  }
}

// c[q·r + s] += w[(q·r + s) mod P] · x[q] for q < Wo, s < r: the zero-filled upsampling of one
// low-resolution row fused into the multiply-add (for r >= 8, a vector per kept pixel).
FASTFUSE_CPU_CLONES
void spread_mac(float* c, const float* x, int64_t sx, const float* w, const float* m, int64_t Wo, int64_t r,
                int64_t P, bool masked) {
  for (int64_t q = 0; q < Wo; ++q) {
    const float v = x[q * sx];
    const int64_t ph = (q * r) % P;
    float* cq = c + q * r;
    const float* wq = w + ph;
    const float* mq = m + ph;
    if (masked) {
#pragma omp simd
      for (int64_t s = 0; s < r; ++s) cq[s] += mq[s] != 0.f ? wq[s] * v : 0.f;
    } else {
#pragma omp simd
      for (int64_t s = 0; s < r; ++s) cq[s] += wq[s] * v;
    }
  }
}

// part[t mod P] += u[t] · v[t] for t < n: the kernel gradient's per-phase products.
FASTFUSE_CPU_CLONES
void periodic_dot(float* part, const float* u, const float* v, int64_t n, int64_t P) {
  for (int64_t t0 = 0; t0 < n; t0 += P) {
    const int64_t len = std::min(P, n - t0);
    const float* a = u + t0;
    const float* b = v + t0;
#pragma omp simd
    for (int64_t s = 0; s < len; ++s) part[s] += a[s] * b[s];
  }
}

// Scratch of one thread for the blur loops.
struct Scratch {
  std::vector<float> row, acc;
  explicit Scratch(const Geometry& g) : row(4 * g.row_len), acc(std::max(g.acc_len, g.row_len)) {}
};

// out[q], q < Wo: the blur of plane z at the kept pixels of output row p.
void degrade_row(const Plane& z, const Geometry& g, const float* tab, int64_t p, Scratch& s, float* out) {
  float* acc = s.acc.data();
  std::fill(acc, acc + g.acc_len, 0.f);
  const float* v[4] = {};
  const float* w[4] = {};
  for (int64_t ii0 = 0; ii0 < g.k; ii0 += 4) {
    const int nr = int(std::min<int64_t>(4, g.k - ii0));
    for (int i = 0; i < nr; ++i) load_row(z, g, p * g.r + g.off_h + ii0 + i, s.row.data() + i * g.row_len);
    for (int64_t gg = 0; gg < g.G; ++gg) {
      for (int i = 0; i < nr; ++i) {
        v[i] = s.row.data() + i * g.row_len + gg * g.r;
        w[i] = tab + ((ii0 + i) * g.G + gg) * g.P;
      }
      mac_rows(nr, acc, v, w, g.mask.data() + gg * g.P, g.acc_len, g.P, g.masked);
    }
  }
  for (int64_t q = 0; q < g.Wo; ++q) {
    float sum = 0.f;
    for (int64_t t = 0; t < g.r; ++t) sum += acc[q * g.r + t];
    out[q] = sum;
  }
}

// Output row p of a low-resolution plane repeated r times: rep[t] = x[p][t / r], t < Wo·r.
void repeat_row(const Plane& x, const Geometry& g, int64_t p, float* rep) {
  const float* xr = x.p + p * x.sh;
  for (int64_t q = 0; q < g.Wo; ++q) {
    const float v = xr[q * x.sw];
    for (int64_t t = 0; t < g.r; ++t) rep[q * g.r + t] = v;
  }
}

// out[w], w < W: row h of the adjoint of plane x (low resolution), written contiguously.
void adjoint_row(const Plane& x, const Geometry& g, const float* tab, int64_t h, Scratch& s, float* out) {
  float* contrib = s.acc.data();  // over row-buffer positions, row_len
  float* rep = s.row.data();
  std::fill(contrib, contrib + g.row_len, 0.f);
  for (int64_t n = g.copies_ptr[h]; n < g.copies_ptr[h + 1]; ++n) {
    const int64_t T = g.copies[n];
    // Output rows p whose taps ii = T − p·r − off_h lie in [0, k).
    const int64_t hi = (T - g.off_h) >= 0 ? std::min((T - g.off_h) / g.r, g.Ho - 1) : -1;
    const int64_t num = T - g.off_h - g.k + 1;
    const int64_t lo = num <= 0 ? 0 : (num + g.r - 1) / g.r;
    for (int64_t p = lo; p <= hi; ++p) {
      const int64_t ii = T - p * g.r - g.off_h;
      if (g.r >= 8) {
        for (int64_t gg = 0; gg < g.G; ++gg)
          spread_mac(contrib + gg * g.r, x.p + p * x.sh, x.sw, tab + (ii * g.G + gg) * g.P, g.mask.data() + gg * g.P,
                     g.Wo, g.r, g.P, g.masked);
        continue;
      }
      repeat_row(x, g, p, rep);  // small ratios: one long vector loop over the repeated row
      for (int64_t gg = 0; gg < g.G; ++gg) {
        const float* w = tab + (ii * g.G + gg) * g.P;
        const float* r1 = rep;
        mac_rows(1, contrib + gg * g.r, &r1, &w, g.mask.data() + gg * g.P, g.acc_len, g.P, g.masked);
      }
    }
  }
  // Fold the padded row onto the image row: interior columns copied, the halo added through the map.
  const int64_t c_lo = g.off_w + g.interior_lo - g.lead, c_hi = g.off_w + g.interior_hi - g.lead;
  std::fill(out, out + c_lo, 0.f);
  std::fill(out + c_hi, out + g.W, 0.f);
  std::memcpy(out + c_lo, contrib + g.interior_lo, (c_hi - c_lo) * sizeof(float));
  const int64_t edge = g.W + g.k - 1;
  auto fold = [&](int64_t t) {
    const int64_t T2 = g.off_w + t;
    if (T2 >= edge) return;
    const int64_t c = g.colsrc[T2];
    if (c >= 0) out[c] += contrib[t];
  };
  for (int64_t t = 0; t < g.interior_lo; ++t) fold(t);
  for (int64_t t = g.interior_hi; t < g.row_len; ++t) fold(t);
}

struct Image {  // (B, C, H, W) with element strides
  const float* p;
  int64_t s[4];
  Plane plane(int64_t b, int64_t c) const { return {p + b * s[0] + c * s[1], s[2], s[3]}; }
};

Image image(uintptr_t ptr, const std::vector<int64_t>& st) {
  Image im{reinterpret_cast<const float*>(ptr), {st[0], st[1], st[2], st[3]}};
  return im;
}

// ----------------------------------------------------------------------------------------------
// spatial_degrade and its adjoint. kernel: contiguous (kernels, k, k) with kernels 1 or C.

// row(plane, weights, index, scratch, out) for every row of a contiguous (B, C, rows, cols) result,
// one task per row.
template <typename RowFn>
void blur_rows(const Image& in, const Geometry& g, const float* kernel, int64_t kernels, const std::vector<int64_t>& shape,
               int64_t rows, int64_t cols, float* out, int nthreads, RowFn row) {
  const int64_t B = shape[0], C = shape[1], tasks = B * C * rows;
  const std::vector<float> tab = g.weight_table(kernel, kernels);
#pragma omp parallel num_threads(threads_for(B * C * g.Ho * g.Wo * g.k * g.k, nthreads))
  {
    Scratch s(g);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t bc = t / rows, c = bc % C;
      const float* w = tab.data() + (kernels == 1 ? 0 : c) * g.k * g.G * g.P;
      row(in.plane(bc / C, c), g, w, t % rows, s, out + t * cols);
    }
  }
}

void degrade_forward(uintptr_t z, std::vector<int64_t> zs, uintptr_t kernel, int64_t kernels, uintptr_t out,
                     std::vector<int64_t> shape, int64_t k, int64_t r, int64_t off_h, int64_t off_w, int mode,
                     int nthreads) {
  const Geometry g(shape[2], shape[3], k, r, off_h, off_w, mode);
  blur_rows(image(z, zs), g, reinterpret_cast<const float*>(kernel), kernels, shape, g.Ho, g.Wo,
            reinterpret_cast<float*>(out), nthreads, degrade_row);
}

// shape: the full-resolution (B, C, H, W) of the result.
void degrade_adjoint(uintptr_t x, std::vector<int64_t> xs, uintptr_t kernel, int64_t kernels, uintptr_t out,
                     std::vector<int64_t> shape, int64_t k, int64_t r, int64_t off_h, int64_t off_w, int mode,
                     int nthreads) {
  const Geometry g(shape[2], shape[3], k, r, off_h, off_w, mode);
  blur_rows(image(x, xs), g, reinterpret_cast<const float*>(kernel), kernels, shape, g.H, g.W,
            reinterpret_cast<float*>(out), nthreads, adjoint_row);
}

// dK[k−1−ii][k−1−jj] += Σ_q grad[p][q] · Zpad[p·r + off_h + ii][q·r + off_w + jj] for one output row
// p; rep is grad's row p repeated r times, part scratch of k·G·P values.
void kernel_grad_row(const Plane& z, const Geometry& g, int64_t p, const float* rep, Scratch& s, float* part,
                     double* dk) {
  const int64_t k = g.k, r = g.r;
  std::fill(part, part + k * g.G * g.P, 0.f);
  for (int64_t ii = 0; ii < k; ++ii) {
    load_row(z, g, p * r + g.off_h + ii, s.row.data());
    for (int64_t gg = 0; gg < g.G; ++gg)
      periodic_dot(part + (ii * g.G + gg) * g.P, s.row.data() + gg * r, rep, g.acc_len, g.P);
  }
  for (int64_t ii = 0; ii < k; ++ii)
    for (int64_t gg = 0; gg < g.G; ++gg)
      for (int64_t sp = 0; sp < g.P; ++sp) {
        const int64_t jj = gg * r + sp % r;  // phases past the kernel's last column are no tap
        if (jj < k) dk[(k - 1 - ii) * k + (k - 1 - jj)] += part[(ii * g.G + gg) * g.P + sp];
      }
}

// dK (kernels, k, k) in double of ⟨grad, spatial_degrade(z, K)⟩: full-resolution z, low-resolution
// grad. (The adjoint's kernel gradient is the same with z := its full-resolution gradient and
// grad := its input.) Deterministic chunked reduction (reduction_chunks).
void degrade_kernel_grad(uintptr_t z, std::vector<int64_t> zs, uintptr_t grad, std::vector<int64_t> gs,
                         uintptr_t dkernel, int64_t kernels, std::vector<int64_t> shape, int64_t k, int64_t r,
                         int64_t off_h, int64_t off_w, int mode, int nthreads) {
  const int64_t B = shape[0], C = shape[1];
  const Geometry g(shape[2], shape[3], k, r, off_h, off_w, mode);
  const Image zi = image(z, zs), gi = image(grad, gs);
  const int64_t tasks = B * C * g.Ho, per_kernel = k * k;
  const int64_t size = kernels * per_kernel, chunks = reduction_chunks(tasks, size);
  std::vector<double> partials(chunks * size, 0.0);
#pragma omp parallel num_threads(threads_for(B * C * g.Ho * g.Wo * k * k, nthreads))
  {
    Scratch s(g);
    std::vector<float> rep(g.acc_len), part(k * g.G * g.P);
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < chunks; ++ch) {
      double* mine = partials.data() + ch * size;
      for (int64_t t = tasks * ch / chunks; t < tasks * (ch + 1) / chunks; ++t) {
        const int64_t bc = t / g.Ho, p = t % g.Ho, b = bc / C, c = bc % C;
        repeat_row(gi.plane(b, c), g, p, rep.data());
        kernel_grad_row(zi.plane(b, c), g, p, rep.data(), s, part.data(), mine + (kernels == 1 ? 0 : c) * per_kernel);
      }
    }
  }
  sum_partials(partials, chunks, size, reinterpret_cast<double*>(dkernel));
}

// ----------------------------------------------------------------------------------------------
// spectral_response: y[b, o, px] = Σ_i R[o, i] · z[b, i, px]. Pixels as (rows, cols) with strides
// (a contiguous plane is one row of H·W pixels); output contiguous (B, O, rows·cols).

struct Pixels {
  const float* p;
  int64_t sb, sc, srow, scol;
};

// Pixels per task: long unit-stride runs per band (16 KB of fp32 for a few output bands) keep the
// hardware prefetchers streaming; the output rows of a task (bands × block) stay within L2.
int64_t pixel_block(int64_t bands) {
  return std::max<int64_t>(64, std::min<int64_t>(4096, (65536 / std::max<int64_t>(bands, 1)) / 16 * 16));
}

// A block of n pixels of band i, unit stride (in place when possible, else gathered into buf).
inline const float* band_block(const Pixels& x, int64_t b, int64_t i, int64_t row, int64_t c0, int64_t n, float* buf) {
  const float* src = x.p + b * x.sb + i * x.sc + row * x.srow + c0 * x.scol;
  if (x.scol == 1) return src;
  for (int64_t q = 0; q < n; ++q) buf[q] = src[q * x.scol];
  return buf;
}

// a[q] (= or +=) Σ_{i < NB} w[i] · x[i][q]: NB input bands per sweep of the output row.
template <int NB>
FASTFUSE_CPU_CLONES
void mix_bands(float* a, const float* const* x, const float* w, int64_t n, bool first) {
  const float w0 = w[0], w1 = NB > 1 ? w[1] : 0.f, w2 = NB > 2 ? w[2] : 0.f, w3 = NB > 3 ? w[3] : 0.f;
  const float *x0 = x[0], *x1 = x[NB > 1 ? 1 : 0], *x2 = x[NB > 2 ? 2 : 0], *x3 = x[NB > 3 ? 3 : 0];
#pragma omp simd
  for (int64_t q = 0; q < n; ++q) {
    float sum = w0 * x0[q];
    if (NB > 1) sum += w1 * x1[q];
    if (NB > 2) sum += w2 * x2[q];
    if (NB > 3) sum += w3 * x3[q];
    a[q] = first ? sum : a[q] + sum;
  }
}

// out[o][q] (+)= Σ_{i < ni} m[o, i0 + i] · xs[i][q] for every o, out rows `so` apart: the first
// group of input bands writes the output, the later ones add to it (no accumulator copy).
void mix_block(float* out, int64_t so, int64_t O, int64_t n, const float* const* xs, const float* m, int64_t smo,
               int64_t smi, int64_t i0, int64_t ni) {
  for (int64_t o = 0; o < O; ++o) {
    float* a = out + o * so;
    for (int64_t i = 0; i < ni; i += 4) {
      float w[4];
      const int nb = int(std::min<int64_t>(4, ni - i));
      for (int j = 0; j < nb; ++j) w[j] = m[o * smo + (i0 + i + j) * smi];
      const bool first = i0 == 0 && i == 0;
      switch (nb) {
        case 1: mix_bands<1>(a, xs + i, w, n, first); break;
        case 2: mix_bands<2>(a, xs + i, w, n, first); break;
        case 3: mix_bands<3>(a, xs + i, w, n, first); break;
        default: mix_bands<4>(a, xs + i, w, n, first); break;
      }
    }
  }
}

void response_forward(uintptr_t x, std::vector<int64_t> xs, uintptr_t m, std::vector<int64_t> ms, uintptr_t out,
                      int64_t B, int64_t I, int64_t O, int64_t rows, int64_t cols, int nthreads) {
  const Pixels X{reinterpret_cast<const float*>(x), xs[0], xs[1], xs[2], xs[3]};
  const float* M = reinterpret_cast<const float*>(m);
  float* Y = reinterpret_cast<float*>(out);
  const int64_t block = pixel_block(O), per_row = (cols + block - 1) / block, tasks = B * rows * per_row;
  constexpr int64_t kGroup = 8;  // input bands gathered per mix sweep
#pragma omp parallel num_threads(threads_for(B * I * O * rows * cols, nthreads))
  {
    std::vector<float> gather(kGroup * block);
    const float* bands[kGroup];
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t b = t / (rows * per_row), row = (t / per_row) % rows, c0 = (t % per_row) * block;
      const int64_t n = std::min(block, cols - c0);
      float* y = Y + (b * O * rows + row) * cols + c0;
      if (I == 0) {  // no input band: a zero response
        for (int64_t o = 0; o < O; ++o) std::fill(y + o * rows * cols, y + o * rows * cols + n, 0.f);
      }
      for (int64_t i0 = 0; i0 < I; i0 += kGroup) {
        const int64_t ni = std::min(kGroup, I - i0);
        for (int64_t i = 0; i < ni; ++i) bands[i] = band_block(X, b, i0 + i, row, c0, n, gather.data() + i * block);
        mix_block(y, rows * cols, O, n, bands, M, ms[0], ms[1], i0, ni);
      }
    }
  }
}

FASTFUSE_CPU_CLONES
float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t q = 0; q < n; ++q) s += a[q] * b[q];
  return s;
}

// dR[o, i] = Σ_{b, px} g[b, o, px] · z[b, i, px], double (O, I); deterministic chunked reduction.
void response_weight_grad(uintptr_t grad, std::vector<int64_t> gs, uintptr_t z, std::vector<int64_t> zs,
                          uintptr_t dR, int64_t B, int64_t I, int64_t O, int64_t rows, int64_t cols, int nthreads) {
  const Pixels Gr{reinterpret_cast<const float*>(grad), gs[0], gs[1], gs[2], gs[3]};
  const Pixels Z{reinterpret_cast<const float*>(z), zs[0], zs[1], zs[2], zs[3]};
  const int64_t block = pixel_block(O), per_row = (cols + block - 1) / block, tasks = B * rows * per_row;
  const int64_t chunks = reduction_chunks(tasks, O * I);
  std::vector<double> partials(chunks * O * I, 0.0);
#pragma omp parallel num_threads(threads_for(B * I * O * rows * cols, nthreads))
  {
    std::vector<float> gbuf(O * block), zbuf(block);
    std::vector<const float*> gb(O);
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < chunks; ++ch) {
      double* mine = partials.data() + ch * O * I;
      for (int64_t t = tasks * ch / chunks; t < tasks * (ch + 1) / chunks; ++t) {
        const int64_t b = t / (rows * per_row), row = (t / per_row) % rows, c0 = (t % per_row) * block;
        const int64_t n = std::min(block, cols - c0);
        for (int64_t o = 0; o < O; ++o) gb[o] = band_block(Gr, b, o, row, c0, n, gbuf.data() + o * block);
        for (int64_t i = 0; i < I; ++i) {
          const float* zi = band_block(Z, b, i, row, c0, n, zbuf.data());
          for (int64_t o = 0; o < O; ++o) mine[o * I + i] += dot(gb[o], zi, n);
        }
      }
    }
  }
  sum_partials(partials, chunks, O * I, reinterpret_cast<double*>(dR));
}

// ----------------------------------------------------------------------------------------------
// spatial_degrade fused with sam_map(X', x). Semantics of fastfuse.reference.sam for fp32 values
// (squares summed in double: no fp32 value overflows or underflows there, so no peak scaling
// is needed for scale invariance): a spectrum of norm <= eps has a right angle and no gradient,
// the angle is Kahan's 2·atan2(|x̂ − ŷ|, |x̂ + ŷ|), NaN propagates. X' is rounded to the image
// dtype (round: 0 fp32, 1 fp16, 2 bf16) before its angle is taken, as sam_map(X', x) sees it.

constexpr double kDegreesPerRadian = 57.29577951308232;
constexpr double kRightAngle = 1.5707963267948966;

inline float round_to(float value, int round) {
  if (round == 1) return static_cast<float>(static_cast<_Float16>(value));
  if (round != 2 || value != value) return value;
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;  // bf16: round to nearest even
  float rounded;
  std::memcpy(&rounded, &bits, sizeof rounded);
  return rounded;
}

// Per-pixel angle geometry of one output row: norms, validity and the unit-vector sums.
struct AngleRow {
  std::vector<double> rp, rx, d2, s2, pa, pb, xa, xb;
  std::vector<char> valid;
  explicit AngleRow(int64_t n) : rp(n), rx(n), d2(n), s2(n), pa(n), pb(n), xa(n), xb(n), valid(n) {}

  // xp: (C, n) contiguous fp32 (the rounded X'), x: band stride xc, pixel stride xw.
  void measure(const float* xp, const float* x, int64_t xc, int64_t xw, int64_t C, int64_t n, double eps,
               bool projections) {
    std::fill(d2.begin(), d2.begin() + n, 0.0);
    std::fill(s2.begin(), s2.begin() + n, 0.0);
    std::fill(pa.begin(), pa.begin() + n, 0.0);
    std::fill(pb.begin(), pb.begin() + n, 0.0);
    std::fill(xa.begin(), xa.begin() + n, 0.0);
    std::fill(xb.begin(), xb.begin() + n, 0.0);
    for (int64_t q = 0; q < n; ++q) rp[q] = rx[q] = 0.0;
    for (int64_t c = 0; c < C; ++c)
      for (int64_t q = 0; q < n; ++q) {
        const double a = xp[c * n + q], b = x[c * xc + q * xw];
        rp[q] += a * a;
        rx[q] += b * b;
      }
    for (int64_t q = 0; q < n; ++q) {
      const double np = std::sqrt(rp[q]), nx = std::sqrt(rx[q]);
      valid[q] = !((np <= eps) || (nx <= eps));  // NaN compares as valid and propagates
      rp[q] = valid[q] ? 1.0 / np : 1.0;  // undirected spectra divide by 1: finite products
      rx[q] = valid[q] ? 1.0 / nx : 1.0;
    }
    for (int64_t c = 0; c < C; ++c)
      for (int64_t q = 0; q < n; ++q) {
        const double up = xp[c * n + q] * rp[q], ux = x[c * xc + q * xw] * rx[q];
        const double a = up - ux, b = up + ux;
        d2[q] += a * a;
        s2[q] += b * b;
        if (projections) {
          pa[q] += up * a;
          pb[q] += up * b;
          xa[q] += ux * a;
          xb[q] += ux * b;
        }
      }
  }
};

// X' of output row p of image b, all C bands, rounded to the image dtype: xp (C, Wo) contiguous.
void degraded_spectra(const Image& z, const Geometry& g, const std::vector<float>& tab, int64_t kernels, int64_t C,
                      int64_t b, int64_t p, int round, Scratch& s, float* xp) {
  for (int64_t c = 0; c < C; ++c) {
    float* row = xp + c * g.Wo;
    degrade_row(z.plane(b, c), g, tab.data() + (kernels == 1 ? 0 : c) * g.k * g.G * g.P, p, s, row);
    for (int64_t q = 0; q < g.Wo; ++q) row[q] = round_to(row[q], round);
  }
}

// X' (B, C, Ho, Wo) and the angle (B, Ho, Wo), both contiguous fp32; one task per output row.
void degrade_sam_forward(uintptr_t z, std::vector<int64_t> zs, uintptr_t kernel, int64_t kernels, uintptr_t x,
                         std::vector<int64_t> xs, uintptr_t x_pseudo, uintptr_t angle, std::vector<int64_t> shape,
                         int64_t k, int64_t r, int64_t off_h, int64_t off_w, int mode, int round, bool degrees,
                         double eps, int nthreads) {
  const int64_t B = shape[0], C = shape[1];
  const Geometry g(shape[2], shape[3], k, r, off_h, off_w, mode);
  const std::vector<float> tab = g.weight_table(reinterpret_cast<const float*>(kernel), kernels);
  const Image zi = image(z, zs), xi = image(x, xs);
  float* xp_out = reinterpret_cast<float*>(x_pseudo);
  float* ang = reinterpret_cast<float*>(angle);
  const double tiny = std::numeric_limits<float>::min();
  const int64_t tasks = B * g.Ho, Wo = g.Wo;
#pragma omp parallel num_threads(threads_for(B * C * g.Ho * Wo * k * k, nthreads))
  {
    Scratch s(g);
    std::vector<float> xp(C * Wo);
    AngleRow geo(Wo);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t b = t / g.Ho, p = t % g.Ho;
      degraded_spectra(zi, g, tab, kernels, C, b, p, round, s, xp.data());
      for (int64_t c = 0; c < C; ++c)
        std::memcpy(xp_out + ((b * C + c) * g.Ho + p) * Wo, xp.data() + c * Wo, Wo * sizeof(float));
      const float* xr = xi.p + b * xi.s[0] + p * xi.s[2];
      geo.measure(xp.data(), xr, xi.s[1], xi.s[3], C, Wo, eps, false);
      float* o = ang + (b * g.Ho + p) * Wo;
      for (int64_t q = 0; q < Wo; ++q) {
        const double dist = std::sqrt(geo.d2[q] < tiny ? tiny : geo.d2[q]);
        const double sum = std::sqrt(geo.s2[q] < tiny ? tiny : geo.s2[q]);
        double theta = geo.valid[q] ? 2.0 * std::atan2(dist, sum) : kRightAngle;
        o[q] = static_cast<float>(degrees ? theta * kDegreesPerRadian : theta);
      }
    }
  }
}

// The backward's first pass: recompute X', then d_pseudo = grad_x_pseudo + ∂angle/∂X' and
// dx = ∂angle/∂x (both contiguous fp32 (B, C, Ho, Wo)); dz and dkernel follow from d_pseudo.
void degrade_sam_backward(uintptr_t grad_xp, std::vector<int64_t> gxs, uintptr_t grad_angle,
                          std::vector<int64_t> gas, uintptr_t z, std::vector<int64_t> zs, uintptr_t kernel,
                          int64_t kernels, uintptr_t x, std::vector<int64_t> xs, uintptr_t d_pseudo, uintptr_t dx,
                          std::vector<int64_t> shape, int64_t k, int64_t r, int64_t off_h, int64_t off_w, int mode,
                          int round, bool degrees, double eps, int nthreads) {
  const int64_t B = shape[0], C = shape[1];
  const Geometry g(shape[2], shape[3], k, r, off_h, off_w, mode);
  const std::vector<float> tab = g.weight_table(reinterpret_cast<const float*>(kernel), kernels);
  const Image zi = image(z, zs), xi = image(x, xs), gx = image(grad_xp, gxs);
  const float* ga = reinterpret_cast<const float*>(grad_angle);
  float* dp_out = reinterpret_cast<float*>(d_pseudo);
  float* dx_out = reinterpret_cast<float*>(dx);
  const double tiny = std::numeric_limits<float>::min();
  const int64_t tasks = B * g.Ho, Wo = g.Wo;
#pragma omp parallel num_threads(threads_for(B * C * g.Ho * Wo * k * k, nthreads))
  {
    Scratch s(g);
    std::vector<float> xp(C * Wo);
    std::vector<double> two_gd2(Wo), two_gs2(Wo), radial_p(Wo), radial_x(Wo);
    AngleRow geo(Wo);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t b = t / g.Ho, p = t % g.Ho;
      degraded_spectra(zi, g, tab, kernels, C, b, p, round, s, xp.data());
      const float* xr = xi.p + b * xi.s[0] + p * xi.s[2];
      geo.measure(xp.data(), xr, xi.s[1], xi.s[3], C, Wo, eps, true);
      const float* gar = ga + b * gas[0] + p * gas[1];
      for (int64_t q = 0; q < Wo; ++q) {
        double gd2 = 0.0, gs2 = 0.0;
        if (geo.valid[q]) {  // an invalid pixel's angle is the constant right angle: zero gradient
          const double gt = degrees ? double(gar[q * gas[2]]) * kDegreesPerRadian : double(gar[q * gas[2]]);
          const double dist = std::sqrt(geo.d2[q] < tiny ? tiny : geo.d2[q]);
          const double sum = std::sqrt(geo.s2[q] < tiny ? tiny : geo.s2[q]);
          const double denom = dist * dist + sum * sum;
          // At a clamped distance (identical or opposite spectra, a cone point) the gradient is 0.
          if (geo.d2[q] >= tiny) gd2 = gt * sum / (dist * denom);
          if (geo.s2[q] >= tiny) gs2 = -gt * dist / (sum * denom);
        }
        two_gd2[q] = 2.0 * gd2;
        two_gs2[q] = 2.0 * gs2;
        radial_p[q] = two_gd2[q] * geo.pa[q] + two_gs2[q] * geo.pb[q];   // up · ∂L/∂up
        radial_x[q] = -two_gd2[q] * geo.xa[q] + two_gs2[q] * geo.xb[q];  // ux · ∂L/∂ux
      }
      for (int64_t c = 0; c < C; ++c) {
        const float* gxr = gx.p + b * gx.s[0] + c * gx.s[1] + p * gx.s[2];
        float* dpr = dp_out + ((b * C + c) * g.Ho + p) * Wo;
        float* dxr = dx_out + ((b * C + c) * g.Ho + p) * Wo;
        for (int64_t q = 0; q < Wo; ++q) {
          const double up = xp[c * Wo + q] * geo.rp[q], ux = xr[c * xi.s[1] + q * xi.s[3]] * geo.rx[q];
          const double d = up - ux, sm = up + ux;
          // An invalid pixel may have a zero norm (eps = 0): its zero gradient, not 0·inf.
          const double dpv = geo.valid[q] ? (two_gd2[q] * d + two_gs2[q] * sm - radial_p[q] * up) * geo.rp[q] : 0.0;
          const double dxv = geo.valid[q] ? (-two_gd2[q] * d + two_gs2[q] * sm - radial_x[q] * ux) * geo.rx[q] : 0.0;
          dpr[q] = static_cast<float>(double(gxr[q * gx.s[3]]) + dpv);
          dxr[q] = static_cast<float>(dxv);
        }
      }
    }
  }
}

}  // namespace

PYBIND11_MODULE(_cpu_degrade, m) {
  m.doc() = "fastfuse cpu backend: spectral response, spatial degradation, its adjoint and the fused SAM guide";
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("degrade_forward", &degrade_forward, nogil);
  m.def("degrade_adjoint", &degrade_adjoint, nogil);
  m.def("degrade_kernel_grad", &degrade_kernel_grad, nogil);
  m.def("response_forward", &response_forward, nogil);
  m.def("response_weight_grad", &response_weight_grad, nogil);
  m.def("degrade_sam_forward", &degrade_sam_forward, nogil);
  m.def("degrade_sam_backward", &degrade_sam_backward, nogil);
}
