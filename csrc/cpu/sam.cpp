// CPU spectral angle map, forward and backward (fastfuse._cpu_sam).
//
// A task owns a run of up to kBlock pixels of one image row (a whole row at CAVE size: long runs
// per channel keep the hardware prefetchers streaming). Its spectra (C values per pixel,
// channel-strided) are read from memory once: the first sweep over the channels takes the norms,
// the later sweeps (unit-vector distances, then the gradient) re-read the same block from cache.
// Sums are kept in double: the square of any finite fp32 value is finite in double and a
// subnormal's square is not zero, so the angle is scale-invariant over fp32's whole range
// without a separate max-abs pass (float64 spectra are divided by their peak |value| in one more
// sweep over the cached block); the angle is Kahan's 2·atan2(|x̂ − ŷ|, |x̂ + ŷ|) of the unit
// spectra, as the reference (identical spectra give exactly 0 and a zero gradient).
//
// Semantics follow the torch reference (fastfuse.reference.sam): a spectrum with norm ≤ eps gives a right angle and
// a zero gradient; NaN propagates.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace py = pybind11;

namespace {

// Threads for a call of `work` multiply-adds: small calls run on the calling thread, since an
// OpenMP fork and barrier cost more than they save there (and much more on a loaded machine).
inline int threads_for(int64_t work, int nthreads) { return work < (int64_t(1) << 18) ? 1 : nthreads; }

constexpr int64_t kBlock = 512;
constexpr double kDegreesPerRadian = 57.29577951308232;
constexpr double kRightAngle = 1.5707963267948966;

struct Layout {
  int64_t B, C, H, W;
  int64_t xs[4], ys[4];
};

// Per-pixel geometry of a block: inverse norms, validity and the unit-vector sums.
struct BlockGeometry {
  double rx[kBlock], ry[kBlock], d2[kBlock], s2[kBlock], xa[kBlock], xb[kBlock], ya[kBlock], yb[kBlock];
  bool valid[kBlock];
};

template <typename T>
__attribute__((target_clones("arch=x86-64-v4", "arch=haswell", "default")))
void measure(const T* x, const T* y, int64_t xsc, int64_t ysc, int64_t C, int64_t n, double eps,
             bool need_projections, BlockGeometry& g) {
  // fp32 spectra square safely in double; float64 ones are divided by their peak |value| first
  // (one more sweep over the cached block), so no finite float64 spectrum overflows or underflows.
  double sxx[kBlock] = {0}, syy[kBlock] = {0}, px[kBlock], py[kBlock];
  constexpr bool kScale = std::is_same<T, double>::value;
  for (int64_t p = 0; p < n; ++p) px[p] = py[p] = 1.0;
  if (kScale) {
    for (int64_t p = 0; p < n; ++p) px[p] = py[p] = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const T* xr = x + c * xsc;
      const T* yr = y + c * ysc;
      for (int64_t p = 0; p < n; ++p) {
        const double ax = std::fabs(double(xr[p])), ay = std::fabs(double(yr[p]));
        px[p] = (ax > px[p] || ax != ax) ? ax : px[p];  // NaN sticks
        py[p] = (ay > py[p] || ay != ay) ? ay : py[p];
      }
    }
    for (int64_t p = 0; p < n; ++p) {
      px[p] = px[p] > 0 ? px[p] : 1.0;
      py[p] = py[p] > 0 ? py[p] : 1.0;
    }
  }
  double ipx[kBlock], ipy[kBlock];
  for (int64_t p = 0; p < n; ++p) {
    ipx[p] = 1.0 / px[p];
    ipy[p] = 1.0 / py[p];
  }
  for (int64_t c = 0; c < C; ++c) {
    const T* xr = x + c * xsc;
    const T* yr = y + c * ysc;
#pragma omp simd
    for (int64_t p = 0; p < n; ++p) {
      const double xv = kScale ? xr[p] * ipx[p] : double(xr[p]), yv = kScale ? yr[p] * ipy[p] : double(yr[p]);
      sxx[p] += xv * xv;
      syy[p] += yv * yv;
    }
  }
  for (int64_t p = 0; p < n; ++p) {
    // The norm is peak·sqrt(sum); at most eps means no direction (NaN compares as valid).
    const double nx = px[p] * std::sqrt(sxx[p]);
    const double ny = py[p] * std::sqrt(syy[p]);
    g.valid[p] = !((nx <= eps) || (ny <= eps));
    // Undirected spectra divide by 1, so every later product stays finite (zero gradient).
    g.rx[p] = g.valid[p] ? 1.0 / nx : 1.0;
    g.ry[p] = g.valid[p] ? 1.0 / ny : 1.0;
    g.d2[p] = g.s2[p] = g.xa[p] = g.xb[p] = g.ya[p] = g.yb[p] = 0.0;
  }
  for (int64_t c = 0; c < C; ++c) {
    const T* xr = x + c * xsc;
    const T* yr = y + c * ysc;
    if (need_projections) {
#pragma omp simd
      for (int64_t p = 0; p < n; ++p) {
        const double ux = xr[p] * g.rx[p], uy = yr[p] * g.ry[p];
        const double a = ux - uy, b = ux + uy;
        g.d2[p] += a * a;
        g.s2[p] += b * b;
        g.xa[p] += ux * a;
        g.xb[p] += ux * b;
        g.ya[p] += uy * a;
        g.yb[p] += uy * b;
      }
    } else {
#pragma omp simd
      for (int64_t p = 0; p < n; ++p) {
        const double ux = xr[p] * g.rx[p], uy = yr[p] * g.ry[p];
        const double a = ux - uy, b = ux + uy;
        g.d2[p] += a * a;
        g.s2[p] += b * b;
      }
    }
  }
}

template <typename T>
struct Args {
  const T* x;
  const T* y;
  Layout L;
  double eps, tiny;
  bool degrees;
  int64_t blocks_per_row() const { return (L.W + kBlock - 1) / kBlock; }
};

template <typename T>
void forward_impl(const Args<T>& a, T* out, int nthreads) {
  const Layout& L = a.L;
  const int64_t per_row = a.blocks_per_row(), tasks = L.B * L.H * per_row;
#pragma omp parallel num_threads(threads_for(L.B * L.C * L.H * L.W, nthreads))
  {
    BlockGeometry g;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t row = t / per_row, w0 = (t % per_row) * kBlock, n = std::min(kBlock, L.W - w0);
      const int64_t b = row / L.H, h = row % L.H;
      const T* x = a.x + b * L.xs[0] + h * L.xs[2] + w0 * L.xs[3];
      const T* y = a.y + b * L.ys[0] + h * L.ys[2] + w0 * L.ys[3];
      measure(x, y, L.xs[1], L.ys[1], L.C, n, a.eps, false, g);
      T* o = out + (b * L.H + h) * L.W + w0;
      for (int64_t p = 0; p < n; ++p) {
        const double dist = std::sqrt(g.d2[p] < a.tiny ? a.tiny : g.d2[p]);
        const double sum = std::sqrt(g.s2[p] < a.tiny ? a.tiny : g.s2[p]);
        double theta = g.valid[p] ? 2.0 * std::atan2(dist, sum) : kRightAngle;
        if (a.degrees) theta *= kDegreesPerRadian;
        o[p] = static_cast<T>(theta);
      }
    }
  }
}

template <typename T>
void backward_impl(const Args<T>& a, const T* grad, std::vector<int64_t> gs, T* gx, T* gy, int nthreads) {
  const Layout& L = a.L;
  const int64_t per_row = a.blocks_per_row(), tasks = L.B * L.H * per_row, plane = L.H * L.W;
#pragma omp parallel num_threads(threads_for(L.B * L.C * L.H * L.W, nthreads))
  {
    BlockGeometry g;
    double two_gd2[kBlock], two_gs2[kBlock], radial_x[kBlock], radial_y[kBlock];
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t row = t / per_row, w0 = (t % per_row) * kBlock, n = std::min(kBlock, L.W - w0);
      const int64_t b = row / L.H, h = row % L.H;
      const T* x = a.x + b * L.xs[0] + h * L.xs[2] + w0 * L.xs[3];
      const T* y = a.y + b * L.ys[0] + h * L.ys[2] + w0 * L.ys[3];
      measure(x, y, L.xs[1], L.ys[1], L.C, n, a.eps, true, g);
      const T* gr = grad + b * gs[0] + h * gs[1] + w0 * gs[2];
      for (int64_t p = 0; p < n; ++p) {
        double gd2 = 0.0, gsum2 = 0.0;
        if (g.valid[p]) {  // an invalid pixel's angle is the constant right angle: zero gradient
          const double gtheta = a.degrees ? double(gr[p * gs[2]]) * kDegreesPerRadian : double(gr[p * gs[2]]);
          const double dist = std::sqrt(g.d2[p] < a.tiny ? a.tiny : g.d2[p]);
          const double sum = std::sqrt(g.s2[p] < a.tiny ? a.tiny : g.s2[p]);
          const double denom = dist * dist + sum * sum;
          // At a clamped distance (identical or opposite spectra, a cone point) the gradient is 0.
          if (g.d2[p] >= a.tiny) gd2 = gtheta * sum / (dist * denom);
          if (g.s2[p] >= a.tiny) gsum2 = -gtheta * dist / (sum * denom);
        }
        two_gd2[p] = 2.0 * gd2;
        two_gs2[p] = 2.0 * gsum2;
        radial_x[p] = two_gd2[p] * g.xa[p] + two_gs2[p] * g.xb[p];   // ux · ∂L/∂ux
        radial_y[p] = -two_gd2[p] * g.ya[p] + two_gs2[p] * g.yb[p];  // uy · ∂L/∂uy
      }
      T* ox = gx + b * L.C * plane + h * L.W + w0;
      T* oy = gy + b * L.C * plane + h * L.W + w0;
      for (int64_t c = 0; c < L.C; ++c) {
        const T* xr = x + c * L.xs[1];
        const T* yr = y + c * L.ys[1];
        T* dx = ox + c * plane;
        T* dy = oy + c * plane;
        for (int64_t p = 0; p < n; ++p) {
          const double ux = xr[p] * g.rx[p], uy = yr[p] * g.ry[p];
          const double d = ux - uy, s = ux + uy;
          // An invalid pixel may have a zero norm (eps = 0): write its zero gradient, not 0·inf.
          dx[p] = g.valid[p] ? static_cast<T>((two_gd2[p] * d + two_gs2[p] * s - radial_x[p] * ux) * g.rx[p]) : T(0);
          dy[p] = g.valid[p] ? static_cast<T>((-two_gd2[p] * d + two_gs2[p] * s - radial_y[p] * uy) * g.ry[p]) : T(0);
        }
      }
    }
  }
}

template <typename T>
Args<T> make_args(uintptr_t x, uintptr_t y, const std::vector<int64_t>& shape, const std::vector<int64_t>& xs,
                  const std::vector<int64_t>& ys, bool degrees, double eps) {
  Args<T> a;
  a.x = reinterpret_cast<const T*>(x);
  a.y = reinterpret_cast<const T*>(y);
  a.L.B = shape[0]; a.L.C = shape[1]; a.L.H = shape[2]; a.L.W = shape[3];
  for (int i = 0; i < 4; ++i) {
    a.L.xs[i] = xs[i];
    a.L.ys[i] = ys[i];
  }
  a.eps = eps;
  // The reference clamps the squared distances at the smallest normal of its compute dtype.
  a.tiny = std::numeric_limits<T>::min();
  a.degrees = degrees;
  return a;
}

// x, y: (B, C, H, W) with unit stride along W; out (B, H, W) and gx, gy (B, C, H, W) contiguous.
void forward(uintptr_t x, uintptr_t y, uintptr_t out, std::vector<int64_t> shape, std::vector<int64_t> xs,
             std::vector<int64_t> ys, bool degrees, double eps, bool is_double, int nthreads) {
  if (is_double) {
    forward_impl(make_args<double>(x, y, shape, xs, ys, degrees, eps), reinterpret_cast<double*>(out), nthreads);
  } else {
    forward_impl(make_args<float>(x, y, shape, xs, ys, degrees, eps), reinterpret_cast<float*>(out), nthreads);
  }
}

// grad (B, H, W) with strides gs (any, a broadcast gradient has zeros).
void backward(uintptr_t grad, std::vector<int64_t> gs, uintptr_t x, uintptr_t y, uintptr_t gx, uintptr_t gy,
              std::vector<int64_t> shape, std::vector<int64_t> xs, std::vector<int64_t> ys, bool degrees, double eps,
              bool is_double, int nthreads) {
  if (is_double) {
    backward_impl(make_args<double>(x, y, shape, xs, ys, degrees, eps), reinterpret_cast<const double*>(grad), gs,
                  reinterpret_cast<double*>(gx), reinterpret_cast<double*>(gy), nthreads);
  } else {
    backward_impl(make_args<float>(x, y, shape, xs, ys, degrees, eps), reinterpret_cast<const float*>(grad), gs,
                  reinterpret_cast<float*>(gx), reinterpret_cast<float*>(gy), nthreads);
  }
}

}  // namespace

PYBIND11_MODULE(_cpu_sam, m) {
  m.doc() = "fastfuse cpu backend: spectral angle map forward and backward";
  m.def("forward", &forward, py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, py::call_guard<py::gil_scoped_release>());
}
