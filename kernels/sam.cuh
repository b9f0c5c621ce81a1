// Spectral angle (SAM) map, forward and backward: header-only CUDA templates.
//
// Layout is channel-first, x[b, c, p] at b*C*P + c*P + p (P = H*W), so one thread per pixel
// makes every channel's load coalesced across a warp. Offsets are 64-bit throughout.
//
// The math is the reference's (fastfuse/reference/sam.py), step for step:
//   each spectrum is first divided by its peak |value| (1 where that is 0 or NaN), so no square
//   overflows or underflows and the angle is scale invariant (x * 1e20 gives x's angle);
//   nx = sqrt(max(|xs|^2, tiny)), ux = xs / nx (same for y); a pixel whose true norm peak * nx
//   or peak_y * ny is <= eps (eps >= 0, 0 included) is "invalid": right angle, zero gradient,
//   and its spectra are divided by 1 so that nothing is 0 * inf. NaN compares as valid and
//   propagates; +-inf makes the scaled spectrum NaN. The angle is Kahan's
//   2*atan2(|ux - uy|, |ux + uy|), whose squared norms are clamped at the smallest normal
//   number so that identical and opposite spectra get a zero gradient instead of 0/0. Every
//   clamp is written `v < lo ? lo : v` so that NaN passes through as in torch.clamp_min (fmaxf
//   would swallow it).
//
// The backward is the exact vector-Jacobian product of that expression (see backward_at): the
// projections ux.(ux -+ uy) and uy.(ux -+ uy) are accumulated directly rather than derived from
// |ux| = 1, because at nearly identical spectra the rounding of |ux|^2 - |uy|^2 is larger than
// |ux - uy|^2 itself and the shortcut would give O(1) garbage there.
//
// Everything below the kernels is __host__ __device__, so the exact per-pixel code the GPU runs
// can also be compiled for the host and checked against the reference without a GPU
// (tests/test_extension_build.py does this).
#pragma once

#include <cstdint>

#include "kernels/common.cuh"

namespace fastfuse {
namespace sam {

// Like torch.clamp_min: NaN stays NaN.
template <typename A> FASTFUSE_HD A clamp_below(A v, A lo) { return v < lo ? lo : v; }

constexpr double kHalfPi = 1.57079632679489661923;
constexpr double kDegreesPerRadian = 57.295779513082320876;  // 180 / pi

// The largest finite value of the accumulation type.
template <typename A> FASTFUSE_HD A largest();
template <> FASTFUSE_HD float largest<float>() { return FLT_MAX; }
template <> FASTFUSE_HD double largest<double>() { return DBL_MAX; }

// v / peak as multiplies, no division (a division's slow path is a call that spills): by the
// reciprocal, and for a subnormal peak, whose reciprocal overflows, first by 2^64 (exact, and it
// makes the peak normal) and then by the reciprocal of peak * 2^64. One rounding either way.
template <typename A>
struct Unscale {
  A pre, inverse;
  FASTFUSE_HD explicit Unscale(A peak = A(1)) {
    const A direct = A(1) / peak;
    const bool overflows = !(direct <= largest<A>());
    pre = overflows ? A(18446744073709551616.0) : A(1);  // 2^64
    inverse = overflows ? A(1) / (peak * pre) : direct;
  }
  FASTFUSE_HD A operator()(A v) const { return v * pre * inverse; }
};

// One pixel's spectra read from global memory on every pass: any channel count. The passes
// after the first re-read the same cache lines, which the same thread has just touched. After
// divide_by(px, py) every pass sees the spectra divided by their peaks.
template <typename T>
struct StreamedSpectra {
  using A = acc_t<T>;
  const T* x;
  const T* y;
  int64_t channels;
  int64_t stride;  // elements between consecutive channels of one pixel (P)
  Unscale<A> sx{}, sy{};

  FASTFUSE_HD void divide_by(A px, A py) {
    sx = Unscale<A>(px);
    sy = Unscale<A>(py);
  }

  template <typename F> FASTFUSE_HD void for_each(F&& f) const {
    for (int64_t c = 0; c < channels; ++c) f(c, sx(to_acc(x[c * stride])), sy(to_acc(y[c * stride])));
  }
};

// One pixel's spectra held in registers (C <= K): each spectrum is read from memory once. The
// loops are fully unrolled over the compile-time K so the arrays stay in registers; channels
// past C are skipped by a predicate, not a data-dependent trip count.
template <typename T, int K>
struct CachedSpectra {
  using A = acc_t<T>;
  A xs[K];
  A ys[K];
  int channels;

  FASTFUSE_HD CachedSpectra(const T* x, const T* y, int64_t num_channels, int64_t stride)
      : channels(static_cast<int>(num_channels)) {
#pragma unroll
    for (int c = 0; c < K; ++c) {
      if (c < channels) {
        xs[c] = to_acc(x[c * stride]);
        ys[c] = to_acc(y[c * stride]);
      } else {
        xs[c] = A(0);
        ys[c] = A(0);
      }
    }
  }

  // Scales the registers in place: the later passes pay nothing for it.
  FASTFUSE_HD void divide_by(A px, A py) {
    const Unscale<A> sx(px), sy(py);
#pragma unroll
    for (int c = 0; c < K; ++c) {
      xs[c] = sx(xs[c]);
      ys[c] = sy(ys[c]);
    }
  }

  template <typename F> FASTFUSE_HD void for_each(F&& f) const {
#pragma unroll
    for (int c = 0; c < K; ++c) {
      if (c < channels) f(static_cast<int64_t>(c), xs[c], ys[c]);
    }
  }
};

// What the angle and its gradient need from one pixel's two spectra.
template <typename A>
struct Geometry {
  A rx, ry;    // 1 / clamped norms of the scaled spectra (1 where invalid)
  A gx_scale, gy_scale;  // rx / peak, ry / peak_y: from the scaled spectra's gradient to x's
  A d2, s2;    // |ux - uy|^2 and |ux + uy|^2
  A xa, xb;    // ux.(ux - uy), ux.(ux + uy): only the backward uses these
  A ya, yb;    // uy.(ux - uy), uy.(ux + uy)
  bool valid;  // both norms > eps (true for NaN, so that NaN propagates)
};

// Like torch.amax(|v|): NaN sticks.
template <typename A> FASTFUSE_HD A peak_step(A peak, A v) {
  const A a = v < A(0) ? -v : v;
  return (a > peak || a != a) ? a : peak;
}

// Three passes: the peaks, the scaled norms, then the unit vectors' distances, each a plain
// sum in A. Leaves `s` divided by the peaks.
template <typename A, typename Spectra>
FASTFUSE_HD Geometry<A> measure(Spectra& s, A eps) {
  A px = 0, py = 0;
  s.for_each([&](int64_t, A xv, A yv) {
    px = peak_step(px, xv);
    py = peak_step(py, yv);
  });
  // The reference divides a zero (or NaN) peak's spectrum by 1, but tests the norm with the
  // true peak (so a zero spectrum's norm is 0, not sqrt(tiny), and is invalid for eps = 0).
  const A raw_px = px, raw_py = py;
  px = px > A(0) ? px : A(1);
  py = py > A(0) ? py : A(1);
  s.divide_by(px, py);
  A sxx = 0, syy = 0;
  s.for_each([&](int64_t, A xv, A yv) {
    sxx += xv * xv;
    syy += yv * yv;
  });
  Geometry<A> g;
  const A tiny = smallest_normal<A>();
  const A nx = sqrt_acc(clamp_below(sxx, tiny));  // in [1, sqrt(C)] unless the spectrum is 0
  const A ny = sqrt_acc(clamp_below(syy, tiny));
  g.valid = !(raw_px * nx <= eps || raw_py * ny <= eps);
  g.rx = g.valid ? A(1) / nx : A(1);
  g.ry = g.valid ? A(1) / ny : A(1);
  // May be inf for a subnormal peak, as the true gradient (~1 / peak) is; unused where invalid.
  g.gx_scale = g.rx / px;
  g.gy_scale = g.ry / py;
  g.d2 = g.s2 = g.xa = g.xb = g.ya = g.yb = A(0);
  s.for_each([&](int64_t, A xv, A yv) {
    const A ux = xv * g.rx, uy = yv * g.ry;
    const A a = ux - uy, b = ux + uy;
    g.d2 += a * a;
    g.s2 += b * b;
    g.xa += ux * a;
    g.xb += ux * b;
    g.ya += uy * a;
    g.yb += uy * b;
  });
  return g;
}

template <typename A>
FASTFUSE_HD A angle_of(const Geometry<A>& g, bool degrees) {
  const A tiny = smallest_normal<A>();
  const A dist = sqrt_acc(clamp_below(g.d2, tiny));
  const A sum = sqrt_acc(clamp_below(g.s2, tiny));
  const A theta = g.valid ? A(2) * atan2_acc(dist, sum) : A(kHalfPi);
  return degrees ? theta * A(kDegreesPerRadian) : theta;
}

template <typename T, int K>
FASTFUSE_HD void forward_at(const T* x, const T* y, T* out, int64_t channels, int64_t stride,
                            acc_t<T> eps, bool degrees) {
  using A = acc_t<T>;
  if constexpr (K > 0) {
    CachedSpectra<T, K> s(x, y, channels, stride);
    *out = from_acc<T>(angle_of(measure<A>(s, eps), degrees));
  } else {
    StreamedSpectra<T> s{x, y, channels, stride};
    *out = from_acc<T>(angle_of(measure<A>(s, eps), degrees));
  }
}

// Vector-Jacobian product of angle = 2*atan2(D, S), D = |ux - uy|, S = |ux + uy|:
//   dangle/d(D^2) = S / (D (D^2 + S^2)),  dangle/d(S^2) = -D / (S (D^2 + S^2))
// (each zero where its clamp is active), then through a = ux - uy and b = ux + uy to the unit
// vectors, then through ux = xs / |xs|, whose Jacobian projects out the radial part, and
// xs = x / peak (the peak is a constant of the angle):
//   gx = (gux - ux (ux . gux)) / (nx peak),   gux = 2 g_d2 a + 2 g_s2 b,   guy = -2 g_d2 a + 2 g_s2 b.
template <typename T, typename Spectra>
FASTFUSE_HD void backward_pixel(Spectra& s, acc_t<T> grad, T* gx, T* gy, int64_t stride,
                                acc_t<T> eps, bool degrees) {
  using A = acc_t<T>;
  const Geometry<A> g = measure<A>(s, eps);
  const A tiny = smallest_normal<A>();
  A gd2 = 0, gs2 = 0;
  if (g.valid) {  // an invalid pixel's angle is the constant right angle: zero gradient
    const A gtheta = degrees ? grad * A(kDegreesPerRadian) : grad;
    const A dist = sqrt_acc(clamp_below(g.d2, tiny));
    const A sum = sqrt_acc(clamp_below(g.s2, tiny));
    const A denom = dist * dist + sum * sum;
    if (g.d2 >= tiny) gd2 = gtheta * sum / (dist * denom);
    if (g.s2 >= tiny) gs2 = -gtheta * dist / (sum * denom);
  }
  const A two_gd2 = A(2) * gd2, two_gs2 = A(2) * gs2;
  const A radial_x = two_gd2 * g.xa + two_gs2 * g.xb;   // ux . gux
  const A radial_y = -two_gd2 * g.ya + two_gs2 * g.yb;  // uy . guy
  s.for_each([&](int64_t c, A xv, A yv) {
    const A ux = xv * g.rx, uy = yv * g.ry;
    const A a = ux - uy, b = ux + uy;
    // An invalid pixel's gradient is 0, written as such: its scale may be inf (a tiny peak).
    gx[c * stride] = from_acc<T>(g.valid ? (two_gd2 * a + two_gs2 * b - radial_x * ux) * g.gx_scale : A(0));
    gy[c * stride] = from_acc<T>(g.valid ? (-two_gd2 * a + two_gs2 * b - radial_y * uy) * g.gy_scale : A(0));
  });
}

template <typename T, int K>
FASTFUSE_HD void backward_at(const T* x, const T* y, T grad, T* gx, T* gy, int64_t channels,
                             int64_t stride, acc_t<T> eps, bool degrees) {
  if constexpr (K > 0) {
    CachedSpectra<T, K> s(x, y, channels, stride);
    backward_pixel<T>(s, to_acc(grad), gx, gy, stride, eps, degrees);
  } else {
    StreamedSpectra<T> s{x, y, channels, stride};
    backward_pixel<T>(s, to_acc(grad), gx, gy, stride, eps, degrees);
  }
}

// Channel counts up to this are held in registers (HSI benchmarks: 31 bands for CAVE/Harvard;
// MSI 3-8); larger ones stream. 32 fp32 values per spectrum is 64 registers per thread.
constexpr int kCachedChannels = 32;
constexpr int kThreadsPerBlock = 256;

// Grid: x covers the P pixels of one image, y strides over the batch (gridDim.y <= 65535).
template <typename T, int K>
__global__ void __launch_bounds__(kThreadsPerBlock)
forward_kernel(const T* __restrict__ x, const T* __restrict__ y, T* __restrict__ out,
               int64_t batch, int64_t channels, int64_t pixels, acc_t<T> eps, bool degrees) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= pixels) return;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int64_t base = b * channels * pixels + p;
    forward_at<T, K>(x + base, y + base, out + b * pixels + p, channels, pixels, eps, degrees);
  }
}

// With __launch_bounds__(256) ptxas 13 for sm_90 holds the fp32 cached backward to 128 registers
// and spills 40 B; __maxnreg__(255) (CUDA 12.4+) lets it take the ~160 it needs, as sm_80-89 do
// by themselves. Blocks of 256 threads still fit: 256 × 255 < 65536 registers per SM.
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 4))
#define FASTFUSE_SAM_BACKWARD_BOUNDS __maxnreg__(255)
#else
#define FASTFUSE_SAM_BACKWARD_BOUNDS __launch_bounds__(kThreadsPerBlock)
#endif

template <typename T, int K>
__global__ void FASTFUSE_SAM_BACKWARD_BOUNDS
backward_kernel(const T* __restrict__ grad, const T* __restrict__ x, const T* __restrict__ y,
                T* __restrict__ gx, T* __restrict__ gy, int64_t batch, int64_t channels,
                int64_t pixels, acc_t<T> eps, bool degrees) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= pixels) return;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int64_t base = b * channels * pixels + p;
    backward_at<T, K>(x + base, y + base, grad[b * pixels + p], gx + base, gy + base, channels,
                      pixels, eps, degrees);
  }
}

}  // namespace sam
}  // namespace fastfuse
