// Spectral angle (SAM) map, forward and backward: header-only CUDA templates.
//
// Layout is channel-first, x[b, c, p] at b*C*P + c*P + p (P = H*W), so one thread per pixel
// makes every channel's load coalesced across a warp. Offsets are 64-bit throughout.
//
// The math is the reference's (fastfuse/reference/sam.py), step for step:
//   nx = sqrt(max(|x|^2, eps^2)), ux = x / nx (same for y); a pixel whose nx or ny is <= eps is
//   "invalid": right angle, zero gradient. The angle is Kahan's 2*atan2(|ux - uy|, |ux + uy|),
//   whose squared norms are clamped at the smallest normal number so that identical and
//   opposite spectra get a zero gradient instead of 0/0. Every clamp is written `v < lo ? lo : v`
//   so that NaN passes through as in torch.clamp_min (fmaxf would swallow it).
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

// One pixel's spectra read from global memory on every pass: any channel count. The passes
// after the first re-read the same cache lines, which the same thread has just touched.
template <typename T>
struct StreamedSpectra {
  using A = acc_t<T>;
  const T* x;
  const T* y;
  int64_t channels;
  int64_t stride;  // elements between consecutive channels of one pixel (P)

  template <typename F> FASTFUSE_HD void for_each(F&& f) const {
    for (int64_t c = 0; c < channels; ++c) f(c, to_acc(x[c * stride]), to_acc(y[c * stride]));
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
  A rx, ry;    // 1 / clamped norms
  A d2, s2;    // |ux - uy|^2 and |ux + uy|^2
  A xa, xb;    // ux.(ux - uy), ux.(ux + uy): only the backward uses these
  A ya, yb;    // uy.(ux - uy), uy.(ux + uy)
  bool valid;  // both norms > eps (true for NaN, so that NaN propagates)
};

// Two passes: the norms first, then the unit vectors' distances, each a plain sum in A.
template <typename A, typename Spectra>
FASTFUSE_HD Geometry<A> measure(const Spectra& s, A eps) {
  A sxx = 0, syy = 0;
  s.for_each([&](int64_t, A xv, A yv) {
    sxx += xv * xv;
    syy += yv * yv;
  });
  const A eps2 = eps * eps;
  const A nx = sqrt_acc(clamp_below(sxx, eps2));
  const A ny = sqrt_acc(clamp_below(syy, eps2));
  Geometry<A> g;
  g.valid = !(nx <= eps || ny <= eps);
  g.rx = A(1) / nx;
  g.ry = A(1) / ny;
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
    *out = from_acc<T>(angle_of(measure<A>(CachedSpectra<T, K>(x, y, channels, stride), eps), degrees));
  } else {
    *out = from_acc<T>(angle_of(measure<A>(StreamedSpectra<T>{x, y, channels, stride}, eps), degrees));
  }
}

// Vector-Jacobian product of angle = 2*atan2(D, S), D = |ux - uy|, S = |ux + uy|:
//   dangle/d(D^2) = S / (D (D^2 + S^2)),  dangle/d(S^2) = -D / (S (D^2 + S^2))
// (each zero where its clamp is active), then through a = ux - uy and b = ux + uy to the unit
// vectors, then through ux = x / |x|, whose Jacobian projects out the radial part:
//   gx = (gux - ux (ux . gux)) / nx,   gux = 2 g_d2 a + 2 g_s2 b,   guy = -2 g_d2 a + 2 g_s2 b.
template <typename T, typename Spectra>
FASTFUSE_HD void backward_pixel(const Spectra& s, acc_t<T> grad, T* gx, T* gy, int64_t stride,
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
    gx[c * stride] = from_acc<T>((two_gd2 * a + two_gs2 * b - radial_x * ux) * g.rx);
    gy[c * stride] = from_acc<T>((-two_gd2 * a + two_gs2 * b - radial_y * uy) * g.ry);
  });
}

template <typename T, int K>
FASTFUSE_HD void backward_at(const T* x, const T* y, T grad, T* gx, T* gy, int64_t channels,
                             int64_t stride, acc_t<T> eps, bool degrees) {
  if constexpr (K > 0) {
    backward_pixel<T>(CachedSpectra<T, K>(x, y, channels, stride), to_acc(grad), gx, gy, stride, eps, degrees);
  } else {
    backward_pixel<T>(StreamedSpectra<T>{x, y, channels, stride}, to_acc(grad), gx, gy, stride, eps, degrees);
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

template <typename T, int K>
__global__ void __launch_bounds__(kThreadsPerBlock)
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
