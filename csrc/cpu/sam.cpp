// CPU spectral angle map, forward and backward (fastfuse._cpu_sam).
//
// The layout is NCHW: one pixel's spectrum is strided by H·W, a channel's pixels are contiguous.
// So the kernel works on tiles of up to kMaxTile consecutive pixels (a run of the flattened image
// when its rows are contiguous, else of one row): channels outer, pixels inner (unit stride,
// vectorised), per-pixel sums in small arrays that stay in L1. Threads take tiles.
//
// One sweep over a tile's channels reads both spectra from memory once and sums |x|², |y|² and
// x·y in double. For fp32 spectra (fp16/bf16 are widened to fp32 by the launcher) the square of
// any finite value is finite in double and a subnormal's square is not zero, so these raw sums
// are already scale invariant over fp32's whole range; float64 spectra are first divided by their
// peak |value| (one more sweep, from cache), as the reference does. The angle is Kahan's
// 2·atan2(|x̂ − ŷ|, |x̂ + ŷ|), with |x̂ ∓ ŷ|² = 2 ∓ 2cos from the sums; where that cancels (nearly
// identical or opposite spectra, and always for float64, whose result must match the reference
// to ~1e-12) the two distances are summed from the unit vectors in a second sweep over the cached
// tile, exactly as the reference does.
//
// The backward recomputes the same per-pixel geometry in the same tile pass and writes, per
// channel, gx = α·y + β·x and gy = α'·x + β'·y (the gradient of the angle through the unit
// vectors, whose Jacobian removes the radial part). No image-sized temporaries; a gradient that
// is not needed is not computed.
//
// Semantics follow the torch reference (fastfuse.reference.sam): a spectrum with norm ≤ eps gives
// a right angle and a zero gradient; identical/opposite spectra (a cone point) give a zero
// gradient; NaN and ±inf give NaN.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace py = pybind11;

#include "cpu_common.h"  // FASTFUSE_CPU_CLONES

namespace {

// Threads for a call of `work` multiply-adds: small calls run on the calling thread, since an
// OpenMP fork and barrier cost more than they save there (and much more on a loaded machine).
inline int threads_for(int64_t work, int nthreads) { return work < (int64_t(1) << 18) ? 1 : nthreads; }

constexpr int64_t kMaxTile = 1024;
constexpr int64_t kMinTile = 64;
// A tile's two spectra stay in L2 between the sweeps that re-read them (cancellation, float64
// scaling, the backward's gradient sweep).
constexpr int64_t kTileCacheBytes = 256 * 1024;
// Below this |x̂ ∓ ŷ|² (an angle under ~1e-3 rad from 0 or π) the rounding of 2 ∓ 2cos (~C·1e-16)
// would cost more than ~1e-8 of the distance's relative accuracy: sum it from the unit vectors.
constexpr double kCancellation = 1.0 / (1 << 20);
constexpr double kDegreesPerRadian = 57.29577951308232;
constexpr double kRightAngle = 1.5707963267948966;

// x, y: (B, C, rows, W) spectra with unit stride along W (rows × W may be the whole flattened
// image); out (B, rows·W) and gx, gy (B, C, rows·W) contiguous; grad (B, rows, W) with any strides.
struct Layout {
  int64_t B, C, rows, W;
  int64_t xs[4], ys[4], gs[3];
  int64_t plane() const { return rows * W; }
};

// Consecutive pixels whose spectra fit the L2 budget (a multiple of 16: whole vectors).
template <typename T>
int64_t tile_pixels(int64_t C) {
  const int64_t fit = kTileCacheBytes / (2 * C * int64_t(sizeof(T)));
  return std::max(kMinTile, std::min(kMaxTile, fit)) / 16 * 16;
}

// float64 spectra are divided by their peak |value| before any square is formed.
template <typename T> constexpr bool kScaled = std::is_same<T, double>::value;

template <typename T>
inline double scaled(T v, double peak) {
  return kScaled<T> ? double(v) / peak : double(v);
}

// sqrt that vectorises (std::sqrt sets errno, so GCC keeps it a scalar call unless the whole build
// drops -fmath-errno), for v ≥ 0, +inf or NaN (every use here: sums of squares, clamped
// distances): a bit-trick seed for 1/sqrt, four Newton steps (relative error 3% → 1e-21, so
// rounding-limited), one residual correction; ~1 ulp. 0 gives 0 (the seed stays finite), NaN
// stays NaN, +inf is selected. Used where an ulp does not matter: the pixels whose results hinge
// on exact rounding (identical or opposite spectra) are recomputed with std::sqrt.
inline double fast_sqrt(double v) {
  const double half = 0.5 * v;
  double y = __builtin_bit_cast(double, uint64_t(0x5FE6EB50C7B537A9) - (__builtin_bit_cast(uint64_t, v) >> 1));
  y = y * (1.5 - half * y * y);  // unrolled: a loop here would keep the caller's loop scalar
  y = y * (1.5 - half * y * y);
  y = y * (1.5 - half * y * y);
  y = y * (1.5 - half * y * y);
  const double r = v * y;
  const double corrected = r + 0.5 * y * (v - r * r);
  return v < std::numeric_limits<double>::infinity() ? corrected : v;
}

// float64 keeps std::sqrt (correctly rounded, matching the reference to ~1e-12); not a hot path.
template <typename T>
inline double root(double v) {
  return kScaled<T> ? std::sqrt(v) : fast_sqrt(v);
}

// Per-pixel geometry of one tile (a thread's scratch, reused for every tile it takes).
struct TileGeometry {
  std::vector<double> buffer;
  double *px, *py;      // peak |value| (1 for unscaled spectra, and where the peak is 0 or NaN)
  double *xx, *yy, *xy; // sums of squares and of products of the (scaled) spectra
  double *root;         // sqrt(xx·yy), the product of the norms (1 where the pixel has no direction)
  double *nx, *ny;      // scaled norms (1 where no direction), only where the second sweep runs
  double *d2, *s2;      // |x̂ − ŷ|², |x̂ + ŷ|²
  double *cosine;       // x̂ · ŷ
  double *valid;        // 1 where both norms are > eps (NaN counts), else 0
  double *exact;        // 1 where the distances need the second sweep, else 0
  // (flags as doubles: the vector loops that write and select on them need no mask conversion)

  TileGeometry() : buffer(13 * kMaxTile) {
    double** fields[] = {&px, &py, &xx, &yy, &xy, &root, &nx, &ny, &d2, &s2, &cosine, &valid, &exact};
    for (int i = 0; i < 13; ++i) *fields[i] = buffer.data() + i * kMaxTile;
  }
};

template <typename T>
FASTFUSE_CPU_CLONES void peaks(const T* x, const T* y, int64_t xsc, int64_t ysc, int64_t C, int64_t n,
                               double* px, double* py) {
  std::fill(px, px + n, 0.0);
  std::fill(py, py + n, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    const T* xr = x + c * xsc;
    const T* yr = y + c * ysc;
#pragma omp simd
    for (int64_t p = 0; p < n; ++p) {
      const double ax = std::fabs(double(xr[p])), ay = std::fabs(double(yr[p]));
      px[p] = (ax > px[p] || ax != ax) ? ax : px[p];  // NaN sticks, as in torch.amax
      py[p] = (ay > py[p] || ay != ay) ? ay : py[p];
    }
  }
  for (int64_t p = 0; p < n; ++p) {  // the reference divides a zero (or NaN) peak's spectrum by 1
    px[p] = px[p] > 0 ? px[p] : 1.0;
    py[p] = py[p] > 0 ? py[p] : 1.0;
  }
}

// |x|², |y|², x·y of a tile, four channels per sweep over the accumulators.
template <typename T>
FASTFUSE_CPU_CLONES void channel_sums(const T* x, const T* y, int64_t xsc, int64_t ysc, int64_t C, int64_t n,
                                      const double* px, const double* py, double* xx, double* yy, double* xy) {
  std::fill(xx, xx + n, 0.0);
  std::fill(yy, yy + n, 0.0);
  std::fill(xy, xy + n, 0.0);
  int64_t c = 0;
  for (; c + 4 <= C; c += 4) {
    const T *x0 = x + c * xsc, *x1 = x0 + xsc, *x2 = x1 + xsc, *x3 = x2 + xsc;
    const T *y0 = y + c * ysc, *y1 = y0 + ysc, *y2 = y1 + ysc, *y3 = y2 + ysc;
#pragma omp simd
    for (int64_t p = 0; p < n; ++p) {
      const double a0 = scaled(x0[p], px[p]), a1 = scaled(x1[p], px[p]);
      const double a2 = scaled(x2[p], px[p]), a3 = scaled(x3[p], px[p]);
      const double b0 = scaled(y0[p], py[p]), b1 = scaled(y1[p], py[p]);
      const double b2 = scaled(y2[p], py[p]), b3 = scaled(y3[p], py[p]);
      xx[p] += (a0 * a0 + a1 * a1) + (a2 * a2 + a3 * a3);
      yy[p] += (b0 * b0 + b1 * b1) + (b2 * b2 + b3 * b3);
      xy[p] += (a0 * b0 + a1 * b1) + (a2 * b2 + a3 * b3);
    }
  }
  for (; c < C; ++c) {
    const T* xr = x + c * xsc;
    const T* yr = y + c * ysc;
#pragma omp simd
    for (int64_t p = 0; p < n; ++p) {
      const double a = scaled(xr[p], px[p]), b = scaled(yr[p], py[p]);
      xx[p] += a * a;
      yy[p] += b * b;
      xy[p] += a * b;
    }
  }
}

// |x̂ − ŷ|² and |x̂ + ŷ|² summed from the unit vectors over pixels [lo, hi) (the reference's way:
// dividing by the norm, so that a one-channel spectrum's unit vector is exactly ±1).
template <typename T>
FASTFUSE_CPU_CLONES void unit_distances(const T* x, const T* y, int64_t xsc, int64_t ysc, int64_t C, int64_t lo,
                                        int64_t hi, const TileGeometry& g, double* d2, double* s2) {
  std::fill(d2 + lo, d2 + hi, 0.0);
  std::fill(s2 + lo, s2 + hi, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    const T* xr = x + c * xsc;
    const T* yr = y + c * ysc;
#pragma omp simd
    for (int64_t p = lo; p < hi; ++p) {
      const double ux = scaled(xr[p], g.px[p]) / g.nx[p], uy = scaled(yr[p], g.py[p]) / g.ny[p];
      const double a = ux - uy, b = ux + uy;
      d2[p] += a * a;
      s2[p] += b * b;
    }
  }
}

// 1 where both spectra have a direction, 0 where a norm is at most eps; written so that NaN
// compares as directed. float64: the true norm is peak·(scaled norm); fp32 sums are unscaled, so
// their squares are compared (no sqrt, which keeps the caller's loop vectorised; the same test
// up to eps²'s rounding). A double, selected rather than a bool negated: GCC vectorises this form.
template <typename T>
inline double directed(const TileGeometry& g, int64_t p, double eps, double eps2) {
  if constexpr (kScaled<T>) {
    return (g.px[p] * std::sqrt(g.xx[p]) <= eps) | (g.py[p] * std::sqrt(g.yy[p]) <= eps) ? 0.0 : 1.0;
  } else {
    return (g.xx[p] <= eps2) | (g.yy[p] <= eps2) ? 0.0 : 1.0;
  }
}

// Norms, validity, cosine and the distances 2 ∓ 2cos from the sums; `exact` marks the pixels
// whose distances must be summed from the unit vectors instead.
template <typename T>
FASTFUSE_CPU_CLONES void per_pixel_geometry(TileGeometry& g, int64_t n, double eps) {
  const double eps2 = eps * eps;
#pragma omp simd
  for (int64_t p = 0; p < n; ++p) {
    const double valid = directed<T>(g, p, eps, eps2);
    const double norms = root<T>(g.xx[p] * g.yy[p]);
    const double cosine = g.xy[p] / norms;
    const double d2 = 2.0 - 2.0 * cosine, s2 = 2.0 + 2.0 * cosine;
    g.valid[p] = valid;
    g.root[p] = valid != 0.0 ? norms : 1.0;  // an undirected spectrum divides by 1: every product stays finite
    g.cosine[p] = cosine;
    g.d2[p] = d2;
    g.s2[p] = s2;
    g.exact[p] = kScaled<T> | (d2 < kCancellation) | (s2 < kCancellation) ? valid : 0.0;
  }
}

// The geometry of n pixels whose spectra start at x and y (channel strides xsc, ysc). `scratch`
// (two tile-sized arrays) receives the second sweep's distances.
template <typename T>
void measure(const T* x, const T* y, int64_t xsc, int64_t ysc, int64_t C, int64_t n, double eps, TileGeometry& g,
             double* scratch_d2, double* scratch_s2) {
  if (kScaled<T>) {
    peaks(x, y, xsc, ysc, C, n, g.px, g.py);
  } else {
    std::fill(g.px, g.px + n, 1.0);
    std::fill(g.py, g.py + n, 1.0);
  }
  channel_sums(x, y, xsc, ysc, C, n, g.px, g.py, g.xx, g.yy, g.xy);
  per_pixel_geometry<T>(g, n, eps);
  int64_t lo = 0, hi = n;
  while (lo < n && g.exact[lo] == 0.0) ++lo;
  while (hi > lo && g.exact[hi - 1] == 0.0) --hi;
  if (lo < hi) {
    // Correctly rounded norms and cosine here: sqrt(fl(a·a)) == a makes identical spectra's cosine
    // exactly 1 and a one-channel spectrum's unit vector exactly ±1, as in the reference.
    for (int64_t p = lo; p < hi; ++p) {
      const bool valid = g.valid[p] != 0.0;
      g.nx[p] = valid ? std::sqrt(g.xx[p]) : 1.0;
      g.ny[p] = valid ? std::sqrt(g.yy[p]) : 1.0;
      if (g.exact[p] != 0.0) {
        g.root[p] = std::sqrt(g.xx[p] * g.yy[p]);
        g.cosine[p] = g.xy[p] / g.root[p];
      }
    }
    unit_distances(x, y, xsc, ysc, C, lo, hi, g, scratch_d2, scratch_s2);
    for (int64_t p = lo; p < hi; ++p) {
      if (g.exact[p] != 0.0) {
        g.d2[p] = scratch_d2[p];
        g.s2[p] = scratch_s2[p];
      }
    }
  }
}

template <typename T>
double clamp_tiny(double v) {
  // The reference clamps the squared distances at the smallest normal of its compute dtype
  // (written so that NaN passes, as torch.clamp_min).
  const double tiny = std::numeric_limits<T>::min();
  return v < tiny ? tiny : v;
}

// atan(t) for t in [0, 1] (NaN passes). Reduced to |u| ≤ tan(π/8) by atan(t) = π/4 + atan((t−1)/(t+1)),
// then u·P(u²), P of degree 6 fitted by least squares at Chebyshev nodes to atan(u)/u: relative
// error 2e-11, far below fp32's rounding, and it vectorises where libm's atan2 is a call per pixel.
inline double atan_unit(double t) {
  constexpr double kTanPiOver8 = 0.41421356237309503, kQuarterPi = 0.78539816339744831;
  const bool reduced = t > kTanPiOver8;
  // Operands are selected, not results: a division under a branch keeps the loop scalar.
  const double u = (reduced ? t - 1.0 : t) / (reduced ? t + 1.0 : 1.0);
  const double z = u * u;
  const double poly = 0.99999999997912836 +
      z * (-0.33333332127876952 + z * (0.19999885898498251 + z * (-0.14281639254723755 +
      z * (0.11041054104849082 + z * (-0.084591088641877532 + z * 0.047129966583857201)))));
  return (reduced ? kQuarterPi : 0.0) + u * poly;
}

// Kahan's angle 2·atan2(d, s) from d², s² > 0 (or NaN, which passes). float64 keeps libm's atan2:
// its results must match the float64 reference to ~1e-12.
template <typename T>
inline double kahan_angle(double d2, double s2) {
  if (kScaled<T>) return 2.0 * std::atan2(std::sqrt(d2), std::sqrt(s2));
  const bool steep = d2 > s2;  // false for NaN: the ratio is then NaN
  const double a = atan_unit(fast_sqrt((steep ? s2 : d2) / (steep ? d2 : s2)));
  return 2.0 * (steep ? kRightAngle - a : a);
}

template <typename T>
FASTFUSE_CPU_CLONES void angles(const TileGeometry& g, int64_t n, bool degrees, T* out) {
  const double unit = degrees ? kDegreesPerRadian : 1.0;
#pragma omp simd
  for (int64_t p = 0; p < n; ++p) {
    const double kahan = kahan_angle<T>(clamp_tiny<T>(g.d2[p]), clamp_tiny<T>(g.s2[p]));
    const double theta = g.valid[p] != 0.0 ? kahan : kRightAngle;
    out[p] = static_cast<T>(theta * unit);
  }
}

// Per-pixel coefficients of the gradient sweep: gx = x_y·ŷ-part + x_x·x̂-part, on loaded values.
struct Coefficients {
  double *x_from_y, *x_from_x, *y_from_x, *y_from_y;
};

// Vector-Jacobian product of angle = 2·atan2(D, S), D² = |x̂ − ŷ|², S² = |x̂ + ŷ|²:
//   dangle/d(D²) = S / (D (D² + S²)),  dangle/d(S²) = −D / (S (D² + S²))  (zero where clamped).
// On unit vectors D² = 2 − 2 x̂·ŷ and S² = 2 + 2 x̂·ŷ, so dangle/d(x̂·ŷ) = K = 2 (g_S² − g_D²), and
// through x̂ = x / |x| (whose Jacobian removes the radial part): gx = K (ŷ − cos x̂) / |x|.
template <typename T>
FASTFUSE_CPU_CLONES void gradient_coefficients(const TileGeometry& g, const T* grad, int64_t grad_stride, int64_t n,
                                               bool degrees, const Coefficients& k) {
  const double tiny = std::numeric_limits<T>::min(), unit = degrees ? kDegreesPerRadian : 1.0;
  // The (possibly strided or broadcast) incoming gradient, widened first: keeps the loop below
  // free of strided narrow loads, which GCC does not vectorise.
  double* gtheta_of = k.x_from_y;
  for (int64_t p = 0; p < n; ++p) gtheta_of[p] = double(grad[p * grad_stride]) * unit;
  // Local pointers: through `g` and `k` GCC cannot tell that the stores leave the fields alone.
  const double *d2_of = g.d2, *s2_of = g.s2, *valid = g.valid, *cosine = g.cosine, *xx_of = g.xx, *yy_of = g.yy;
  const double *px = g.px, *py = g.py, *norms = g.root;
  double *x_from_y = k.x_from_y, *x_from_x = k.x_from_x, *y_from_x = k.y_from_x, *y_from_y = k.y_from_y;
#pragma omp simd
  for (int64_t p = 0; p < n; ++p) {
    const double gtheta = gtheta_of[p];
    // S / (D (D² + S²)) = S² / (D S (D² + S²)): one sqrt.
    const double d2 = clamp_tiny<T>(d2_of[p]), s2 = clamp_tiny<T>(s2_of[p]);
    const double scale = root<T>(d2 * s2) * (d2 + s2);
    const double gd2 = (d2_of[p] >= tiny ? gtheta * s2 : 0.0) / scale;
    const double gs2 = (s2_of[p] >= tiny ? -gtheta * d2 : 0.0) / scale;
    // An invalid pixel's angle is the constant right angle: zero gradient (whatever its sums hold).
    const double K = valid[p] != 0.0 ? 2.0 * (gs2 - gd2) : 0.0, c = valid[p] != 0.0 ? cosine[p] : 0.0;
    // gx = K (ŷ − c x̂) / |x| = K (y / (|x| |y|) − c x / |x|²), on the scaled values (hence / peak).
    const double xx = valid[p] != 0.0 ? xx_of[p] : 1.0, yy = valid[p] != 0.0 ? yy_of[p] : 1.0;
    x_from_y[p] = K / (px[p] * norms[p]);
    x_from_x[p] = -K * c / (px[p] * xx);
    y_from_x[p] = K / (py[p] * norms[p]);
    y_from_y[p] = -K * c / (py[p] * yy);
  }
}

// out = on_x·x + on_y·y per pixel, for one channel (the loaded values scaled as in the sums).
template <typename T>
inline void combine_channel(const T* xr, const T* yr, const TileGeometry& g, const double* on_x, const double* on_y,
                            int64_t n, T* out) {
#pragma omp simd
  for (int64_t p = 0; p < n; ++p) {
    out[p] = static_cast<T>(on_x[p] * scaled(xr[p], g.px[p]) + on_y[p] * scaled(yr[p], g.py[p]));
  }
}

template <typename T>
FASTFUSE_CPU_CLONES void gradient_sweep(const T* x, const T* y, int64_t xsc, int64_t ysc, int64_t C, int64_t n,
                                        const TileGeometry& g, const Coefficients& k, T* gx, T* gy,
                                        int64_t plane) {
  for (int64_t c = 0; c < C; ++c) {
    const T* xr = x + c * xsc;
    const T* yr = y + c * ysc;
    if (gx != nullptr) combine_channel(xr, yr, g, k.x_from_x, k.x_from_y, n, gx + c * plane);
    if (gy != nullptr) combine_channel(xr, yr, g, k.y_from_x, k.y_from_y, n, gy + c * plane);
  }
}

// Runs `body(tile_geometry, scratch, x, y, b, row, w0, n)` over every tile, threads over tiles.
template <typename T, typename Body>
void for_each_tile(const T* x, const T* y, const Layout& L, double eps, int nthreads, Body&& body) {
  const int64_t tile = tile_pixels<T>(L.C);
  const int64_t per_row = (L.W + tile - 1) / tile, tasks = L.B * L.rows * per_row;
#pragma omp parallel num_threads(threads_for(L.B * L.C * L.rows * L.W, nthreads))
  {
    TileGeometry g;
    std::vector<double> scratch(6 * kMaxTile);
#pragma omp for schedule(dynamic, 4)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t row = t / per_row, w0 = (t % per_row) * tile, n = std::min(tile, L.W - w0);
      const int64_t b = row / L.rows, h = row % L.rows;
      const T* xt = x + b * L.xs[0] + h * L.xs[2] + w0;
      const T* yt = y + b * L.ys[0] + h * L.ys[2] + w0;
      measure(xt, yt, L.xs[1], L.ys[1], L.C, n, eps, g, scratch.data(), scratch.data() + kMaxTile);
      body(g, scratch.data(), xt, yt, b, h, w0, n);
    }
  }
}

template <typename T>
void forward_impl(const T* x, const T* y, T* out, const Layout& L, bool degrees, double eps, int nthreads) {
  for_each_tile(x, y, L, eps, nthreads,
                [&](const TileGeometry& g, double*, const T*, const T*, int64_t b, int64_t h, int64_t w0, int64_t n) {
                  angles(g, n, degrees, out + (b * L.rows + h) * L.W + w0);
                });
}

template <typename T>
void backward_impl(const T* grad, const T* x, const T* y, T* gx, T* gy, const Layout& L, bool degrees, double eps,
                   int nthreads) {
  const int64_t plane = L.plane();
  for_each_tile(x, y, L, eps, nthreads,
                [&](const TileGeometry& g, double* scratch, const T* xt, const T* yt, int64_t b, int64_t h,
                    int64_t w0, int64_t n) {
                  // The distances' scratch is spent by now: its next four arrays hold the coefficients.
                  const Coefficients k{scratch + 2 * kMaxTile, scratch + 3 * kMaxTile, scratch + 4 * kMaxTile,
                                       scratch + 5 * kMaxTile};
                  gradient_coefficients(g, grad + b * L.gs[0] + h * L.gs[1] + w0 * L.gs[2], L.gs[2], n, degrees, k);
                  const int64_t offset = b * L.C * plane + h * L.W + w0;
                  gradient_sweep(xt, yt, L.xs[1], L.ys[1], L.C, n, g, k, gx ? gx + offset : nullptr,
                                 gy ? gy + offset : nullptr, plane);
                });
}

// shape (B, C, H, W); strides of x, y (unit along W unless W == 1) and of grad (B, H, W). When
// every tensor's rows follow each other without a gap the image is one run of H·W pixels.
Layout make_layout(const std::vector<int64_t>& shape, const std::vector<int64_t>& xs, const std::vector<int64_t>& ys,
                   const std::vector<int64_t>& gs) {
  Layout L;
  L.B = shape[0]; L.C = shape[1]; L.rows = shape[2]; L.W = shape[3];
  for (int i = 0; i < 4; ++i) {
    L.xs[i] = xs[i];
    L.ys[i] = ys[i];
  }
  for (int i = 0; i < 3; ++i) L.gs[i] = gs.empty() ? 0 : gs[i];
  const bool unit = (L.xs[3] == 1 && L.ys[3] == 1) || L.W == 1;
  const bool runs = unit && L.xs[2] == L.W && L.ys[2] == L.W && (gs.empty() || L.gs[1] == L.W * L.gs[2]);
  if (runs) {
    L.W *= L.rows;
    L.rows = 1;
  }
  return L;
}

void forward(uintptr_t x, uintptr_t y, uintptr_t out, std::vector<int64_t> shape, std::vector<int64_t> xs,
             std::vector<int64_t> ys, bool degrees, double eps, bool is_double, int nthreads) {
  const Layout L = make_layout(shape, xs, ys, {});
  if (is_double) {
    forward_impl(reinterpret_cast<const double*>(x), reinterpret_cast<const double*>(y),
                 reinterpret_cast<double*>(out), L, degrees, eps, nthreads);
  } else {
    forward_impl(reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(y), reinterpret_cast<float*>(out),
                 L, degrees, eps, nthreads);
  }
}

// gx or gy may be 0: that gradient is not computed.
void backward(uintptr_t grad, std::vector<int64_t> gs, uintptr_t x, uintptr_t y, uintptr_t gx, uintptr_t gy,
              std::vector<int64_t> shape, std::vector<int64_t> xs, std::vector<int64_t> ys, bool degrees, double eps,
              bool is_double, int nthreads) {
  const Layout L = make_layout(shape, xs, ys, gs);
  if (is_double) {
    backward_impl(reinterpret_cast<const double*>(grad), reinterpret_cast<const double*>(x),
                  reinterpret_cast<const double*>(y), reinterpret_cast<double*>(gx), reinterpret_cast<double*>(gy), L,
                  degrees, eps, nthreads);
  } else {
    backward_impl(reinterpret_cast<const float*>(grad), reinterpret_cast<const float*>(x),
                  reinterpret_cast<const float*>(y), reinterpret_cast<float*>(gx), reinterpret_cast<float*>(gy), L,
                  degrees, eps, nthreads);
  }
}

}  // namespace

PYBIND11_MODULE(_cpu_sam, m) {
  m.doc() = "fastfuse cpu backend: spectral angle map forward and backward";
  m.def("forward", &forward, py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, py::call_guard<py::gil_scoped_release>());
}
