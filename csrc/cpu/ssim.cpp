// CPU SSIM map, forward and backward, one pass each over the image (fastfuse._cpu_ssim).
//
// Forward, per output row: the five moments x, y, x², y², xy are filtered down the columns
// (window_size input rows, read from cache) into a per-thread line buffer one padded row wide,
// the padding is applied to that line (filtering commutes with a column extension), then the
// line is filtered along the row and the SSIM formula applied. Nothing image-sized is written
// besides the map.
//
// Backward: with S = A1·A2 / (B1·B2) over the moments (μx, μy, E[x²], E[y²], E[xy]) at each
// output pixel q and g = dL/dS(q), dL/dx(p) = Fᵀa_x(p) + 2x(p)·Fᵀb_x(p) + y(p)·Fᵀc(p) (and
// symmetrically for y), where a = g·∂S/∂μ, b = g·∂S/∂E[x²], c = g·∂S/∂E[xy] and Fᵀ is the
// adjoint of the padded Gaussian filter: a "full" correlation with the reversed window followed
// by folding the padded border back onto the pixels it came from (dropped for "zero", mirrored
// for "reflect"). There are four coefficient maps (∂S/∂E[x²] = ∂S/∂E[y²]); they are never
// stored whole: each task walks a band of rows keeping the last window_size coefficient rows in
// a per-thread ring, so a row of the gradient is finished as soon as its rows are in.
//
// T is the accumulation type (float for fp32/fp16/bf16 inputs, which the launcher hands over as
// fp32; double for float64). Pointers are raw; the last dimension must be unit-stride.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace py = pybind11;

namespace {

// Threads for a call of `work` multiply-adds: small calls run on the calling thread, since an
// OpenMP fork and barrier cost more than they save there (and much more on a loaded machine).
inline int threads_for(int64_t work, int nthreads) { return work < (int64_t(1) << 18) ? 1 : nthreads; }

enum Padding { kValid = 0, kZero = 1, kReflect = 2 };
constexpr int64_t kMaps = 4;  // backward coefficient maps: a_x, a_y, b (shared), c

// Source index of padded position k (k may be negative) under repeated whole-sample mirroring.
inline int64_t reflect_index(int64_t k, int64_t n) {
  if (n == 1) return 0;
  const int64_t period = 2 * (n - 1);
  k %= period;
  if (k < 0) k += period;
  return k >= n ? period - k : k;
}

// Source row/column of padded position e (0-based in the padded frame), or -1 if it is a zero.
inline int64_t padded_source(int64_t e, int64_t n, int64_t radius, int padding) {
  if (padding == kValid) return e;
  const int64_t k = e - radius;
  if (padding == kZero) return (k >= 0 && k < n) ? k : -1;
  return reflect_index(k, n);
}

struct Geometry {
  int64_t H, W, OH, OW, ws, radius, pad;  // pad: columns added on each side (0 for valid)
  int padding;
  int64_t padded_w() const { return W + 2 * pad; }
};

template <typename T>
struct Plane {
  const T* x;
  const T* y;
  int64_t xsh, ysh;
};

// Filters the five moments of output row i into m[5][OW] (the column pass then the row pass).
// line[5][padded_w] is the per-thread buffer.
template <typename T>
__attribute__((target_clones("arch=x86-64-v4", "arch=haswell", "default")))
void moments_row(const Plane<T>& p, const Geometry& g, const T* w, int64_t i, T* line, T* m) {
  const int64_t PW = g.padded_w(), W = g.W, OW = g.OW, ws = g.ws;
  T* lx = line;
  T* ly = line + PW;
  T* lxx = line + 2 * PW;
  T* lyy = line + 3 * PW;
  T* lxy = line + 4 * PW;
  for (int64_t j = 0; j < 5 * PW; ++j) line[j] = T(0);
  const int64_t off = g.pad;
  for (int64_t t = 0; t < ws; ++t) {
    const int64_t src = padded_source(i + t, g.H, g.radius, g.padding);
    if (src < 0) continue;
    const T wt = w[t];
    const T* xr = p.x + src * p.xsh;
    const T* yr = p.y + src * p.ysh;
    T* __restrict ax = lx + off;
    T* __restrict ay = ly + off;
    T* __restrict axx = lxx + off;
    T* __restrict ayy = lyy + off;
    T* __restrict axy = lxy + off;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) {
      const T xv = xr[j], yv = yr[j];
      const T wx = wt * xv, wy = wt * yv;
      ax[j] += wx;
      ay[j] += wy;
      axx[j] += wx * xv;
      ayy[j] += wy * yv;
      axy[j] += wx * yv;
    }
  }
  if (off > 0) {
    for (int64_t k = 0; k < 5; ++k) {
      T* l = line + k * PW;
      for (int64_t c = 0; c < off; ++c) {
        const int64_t left = padded_source(c, W, g.radius, g.padding);
        const int64_t right = padded_source(off + W + c, W, g.radius, g.padding);
        l[c] = left < 0 ? T(0) : l[off + left];
        l[off + W + c] = right < 0 ? T(0) : l[off + right];
      }
    }
  }
  for (int64_t j = 0; j < 5 * OW; ++j) m[j] = T(0);
  for (int64_t k = 0; k < 5; ++k) {
    const T* __restrict l = line + k * PW;
    T* __restrict mk = m + k * OW;
    for (int64_t t = 0; t < ws; ++t) {
      const T wt = w[t];
#pragma omp simd
      for (int64_t q = 0; q < OW; ++q) mk[q] += wt * l[q + t];
    }
  }
}

template <typename T>
__attribute__((target_clones("arch=x86-64-v4", "arch=haswell", "default")))
void ssim_from_moments(const T* m, int64_t OW, T c1, T c2, T* out) {
  const T* mx = m;
  const T* my = m + OW;
  const T* exx = m + 2 * OW;
  const T* eyy = m + 3 * OW;
  const T* exy = m + 4 * OW;
#pragma omp simd
  for (int64_t q = 0; q < OW; ++q) {
    const T mxy = mx[q] * my[q], mxx = mx[q] * mx[q], myy = my[q] * my[q];
    const T num = (T(2) * mxy + c1) * (T(2) * (exy[q] - mxy) + c2);
    const T den = (mxx + myy + c1) * ((exx[q] - mxx) + (eyy[q] - myy) + c2);
    out[q] = num / den;
  }
}

// g·∂S/∂(μx, μy, E[x²] = E[y²], E[xy]) for one output row, written into coef[k * plane + q].
template <typename T>
__attribute__((target_clones("arch=x86-64-v4", "arch=haswell", "default")))
void coefficients_row(const T* m, const T* grad, int64_t OW, T c1, T c2, T* coef, int64_t plane) {
  const T* mx = m;
  const T* my = m + OW;
  const T* exx = m + 2 * OW;
  const T* eyy = m + 3 * OW;
  const T* exy = m + 4 * OW;
  T* ax = coef;
  T* ay = coef + plane;
  T* bv = coef + 2 * plane;
  T* cxy = coef + 3 * plane;
#pragma omp simd
  for (int64_t q = 0; q < OW; ++q) {
    const T ux = mx[q], uy = my[q];
    const T a1 = T(2) * ux * uy + c1;
    const T a2 = T(2) * (exy[q] - ux * uy) + c2;
    const T b1 = ux * ux + uy * uy + c1;
    const T b2 = (exx[q] - ux * ux) + (eyy[q] - uy * uy) + c2;
    const T inv_d = T(1) / (b1 * b2);
    const T s = a1 * a2 * inv_d;
    const T gq = grad[q];
    // ∂N/∂μx = 2μy(A2 − A1), ∂D/∂μx = 2μx(B2 − B1); ∂S = (∂N − S·∂D)/D.
    ax[q] = gq * (T(2) * uy * (a2 - a1) - s * T(2) * ux * (b2 - b1)) * inv_d;
    ay[q] = gq * (T(2) * ux * (a2 - a1) - s * T(2) * uy * (b2 - b1)) * inv_d;
    bv[q] = -gq * s / b2;  // ∂S/∂E[x²] = ∂S/∂E[y²] = −S/B2: one map serves both
    cxy[q] = gq * T(2) * a1 * inv_d;  // ∂S/∂E[xy] = 2·A1/D
  }
}

template <typename T>
struct Problem {
  const T* x;
  const T* y;
  int64_t xsb, xsc, xsh, ysb, ysc, ysh;
  int64_t B, C;
  Geometry g;
  std::vector<T> w;
  T c1, c2;
  Plane<T> plane(int64_t n) const {
    const int64_t b = n / C, c = n % C;
    return {x + b * xsb + c * xsc, y + b * ysb + c * ysc, xsh, ysh};
  }
};

template <typename T>
Problem<T> make_problem(uintptr_t x, uintptr_t y, std::vector<int64_t> shape, std::vector<int64_t> xs,
                        std::vector<int64_t> ys, int64_t ws, const std::vector<double>& window, int padding,
                        double c1, double c2) {
  Problem<T> p;
  p.x = reinterpret_cast<const T*>(x);
  p.y = reinterpret_cast<const T*>(y);
  p.B = shape[0];
  p.C = shape[1];
  p.xsb = xs[0]; p.xsc = xs[1]; p.xsh = xs[2];
  p.ysb = ys[0]; p.ysc = ys[1]; p.ysh = ys[2];
  Geometry& g = p.g;
  g.H = shape[2];
  g.W = shape[3];
  g.ws = ws;
  g.radius = ws / 2;
  g.padding = padding;
  g.pad = padding == kValid ? 0 : g.radius;
  g.OH = padding == kValid ? g.H - ws + 1 : g.H;
  g.OW = padding == kValid ? g.W - ws + 1 : g.W;
  for (double v : window) p.w.push_back(static_cast<T>(v));
  p.c1 = static_cast<T>(c1);
  p.c2 = static_cast<T>(c2);
  return p;
}

template <typename T>
void forward_impl(const Problem<T>& p, T* out, int nthreads) {
  const Geometry& g = p.g;
  const int64_t rows = p.B * p.C * g.OH;
#pragma omp parallel num_threads(threads_for(p.B * p.C * g.OH * g.OW * g.ws, nthreads))
  {
    std::vector<T> line(5 * g.padded_w()), m(5 * g.OW);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t n = r / g.OH, i = r % g.OH;
      moments_row(p.plane(n), g, p.w.data(), i, line.data(), m.data());
      ssim_from_moments(m.data(), g.OW, p.c1, p.c2, out + r * g.OW);
    }
  }
}

// Adjoint filtering of the coefficient rows around padded row e into acc[4][W] (overwritten).
// ring holds coefficient rows q at slot q % ws, each row as kMaps consecutive runs of OW values.
template <typename T>
__attribute__((target_clones("arch=x86-64-v4", "arch=haswell", "default")))
void adjoint_row(const T* ring, const Geometry& g, const T* w, int64_t e, T* vbuf, T* acc) {
  const int64_t OW = g.OW, ws = g.ws, W = g.W, OH = g.OH;
  const int64_t VW = OW + 2 * (ws - 1);  // the coefficient row with ws − 1 zeros on each side
  const int64_t EW = OW + ws - 1;        // the padded frame's width
  for (int64_t j = 0; j < kMaps * VW; ++j) vbuf[j] = T(0);
  for (int64_t j = 0; j < kMaps * W; ++j) acc[j] = T(0);
  // Column pass: output rows q = e − t for t in [0, ws) contribute with weight w[t].
  for (int64_t t = 0; t < ws; ++t) {
    const int64_t q = e - t;
    if (q < 0 || q >= OH) continue;
    const T wt = w[t];
    const T* row = ring + (q % ws) * kMaps * OW;
    for (int64_t k = 0; k < kMaps; ++k) {
      const T* __restrict src = row + k * OW;
      T* __restrict dst = vbuf + k * VW + (ws - 1);
#pragma omp simd
      for (int64_t j = 0; j < OW; ++j) dst[j] += wt * src[j];
    }
  }
  // Row pass: padded column c gets Σ_t w[t]·v[c − t] = Σ_s w[ws−1−s]·vpad[c + s]; then the fold.
  for (int64_t k = 0; k < kMaps; ++k) {
    const T* __restrict v = vbuf + k * VW;
    T* __restrict a = acc + k * W;
    if (g.padding == kValid) {
      for (int64_t s = 0; s < ws; ++s) {
        const T wk = w[ws - 1 - s];
#pragma omp simd
        for (int64_t c = 0; c < EW; ++c) a[c] += wk * v[c + s];
      }
    } else {
      // Interior columns map to themselves (padded column c ↔ source c − radius).
      const int64_t r = g.radius;
      for (int64_t s = 0; s < ws; ++s) {
        const T wk = w[ws - 1 - s];
        const T* vs = v + s + r;
#pragma omp simd
        for (int64_t c = 0; c < W; ++c) a[c] += wk * vs[c];
      }
      // Border columns (r on each side) are folded back one at a time.
      for (int64_t side = 0; side < 2; ++side) {
        for (int64_t b = 0; b < r; ++b) {
          const int64_t c = side == 0 ? b : r + W + b;
          const int64_t src = padded_source(c, W, r, g.padding);
          if (src < 0) continue;
          T sum = T(0);
          for (int64_t s = 0; s < ws; ++s) sum += w[ws - 1 - s] * v[c + s];
          a[src] += sum;
        }
      }
    }
  }
}

template <typename T>
__attribute__((target_clones("arch=x86-64-v4", "arch=haswell", "default")))
void combine_row(const T* acc, int64_t W, const T* xr, const T* yr, T* dx, T* dy) {
  const T* ax = acc;
  const T* ay = acc + W;
  const T* bv = acc + 2 * W;
  const T* cxy = acc + 3 * W;
  if (dx != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) dx[j] += ax[j] + T(2) * xr[j] * bv[j] + yr[j] * cxy[j];
  }
  if (dy != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) dy[j] += ay[j] + T(2) * yr[j] * bv[j] + xr[j] * cxy[j];
  }
}

// Rows of input per backward task: enough tasks for every thread, few enough that the ws − 1
// coefficient rows each band recomputes at its top stay a small overhead.
int64_t band_rows(int64_t H, int64_t N, int64_t ws, int nthreads) {
  if (H < 4 * ws) return H;  // one band: mirrored borders may fold anywhere in a small image
  int64_t band = 128;
  while (band > 4 * ws && N * ((H + band - 1) / band) < 4 * nthreads) band /= 2;
  return std::max<int64_t>(band, 2 * ws);
}

template <typename T>
void backward_impl(const Problem<T>& p, const T* grad, int64_t gsb, int64_t gsc, int64_t gsh, T* dx, T* dy,
                   int nthreads) {
  const Geometry& g = p.g;
  const int64_t N = p.B * p.C, EH = g.OH + g.ws - 1;
  const int64_t band = band_rows(g.H, N, g.ws, nthreads);
  // Bands of input rows; a remainder shorter than the window joins the band before it, so every
  // band is longer than the radius and each mirrored border row folds into its own band.
  int64_t n_bands = std::max<int64_t>(1, g.H / band);
  const int64_t tasks = N * n_bands;
#pragma omp parallel num_threads(threads_for(p.B * p.C * g.H * g.W * g.ws, nthreads))
  {
    std::vector<T> line(5 * g.padded_w()), m(5 * g.OW), ring(g.ws * kMaps * g.OW);
    std::vector<T> vbuf(kMaps * (g.OW + 2 * (g.ws - 1))), acc(kMaps * g.W);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t n = task / n_bands, bi = task % n_bands;
      const int64_t i0 = bi * band, i1 = bi + 1 == n_bands ? g.H : i0 + band;
      const Plane<T> pl = p.plane(n);
      T* dxn = dx ? dx + n * g.H * g.W : nullptr;
      T* dyn = dy ? dy + n * g.H * g.W : nullptr;
      for (int64_t i = i0; i < i1; ++i) {
        if (dxn) std::fill(dxn + i * g.W, dxn + (i + 1) * g.W, T(0));
        if (dyn) std::fill(dyn + i * g.W, dyn + (i + 1) * g.W, T(0));
      }
      // The padded rows whose source lies in this band form one run [e_lo, e_hi).
      int64_t e_lo = EH, e_hi = 0;
      for (int64_t e = 0; e < EH; ++e) {
        const int64_t src = padded_source(e, g.H, g.radius, g.padding);
        if (src >= i0 && src < i1) {
          e_lo = std::min(e_lo, e);
          e_hi = e + 1;
        }
      }
      const T* gplane = grad + (n / p.C) * gsb + (n % p.C) * gsc;
      int64_t next_q = std::max<int64_t>(0, e_lo - g.ws + 1);
      for (int64_t e = e_lo; e < e_hi; ++e) {
        // Coefficient rows up to e (those e needs), computed once each into the ring.
        for (; next_q <= std::min(e, g.OH - 1); ++next_q) {
          moments_row(pl, g, p.w.data(), next_q, line.data(), m.data());
          coefficients_row(m.data(), gplane + next_q * gsh, g.OW, p.c1, p.c2,
                           ring.data() + (next_q % g.ws) * kMaps * g.OW, g.OW);
        }
        const int64_t src = padded_source(e, g.H, g.radius, g.padding);
        if (src < i0 || src >= i1) continue;
        adjoint_row(ring.data(), g, p.w.data(), e, vbuf.data(), acc.data());
        combine_row(acc.data(), g.W, pl.x + src * pl.xsh, pl.y + src * pl.ysh, dxn ? dxn + src * g.W : nullptr,
                    dyn ? dyn + src * g.W : nullptr);
      }
    }
  }
}

// Python entry points. x, y: (B, C, H, W) with unit stride along W; out/dx/dy contiguous.
void forward(uintptr_t x, uintptr_t y, uintptr_t out, std::vector<int64_t> shape, std::vector<int64_t> xs,
             std::vector<int64_t> ys, int64_t ws, std::vector<double> window, int padding, double c1, double c2,
             bool is_double, int nthreads) {
  if (is_double) {
    auto p = make_problem<double>(x, y, shape, xs, ys, ws, window, padding, c1, c2);
    forward_impl(p, reinterpret_cast<double*>(out), nthreads);
  } else {
    auto p = make_problem<float>(x, y, shape, xs, ys, ws, window, padding, c1, c2);
    forward_impl(p, reinterpret_cast<float*>(out), nthreads);
  }
}

void backward(uintptr_t grad, std::vector<int64_t> gs, uintptr_t x, uintptr_t y, uintptr_t dx, uintptr_t dy,
              std::vector<int64_t> shape, std::vector<int64_t> xs, std::vector<int64_t> ys, int64_t ws,
              std::vector<double> window, int padding, double c1, double c2, bool is_double, int nthreads) {
  if (is_double) {
    auto p = make_problem<double>(x, y, shape, xs, ys, ws, window, padding, c1, c2);
    backward_impl(p, reinterpret_cast<const double*>(grad), gs[0], gs[1], gs[2], reinterpret_cast<double*>(dx),
                  reinterpret_cast<double*>(dy), nthreads);
  } else {
    auto p = make_problem<float>(x, y, shape, xs, ys, ws, window, padding, c1, c2);
    backward_impl(p, reinterpret_cast<const float*>(grad), gs[0], gs[1], gs[2], reinterpret_cast<float*>(dx),
                  reinterpret_cast<float*>(dy), nthreads);
  }
}

// ---------------------------------------------------------------------------------------------
// UIQI (Wang & Bovik's Q, fastfuse.metrics.uiqi) map: the same column-then-row sweep with a
// uniform block × block window, in double whatever the input, on each band shifted by its mean
// (so E[x²] − E[x]² keeps small local variances), plus the exact window constancy (max == min)
// that the metric's 0/0 conventions need. x is the reference, y the estimate.
template <typename In>
__attribute__((target_clones("arch=x86-64-v4", "arch=haswell", "default")))
void uiqi_row(const In* x, const In* y, int64_t W, int64_t block, double sx, double sy, int64_t i, double* line,
              double* out) {
  const int64_t OW = W - block + 1;
  double* s[5];
  for (int k = 0; k < 5; ++k) s[k] = line + k * W;
  double* xmax = line + 5 * W;
  double* xmin = line + 6 * W;
  double* ymax = line + 7 * W;
  double* ymin = line + 8 * W;
  for (int64_t j = 0; j < 5 * W; ++j) line[j] = 0.0;
  for (int64_t j = 0; j < W; ++j) {
    xmax[j] = xmin[j] = x[i * W + j];
    ymax[j] = ymin[j] = y[i * W + j];
  }
  for (int64_t t = 0; t < block; ++t) {
    const In* __restrict xr = x + (i + t) * W;
    const In* __restrict yr = y + (i + t) * W;
    double* __restrict s0 = s[0];
    double* __restrict s1 = s[1];
    double* __restrict s2 = s[2];
    double* __restrict s3 = s[3];
    double* __restrict s4 = s[4];
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) {
      const double xv = xr[j], yv = yr[j], xc = xv - sx, yc = yv - sy;
      s0[j] += xc;
      s1[j] += yc;
      s2[j] += xc * xc;
      s3[j] += yc * yc;
      s4[j] += xc * yc;
    }
    // NaN never equals anything: a NaN kept in a max or min marks the window non-constant below.
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) {
      const double xv = xr[j], yv = yr[j];
      xmax[j] = (xv > xmax[j] || xv != xv) ? xv : xmax[j];
      xmin[j] = (xv < xmin[j] || xv != xv) ? xv : xmin[j];
      ymax[j] = (yv > ymax[j] || yv != yv) ? yv : ymax[j];
      ymin[j] = (yv < ymin[j] || yv != yv) ? yv : ymin[j];
    }
  }
  // Row pass, window tap outermost so the inner loops run along the row (vectorised).
  double* h = line + 9 * W;  // 9 runs of OW: the five sums, then x max/min, y max/min
  for (int k = 0; k < 9; ++k) {
    const double* src = line + k * W;
    double* dst = h + k * OW;
    for (int64_t q = 0; q < OW; ++q) dst[q] = src[q];
  }
  for (int64_t t = 1; t < block; ++t) {
    for (int k = 0; k < 5; ++k) {
      const double* __restrict src = line + k * W + t;
      double* __restrict dst = h + k * OW;
#pragma omp simd
      for (int64_t q = 0; q < OW; ++q) dst[q] += src[q];
    }
    for (int k = 5; k < 9; ++k) {
      const double* __restrict src = line + k * W + t;
      double* __restrict dst = h + k * OW;
      const bool is_max = (k == 5 || k == 7);
#pragma omp simd
      for (int64_t q = 0; q < OW; ++q) {
        const double v = src[q], cur = dst[q];
        dst[q] = (v != v || (is_max ? v > cur : v < cur)) ? v : cur;
      }
    }
  }
  const double inv_n = 1.0 / double(block * block);
  for (int64_t q = 0; q < OW; ++q) {
    double m[5];
    for (int k = 0; k < 5; ++k) m[k] = h[k * OW + q];
    const double hxmax = h[5 * OW + q], hxmin = h[6 * OW + q], hymax = h[7 * OW + q], hymin = h[8 * OW + q];
    const bool const_x = hxmax == hxmin, const_y = hymax == hymin;
    const double mean_x = m[0] * inv_n, mean_y = m[1] * inv_n;
    double var_x = m[2] * inv_n - mean_x * mean_x, var_y = m[3] * inv_n - mean_y * mean_y;
    double cov = m[4] * inv_n - mean_x * mean_y;
    var_x = var_x < 0 ? 0.0 : var_x;  // clamp_min(0), NaN passing through
    var_y = var_y < 0 ? 0.0 : var_y;
    if (const_x) var_x = 0.0;
    if (const_y) var_y = 0.0;
    if (const_x || const_y) cov = 0.0;
    // A constant window's mean is its value, exactly (shift-and-sum would leave rounding residue).
    const double mu_x = const_x ? hxmax : mean_x + sx, mu_y = const_y ? hymax : mean_y + sy;
    const double lum = mu_x * mu_x + mu_y * mu_y;
    const double den = (var_x + var_y) * lum;
    double qv = den != 0 ? 4.0 * cov * mu_x * mu_y / den : 1.0;
    if (const_x && const_y && lum != 0) qv = 2.0 * mu_x * mu_y / lum;
    out[q] = qv;
  }
}

template <typename In>
void uiqi_impl(const In* x, const In* y, const double* sx, const double* sy, int64_t N, int64_t H, int64_t W,
               int64_t block, double* out, int nthreads) {
  const int64_t OH = H - block + 1, OW = W - block + 1;
#pragma omp parallel num_threads(threads_for(N * OH * OW * block, nthreads))
  {
    std::vector<double> line(9 * W + 9 * (W - block + 1));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < N * OH; ++r) {
      const int64_t n = r / OH, i = r % OH;
      uiqi_row(x + n * H * W, y + n * H * W, W, block, sx[n], sy[n], i, line.data(), out + r * OW);
    }
  }
}

// x (reference), y (estimate): N contiguous H × W planes (fp32 or float64); sx, sy: N shifts
// (double); out: N × OH × OW double.
void uiqi_map(uintptr_t x, uintptr_t y, uintptr_t sx, uintptr_t sy, int64_t N, int64_t H, int64_t W, int64_t block,
              uintptr_t out, bool is_double, int nthreads) {
  const double* ssx = reinterpret_cast<const double*>(sx);
  const double* ssy = reinterpret_cast<const double*>(sy);
  double* o = reinterpret_cast<double*>(out);
  if (is_double) {
    uiqi_impl(reinterpret_cast<const double*>(x), reinterpret_cast<const double*>(y), ssx, ssy, N, H, W, block, o,
              nthreads);
  } else {
    uiqi_impl(reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(y), ssx, ssy, N, H, W, block, o,
              nthreads);
  }
}

}  // namespace

PYBIND11_MODULE(_cpu_ssim, m) {
  m.doc() = "fastfuse cpu backend: SSIM map forward and backward";
  m.def("forward", &forward, py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, py::call_guard<py::gil_scoped_release>());
  m.def("uiqi_map", &uiqi_map, py::call_guard<py::gil_scoped_release>());
}
