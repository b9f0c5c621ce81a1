// CPU cross scan and cross merge (fastfuse._cpu_cross_scan); conventions in csrc/cpu/README.md.
//
// Scan orders over an H×W image, L = H·W (fastfuse/reference/cross_scan.py):
//   k=0 row-major (index h·W + w), k=1 column-major (w·H + h), k=2/k=3 their reverses (L-1-index).
// Both ops are one pass over the image: each pixel is read once and its four sequence positions
// written (scan), or its four sequence values read and summed (merge). A task is (batch, block of
// kChannelBlock channels); the channel loop is innermost, so a channel-last image is read along
// its contiguous channels and a channel-first one along kChannelBlock rows at once, and the
// strided column-major positions of a block stay in cache.
//
// cross_scan only copies, so it works on the raw element bits (2, 4 or 8 bytes): every dtype in
// place, no conversion. cross_merge sums in float (double for float64); half inputs are widened by
// the launcher.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "scan_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

#include "cpu_common.h"  // FASTFUSE_CPU_CLONES

namespace {

constexpr int64_t kChannelBlock = 16;

struct Image {  // sizes and element strides of the image side, as (B, C, H, W) whatever the layout
  int64_t B, C, H, W, sb, sc, sh, sw;
};

// Channel-first images (the usual case) go plane by plane: directions 0 and 2 are a forward and
// a reversed copy of the row-major plane, directions 1 and 3 a transpose taken in kTile × kTile
// tiles so that both sides stay in L1 (a per-pixel loop over channels would stride by H·W on
// every read and on all four writes). Channel-last images read each pixel's channels at unit
// stride instead, and keep the per-pixel loop over a block of channels.
constexpr int64_t kTile = 32;

// Every (h, w) of an H × W plane, kTile × kTile tile by tile, column-major inside a tile: the
// order of a cache-friendly transpose between row-major and column-major planes.
template <typename F>
void for_each_in_tiles(int64_t H, int64_t W, F&& visit) {
  for (int64_t h0 = 0; h0 < H; h0 += kTile) {
    const int64_t h1 = std::min(H, h0 + kTile);
    for (int64_t w0 = 0; w0 < W; w0 += kTile) {
      const int64_t w1 = std::min(W, w0 + kTile);
      for (int64_t w = w0; w < w1; ++w)
        for (int64_t h = h0; h < h1; ++h) visit(h, w);
    }
  }
}

template <typename Bits>
void scan_plane(const Bits* src, int64_t sh, int64_t sw, int64_t H, int64_t W, Bits* o0, Bits* o1, Bits* o2,
                Bits* o3) {
  const int64_t L = H * W;
  for (int64_t h = 0; h < H; ++h) {
    const Bits* line = src + h * sh;
    for (int64_t w = 0; w < W; ++w) {
      const Bits v = line[w * sw];
      o0[h * W + w] = v;
      o2[L - 1 - (h * W + w)] = v;
    }
  }
  for_each_in_tiles(H, W, [&](int64_t h, int64_t w) {
    const Bits v = src[h * sh + w * sw];
    o1[w * H + h] = v;
    o3[L - 1 - (w * H + h)] = v;
  });
}

template <typename Bits>
void scan_impl(const Bits* x, Bits* out, const Image& g, int nthreads) {
  // out: contiguous (B, 4, C, L).
  const int64_t L = g.H * g.W;
  if (g.sc != 1 || g.C == 1) {  // channel-first: one task per (batch, channel) plane
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t task = 0; task < g.B * g.C; ++task) {
      const int64_t b = task / g.C, c = task % g.C;
      Bits* o = out + (b * 4 * g.C + c) * L;
      scan_plane(x + b * g.sb + c * g.sc, g.sh, g.sw, g.H, g.W, o, o + g.C * L, o + 2 * g.C * L, o + 3 * g.C * L);
    }
    return;
  }
  const int64_t blocks = (g.C + kChannelBlock - 1) / kChannelBlock;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t task = 0; task < g.B * blocks; ++task) {
    const int64_t b = task / blocks, c0 = (task % blocks) * kChannelBlock, c1 = std::min(g.C, c0 + kChannelBlock);
    Bits* o = out + b * 4 * g.C * L;
    for (int64_t h = 0; h < g.H; ++h) {
      for (int64_t w = 0; w < g.W; ++w) {
        const int64_t row = h * g.W + w, col = w * g.H + h;
        const Bits* src = x + b * g.sb + h * g.sh + w * g.sw;
        for (int64_t c = c0; c < c1; ++c) {
          const Bits v = src[c * g.sc];
          o[(0 * g.C + c) * L + row] = v;
          o[(1 * g.C + c) * L + col] = v;
          o[(2 * g.C + c) * L + (L - 1 - row)] = v;
          o[(3 * g.C + c) * L + (L - 1 - col)] = v;
        }
      }
    }
  }
}

// One (batch, channel) plane of the merge into a row-major output plane (unit stride): the row
// directions in one linear pass, then the column directions added tile by tile. Summed in the
// order of the reference, (k0 + k2) + (k1 + k3), rounded once per pair as there.
template <typename T>
void merge_plane(const T* y0, const T* y1, const T* y2, const T* y3, int64_t sl, int64_t H, int64_t W, T* o) {
  const int64_t L = H * W;
  for (int64_t t = 0; t < L; ++t) o[t] = y0[t * sl] + y2[(L - 1 - t) * sl];
  for_each_in_tiles(H, W, [&](int64_t h, int64_t w) {
    const int64_t col = w * H + h;
    o[h * W + w] += y1[col * sl] + y3[(L - 1 - col) * sl];
  });
}

template <typename T>
void merge_impl(const T* ys, const int64_t* ss, T* out, const Image& g, bool channel_last, int nthreads) {
  // ys: (B, 4, C, L) with strides ss; out: contiguous (B, C, L), or (B, L, C) if channel_last.
  const int64_t L = g.H * g.W;
  if (!channel_last) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t task = 0; task < g.B * g.C; ++task) {
      const int64_t b = task / g.C, c = task % g.C;
      const T* y = ys + b * ss[0] + c * ss[2];
      merge_plane(y, y + ss[1], y + 2 * ss[1], y + 3 * ss[1], ss[3], g.H, g.W, out + (b * g.C + c) * L);
    }
    return;
  }
  const int64_t blocks = (g.C + kChannelBlock - 1) / kChannelBlock;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t task = 0; task < g.B * blocks; ++task) {
    const int64_t b = task / blocks, c0 = (task % blocks) * kChannelBlock, c1 = std::min(g.C, c0 + kChannelBlock);
    const T* y = ys + b * ss[0];
    T* o = out + b * g.C * L;
    for (int64_t h = 0; h < g.H; ++h) {
      for (int64_t w = 0; w < g.W; ++w) {
        const int64_t row = h * g.W + w, col = w * g.H + h;
        for (int64_t c = c0; c < c1; ++c) {
          const T* yc = y + c * ss[2];
          // Summed in the order of the reference: (k0 + k2) + (k1 + k3).
          const T first = yc[row * ss[3]] + yc[2 * ss[1] + (L - 1 - row) * ss[3]];
          const T second = yc[ss[1] + col * ss[3]] + yc[3 * ss[1] + (L - 1 - col) * ss[3]];
          o[row * g.C + c] = first + second;
        }
      }
    }
  }
}

Image make_image(const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides) {
  if (sizes.size() != 4 || strides.size() != 4)
    throw std::invalid_argument("_cpu_cross_scan: expected 4 sizes and 4 strides (B, C, H, W)");
  return Image{sizes[0], sizes[1], sizes[2], sizes[3], strides[0], strides[1], strides[2], strides[3]};
}

// x: image of any layout (sizes/strides given as B, C, H, W); out contiguous (B, 4, C, L).
void cross_scan(uintptr_t x, uintptr_t out, std::vector<int64_t> sizes, std::vector<int64_t> strides,
                int element_size, int nthreads) {
  const Image g = make_image(sizes, strides);
  switch (element_size) {
    case 2: scan_impl(reinterpret_cast<const uint16_t*>(x), reinterpret_cast<uint16_t*>(out), g, nthreads); break;
    case 4: scan_impl(reinterpret_cast<const uint32_t*>(x), reinterpret_cast<uint32_t*>(out), g, nthreads); break;
    case 8: scan_impl(reinterpret_cast<const uint64_t*>(x), reinterpret_cast<uint64_t*>(out), g, nthreads); break;
    default: throw std::invalid_argument("_cpu_cross_scan: element size must be 2, 4 or 8 bytes");
  }
}

// ys: (B, 4, C, L) with strides ys_strides (sizes give B, C, H, W); out contiguous.
void cross_merge(uintptr_t ys, std::vector<int64_t> ys_strides, uintptr_t out, std::vector<int64_t> sizes,
                 bool channel_last, bool is_double, int nthreads) {
  if (ys_strides.size() != 4) throw std::invalid_argument("_cpu_cross_scan: expected 4 ys strides");
  const Image g = make_image(sizes, {0, 0, 0, 0});
  if (is_double)
    merge_impl(reinterpret_cast<const double*>(ys), ys_strides.data(), reinterpret_cast<double*>(out), g,
               channel_last, nthreads);
  else
    merge_impl(reinterpret_cast<const float*>(ys), ys_strides.data(), reinterpret_cast<float*>(out), g,
               channel_last, nthreads);
}

// ------------------------------------------------------------------ fused cross selective scan
//
// One task owns (batch b, a block of kLanes channels) and runs the four directions one after
// the other over them: it reads x and the pixels' x projection (dt, B, C; one GEMM in the
// launcher) in direction k's order through a table of pixel indices (no scanned copy), forms
// δ = softplus(w_dt·dt + bias) per step, and adds each direction's output into the merged result
// at its pixel, k = 0 first (a fixed order: deterministic, no atomics, no (B, 4, D, L) output).
// The kLanes channels are the SIMD lanes: every step updates state n of all of them at once,
// which needs no horizontal sum in the forward and keeps N = 1 as fast per state as N = 16.
// The states of the block live in a per-thread (N, kLanes) array.
//
// The backward is one task per (batch, part of the channel blocks); per block and direction it
// runs the scan forward once, keeping the state at every chunk start, then walks the chunks last
// to first: re-runs the chunk from its start state keeping x_t and exp(δ_t·A) per step, and runs
// the adjoint recurrence backwards (same formulas as csrc/cpu/selective_scan.cpp):
//     h_t = g_t + dy_t·C_t,  g_{t-1} = a_t·h_t,  du_t = δ_t·Σ_n h_t·B_t + D·dy_t,
//     dδ_t = u_t·Σ_n h_t·B_t + Σ_n h_t·a_t·x_{t-1}·A,  dA += h_t·a_t·x_{t-1}·δ_t,
//     dB_t += Σ_d h_t·δ_t·u_t,  dC_t += Σ_d dy_t·x_t.
// du is merged over the directions into the task's own channels (k = 0 first); d dt, dB, dC,
// sums over the channels, go to per-part (L, R+2N) partials summed part 0 first afterwards;
// d w_dt, dA, dD, d bias stay per lane and are stored once per (batch, channel). The x
// projection's gradients are GEMMs in the launcher.
constexpr int64_t kLanes = 16;
constexpr int64_t kScanChunk = 32;
constexpr int64_t kMaxParts = 8;
constexpr int64_t kMaxState = 256;
constexpr float kLog2e = 1.4426950408889634f;

using fastfuse_cpu::exp2_poly;  // scan_math.h

// log(1 + z) for z in [0, 1], vectorisable: 2·atanh(s) with s = z / (2 + z) ≤ 1/3, whose odd series
// is summed to s^13 (error ≤ 1e-8 relative, and exact to the last bits as z → 0, where VMamba's
// small deltas live: softplus values of 1e-3 and below).
inline float log1p_unit(float z) {
  const float s = z / (2.0f + z), s2 = s * s;
  float p = 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

// softplus(v) = max(v, 0) + log1p(exp(-|v|)), identity above 20 as torch (threshold 20) and mamba-ssm.
inline float softplus(float v) {
  const float pos = v > 0.0f ? v : 0.0f, neg_abs = v > 0.0f ? -v : v;
  const float sp = pos + log1p_unit(exp2_poly(neg_abs * kLog2e));
  return v > 20.0f ? v : sp;
}

inline float sigmoid(float v) { return 1.0f / (1.0f + exp2_poly(-v * kLog2e)); }

// δ = softplus(raw) (or raw) over a tile, vectorised.
FASTFUSE_CPU_CLONES void activate_tile(const float* raw, float* dt, int64_t count, bool use_softplus) {
  if (!use_softplus) {
    std::copy(raw, raw + count, dt);
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) dt[i] = softplus(raw[i]);
}

struct Css {
  int64_t B, D, H, W, L, N, C;     // C = R + 2N rows of the projection per direction
  int64_t R;
  const float* u;                  // x as (B, D, L) with strides su
  int64_t su[3];
  const float* proj;               // (B, 4, C, L) contiguous, pixel order: rows dt (R), B (N), C (N)
  const float* w_dt;               // (4·D, R) contiguous: δ = w_dt · dt + bias
  const float* A;                  // (4·D, N) contiguous: A = -exp(A_logs)
  const float* Dskip;              // (4·D,)
  const float* bias;               // (4·D,) delta bias
  bool softplus;
  std::vector<int64_t> pixel;      // (4, L): the pixel of step t of direction k

  int64_t n_chunks() const { return (L + kScanChunk - 1) / kScanChunk; }
  int64_t n_blocks() const { return (D + kLanes - 1) / kLanes; }
};

void make_pixel_table(Css& p) {
  p.pixel.resize(4 * p.L);
  for (int64_t t = 0; t < p.L; ++t) {
    const int64_t row = t, col = (t % p.H) * p.W + t / p.H;  // column-major step t: h = t % H, w = t / H
    p.pixel[t] = row;
    p.pixel[p.L + t] = col;
    p.pixel[2 * p.L + p.L - 1 - t] = row;
    p.pixel[3 * p.L + p.L - 1 - t] = col;
  }
}

// Per-thread tiles of one chunk, lanes innermost: (step, lane), (step, n or r), (step, n, lane).
struct CssTiles {
  std::vector<float> u, dt, raw, dy, bt, ct, dts, y, xs, as, pb, pc, states;
  CssTiles(const Css& p, bool backward)
      : u(kScanChunk * kLanes), dt(kScanChunk * kLanes), raw(kScanChunk * kLanes), dy(kScanChunk * kLanes),
        bt(kScanChunk * p.N), ct(kScanChunk * p.N), dts(kScanChunk * p.R), y(kScanChunk * kLanes) {
    if (backward) {
      xs.resize((kScanChunk + 1) * p.N * kLanes);
      as.resize(kScanChunk * p.N * kLanes);
      pb.resize(kScanChunk * p.N * kLanes);
      pc.resize(kScanChunk * p.N * kLanes);
      states.resize(p.n_chunks() * p.N * kLanes);
    }
  }
};

// Direction k's parameters of lanes [c0, c0 + lanes): A·log2(e) and A as (N, lane), w_dt as
// (R, lane), D, bias; zeros for lanes past `lanes`.
void load_lane_params(const Css& p, int64_t k, int64_t c0, int64_t lanes, float* A, float* A2, float* wdt,
                      float* Dd, float* bias) {
  for (int64_t c = 0; c < kLanes; ++c) {
    const int64_t row = k * p.D + c0 + c;
    const bool real = c < lanes;
    Dd[c] = real ? p.Dskip[row] : 0.0f;
    bias[c] = real ? p.bias[row] : 0.0f;
    for (int64_t r = 0; r < p.R; ++r) wdt[r * kLanes + c] = real ? p.w_dt[row * p.R + r] : 0.0f;
    for (int64_t n = 0; n < p.N; ++n) {
      A[n * kLanes + c] = real ? p.A[row * p.N + n] : 0.0f;
      A2[n * kLanes + c] = A[n * kLanes + c] * kLog2e;
    }
  }
}

// The pre-activation raw = w_dt·dt + bias of every (step, lane) (the dt projection, R FMAs per
// step vectorised over the lanes: cheaper than a (B, 4, D, L) GEMM result), then δ = softplus(raw).
FASTFUSE_CPU_CLONES void delta_tile(int64_t R, int64_t steps, const float* dts, const float* wdt, const float* bias,
                                    float* raw, float* dt, bool use_softplus) {
  for (int64_t s = 0; s < steps; ++s) {
    float acc[kLanes];
#pragma omp simd
    for (int64_t c = 0; c < kLanes; ++c) acc[c] = bias[c];
    for (int64_t r = 0; r < R; ++r) {
      const float v = dts[s * R + r];
#pragma omp simd
      for (int64_t c = 0; c < kLanes; ++c) acc[c] += wdt[r * kLanes + c] * v;
    }
    std::copy(acc, acc + kLanes, raw + s * kLanes);
  }
  activate_tile(raw, dt, steps * kLanes, use_softplus);
}

// Gathers steps [t0, t0 + steps) of direction k for lanes [c0, c0 + lanes): u, the dt projection,
// δ (after bias and softplus) and its raw pre-activation, B_t, C_t. Lanes past `lanes` get u = 0
// and zero weights, which leaves their (unused) state at zero.
void gather_chunk(const Css& p, int64_t b, int64_t k, int64_t c0, int64_t lanes, int64_t t0, int64_t steps,
                  const float* wdt, const float* bias, CssTiles& tl) {
  const int64_t* pix = p.pixel.data() + k * p.L + t0;
  const float* proj = p.proj + (b * 4 + k) * p.C * p.L;
  for (int64_t s = 0; s < steps; ++s) {
    for (int64_t r = 0; r < p.R; ++r) tl.dts[s * p.R + r] = proj[r * p.L + pix[s]];
    for (int64_t n = 0; n < p.N; ++n) {
      tl.bt[s * p.N + n] = proj[(p.R + n) * p.L + pix[s]];
      tl.ct[s * p.N + n] = proj[(p.R + p.N + n) * p.L + pix[s]];
    }
  }
  std::fill(tl.u.begin(), tl.u.end(), 0.0f);
  for (int64_t c = 0; c < lanes; ++c) {
    const float* u = p.u + b * p.su[0] + (c0 + c) * p.su[1];
    for (int64_t s = 0; s < steps; ++s) tl.u[s * kLanes + c] = u[pix[s] * p.su[2]];
  }
  delta_tile(p.R, steps, tl.dts.data(), wdt, bias, tl.raw.data(), tl.dt.data(), p.softplus);
}

// One chunk for all lanes: advances x (N, lane) in place and writes y_t (before D·u) per step;
// with xs/as it also keeps x_t (rows 1..steps; row 0 = the start state) and a_t.
FASTFUSE_CPU_CLONES void scan_lanes(int64_t N, int64_t steps, const float* dt, const float* u, const float* A2,
                                    const float* bt, const float* ct, float* x, float* y, float* xs, float* as) {
  if (xs) std::copy(x, x + N * kLanes, xs);
  for (int64_t s = 0; s < steps; ++s) {
    const float* dts = dt + s * kLanes;
    const float* us = u + s * kLanes;
    float dtu[kLanes], acc[kLanes];
#pragma omp simd
    for (int64_t c = 0; c < kLanes; ++c) {
      dtu[c] = dts[c] * us[c];
      acc[c] = 0.0f;
    }
    for (int64_t n = 0; n < N; ++n) {
      const float Bn = bt[s * N + n], Cn = ct[s * N + n];
      float* xn = x + n * kLanes;
      const float* a2 = A2 + n * kLanes;
      if (xs) {
        float* xo = xs + ((s + 1) * N + n) * kLanes;
        float* ao = as + (s * N + n) * kLanes;
#pragma omp simd
        for (int64_t c = 0; c < kLanes; ++c) {
          const float a = exp2_poly(dts[c] * a2[c]);
          const float v = a * xn[c] + dtu[c] * Bn;
          xn[c] = v;
          xo[c] = v;
          ao[c] = a;
          acc[c] += v * Cn;
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < kLanes; ++c) {
          const float v = exp2_poly(dts[c] * a2[c]) * xn[c] + dtu[c] * Bn;
          xn[c] = v;
          acc[c] += v * Cn;
        }
      }
    }
    std::copy(acc, acc + kLanes, y + s * kLanes);
  }
}

// out: (B, D, L) fp32 with strides so (channel-first or channel-last).
void css_forward_impl(const Css& p, float* out, const int64_t* so, int nthreads) {
  const int64_t blocks = p.n_blocks(), N = p.N;
#pragma omp parallel num_threads(nthreads)
  {
    CssTiles tl(p, false);
    std::vector<float> A(N * kLanes), A2(N * kLanes), x(N * kLanes), wdt(p.R * kLanes);
    float Dd[kLanes], bias[kLanes];
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < p.B * blocks; ++task) {
      const int64_t b = task / blocks, c0 = (task % blocks) * kLanes, lanes = std::min(kLanes, p.D - c0);
      for (int64_t k = 0; k < 4; ++k) {
        load_lane_params(p, k, c0, lanes, A.data(), A2.data(), wdt.data(), Dd, bias);
        std::fill(x.begin(), x.end(), 0.0f);
        for (int64_t t0 = 0; t0 < p.L; t0 += kScanChunk) {
          const int64_t steps = std::min(kScanChunk, p.L - t0);
          gather_chunk(p, b, k, c0, lanes, t0, steps, wdt.data(), bias, tl);
          scan_lanes(N, steps, tl.dt.data(), tl.u.data(), A2.data(), tl.bt.data(), tl.ct.data(), x.data(),
                     tl.y.data(), nullptr, nullptr);
          const int64_t* pix = p.pixel.data() + k * p.L + t0;
          for (int64_t c = 0; c < lanes; ++c) {
            float* o = out + b * so[0] + (c0 + c) * so[1];
            for (int64_t s = 0; s < steps; ++s) {
              const float v = tl.y[s * kLanes + c] + Dd[c] * tl.u[s * kLanes + c];
              float& dst = o[pix[s] * so[2]];
              dst = k == 0 ? v : dst + v;
            }
          }
        }
      }
    }
  }
}

// The adjoint of one chunk for all lanes, last step first. g (N, lane) is the state gradient
// carried in from the step after; dA (N, lane) accumulates; hB/hax (step, lane) get Σ_n h·B and
// Σ_n h·a·x_{t-1}·A; pb/pc (step, n, lane) the per-lane terms of dB and dC.
FASTFUSE_CPU_CLONES void adjoint_lanes(int64_t N, int64_t steps, const float* A, const float* bt, const float* ct,
                                       const float* xs, const float* as, const float* dt, const float* u,
                                       const float* dy, float* g, float* dA, float* hB, float* hax, float* pb,
                                       float* pc) {
  for (int64_t s = steps - 1; s >= 0; --s) {
    const float* dts = dt + s * kLanes;
    const float* dys = dy + s * kLanes;
    float dtu[kLanes], sb[kLanes], sa[kLanes];
#pragma omp simd
    for (int64_t c = 0; c < kLanes; ++c) {
      dtu[c] = dts[c] * u[s * kLanes + c];
      sb[c] = 0.0f;
      sa[c] = 0.0f;
    }
    for (int64_t n = 0; n < N; ++n) {
      const float Bn = bt[s * N + n], Cn = ct[s * N + n];
      const float* a = as + (s * N + n) * kLanes;
      const float* xp = xs + (s * N + n) * kLanes;
      const float* xt = xs + ((s + 1) * N + n) * kLanes;
      const float* An = A + n * kLanes;
      float* gn = g + n * kLanes;
      float* dAn = dA + n * kLanes;
      float* pbn = pb + (s * N + n) * kLanes;
      float* pcn = pc + (s * N + n) * kLanes;
#pragma omp simd
      for (int64_t c = 0; c < kLanes; ++c) {
        const float h = gn[c] + dys[c] * Cn;
        const float hx = h * a[c] * xp[c];
        sb[c] += h * Bn;
        sa[c] += hx * An[c];
        dAn[c] += hx * dts[c];
        pbn[c] = h * dtu[c];
        pcn[c] = dys[c] * xt[c];
        gn[c] = h * a[c];
      }
    }
    std::copy(sb, sb + kLanes, hB + s * kLanes);
    std::copy(sa, sa + kLanes, hax + s * kLanes);
  }
}

// dδ before the activation: (u·Σ h·B + Σ h·a·x_{t-1}·A) · softplus'(raw), softplus' = sigmoid
// (1 above the pass-through threshold).
FASTFUSE_CPU_CLONES void delta_gradient_tile(const float* raw, const float* u, const float* hB, const float* hax,
                                             float* ddt, int64_t count, bool use_softplus) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const float g = u[i] * hB[i] + hax[i];
    ddt[i] = use_softplus && raw[i] <= 20.0f ? g * sigmoid(raw[i]) : g;
  }
}

// The sums over the lanes that feed the projections' gradients, added into the part's (L, C)
// rows at the steps' pixels: d dt = Σ_d w_dt·dδ, dB = Σ_d h·δ·u, dC = Σ_d dy·x; and the lanes'
// own d w_dt += dδ·dt.
FASTFUSE_CPU_CLONES void projection_gradients(int64_t N, int64_t R, int64_t steps, const int64_t* pix,
                                              const float* pb, const float* pc, const float* ddt, const float* wdt,
                                              const float* dts, float* rows, float* dwdt) {
  const int64_t C = R + 2 * N;
  for (int64_t s = 0; s < steps; ++s) {
    float* dst = rows + pix[s] * C;
    const float* dd = ddt + s * kLanes;
    for (int64_t r = 0; r < R; ++r) {
      const float v = dts[s * R + r];
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < kLanes; ++c) {
        sum += wdt[r * kLanes + c] * dd[c];
        dwdt[r * kLanes + c] += dd[c] * v;
      }
      dst[r] += sum;
    }
    for (int64_t n = 0; n < N; ++n) {
      const float* pbn = pb + (s * N + n) * kLanes;
      const float* pcn = pc + (s * N + n) * kLanes;
      float sb = 0.0f, sc = 0.0f;
#pragma omp simd reduction(+ : sb, sc)
      for (int64_t c = 0; c < kLanes; ++c) {
        sb += pbn[c];
        sc += pcn[c];
      }
      dst[R + n] += sb;
      dst[R + N + n] += sc;
    }
  }
}

struct CssGrads {
  const float* dy;  // (B, D, L) with strides sdy
  int64_t sdy[3];
  float* dx;        // (B, D, L) contiguous: the scan's du merged over directions
  float* dproj;     // (B, 4, C, L) contiguous, pixel order: d dt, dB, dC
  float* dwdt;      // (B, 4·D, R)
  float* dA;        // (B, 4·D, N)
  float* dD;        // (B, 4·D)
  float* dbias;     // (B, 4·D)
};

void css_backward_impl(const Css& p, const CssGrads& gr, int nthreads) {
  const int64_t N = p.N, L = p.L, blocks = p.n_blocks(), n_chunks = p.n_chunks();
  // Parts: runs of channel blocks, fixed by the shape only, so the dB/dC sums are reproducible.
  const int64_t per_part = (blocks + kMaxParts - 1) / kMaxParts, parts = (blocks + per_part - 1) / per_part;
  const int64_t Cp = p.C, part_size = 4 * L * Cp;  // (4, L, C) per (batch, part)
  std::vector<float> partial(static_cast<size_t>(p.B * parts) * part_size);
#pragma omp parallel num_threads(nthreads)
  {
    CssTiles tl(p, true);
    std::vector<float> A(N * kLanes), A2(N * kLanes), x(N * kLanes), g(N * kLanes), dA(N * kLanes);
    std::vector<float> wdt(p.R * kLanes), dwdt(p.R * kLanes);
    float Dd[kLanes], bias[kLanes], hB[kScanChunk * kLanes], hax[kScanChunk * kLanes], ddt[kScanChunk * kLanes];
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < p.B * parts; ++task) {
      const int64_t b = task / parts, part = task % parts;
      float* mine = partial.data() + task * part_size;
      std::fill(mine, mine + part_size, 0.0f);
      for (int64_t blk = part * per_part; blk < std::min(blocks, (part + 1) * per_part); ++blk) {
        const int64_t c0 = blk * kLanes, lanes = std::min(kLanes, p.D - c0);
        for (int64_t k = 0; k < 4; ++k) {
          const int64_t* pixk = p.pixel.data() + k * L;
          load_lane_params(p, k, c0, lanes, A.data(), A2.data(), wdt.data(), Dd, bias);
          std::fill(x.begin(), x.end(), 0.0f);
          for (int64_t c = 0; c < n_chunks; ++c) {  // state pass: the start state of every chunk
            const int64_t t0 = c * kScanChunk, steps = std::min(kScanChunk, L - t0);
            std::copy(x.begin(), x.end(), tl.states.begin() + c * N * kLanes);
            gather_chunk(p, b, k, c0, lanes, t0, steps, wdt.data(), bias, tl);
            scan_lanes(N, steps, tl.dt.data(), tl.u.data(), A2.data(), tl.bt.data(), tl.ct.data(), x.data(),
                       tl.y.data(), nullptr, nullptr);
          }
          std::fill(g.begin(), g.end(), 0.0f);
          std::fill(dA.begin(), dA.end(), 0.0f);
          std::fill(dwdt.begin(), dwdt.end(), 0.0f);
          float dD_acc[kLanes] = {0}, dbias_acc[kLanes] = {0};
          float* mine_k = mine + k * L * Cp;
          for (int64_t c = n_chunks - 1; c >= 0; --c) {
            const int64_t t0 = c * kScanChunk, steps = std::min(kScanChunk, L - t0);
            const int64_t* pix = pixk + t0;
            gather_chunk(p, b, k, c0, lanes, t0, steps, wdt.data(), bias, tl);
            std::fill(tl.dy.begin(), tl.dy.end(), 0.0f);
            for (int64_t ln = 0; ln < lanes; ++ln) {
              const float* dy = gr.dy + b * gr.sdy[0] + (c0 + ln) * gr.sdy[1];
              for (int64_t s = 0; s < steps; ++s) tl.dy[s * kLanes + ln] = dy[pix[s] * gr.sdy[2]];
            }
            std::copy(tl.states.begin() + c * N * kLanes, tl.states.begin() + (c + 1) * N * kLanes, x.begin());
            scan_lanes(N, steps, tl.dt.data(), tl.u.data(), A2.data(), tl.bt.data(), tl.ct.data(), x.data(),
                       tl.y.data(), tl.xs.data(), tl.as.data());
            adjoint_lanes(N, steps, A.data(), tl.bt.data(), tl.ct.data(), tl.xs.data(), tl.as.data(), tl.dt.data(),
                          tl.u.data(), tl.dy.data(), g.data(), dA.data(), hB, hax, tl.pb.data(), tl.pc.data());
            delta_gradient_tile(tl.raw.data(), tl.u.data(), hB, hax, ddt, steps * kLanes, p.softplus);
            projection_gradients(N, p.R, steps, pix, tl.pb.data(), tl.pc.data(), ddt, wdt.data(), tl.dts.data(),
                                 mine_k, dwdt.data());
            for (int64_t ln = 0; ln < lanes; ++ln) {
              const int64_t d = c0 + ln;
              float* dx = gr.dx + (b * p.D + d) * L;
              for (int64_t s = 0; s < steps; ++s) {
                const int64_t i = s * kLanes + ln;
                const float dyv = tl.dy[i], uv = tl.u[i];
                const float du = tl.dt[i] * hB[i] + Dd[ln] * dyv;
                float& dst = dx[pix[s]];
                dst = k == 0 ? du : dst + du;
                dD_acc[ln] += dyv * uv;
                dbias_acc[ln] += ddt[i];
              }
            }
          }
          for (int64_t ln = 0; ln < lanes; ++ln) {
            const int64_t row = b * 4 * p.D + k * p.D + c0 + ln;
            for (int64_t n = 0; n < N; ++n) gr.dA[row * N + n] = dA[n * kLanes + ln];
            for (int64_t r = 0; r < p.R; ++r) gr.dwdt[row * p.R + r] = dwdt[r * kLanes + ln];
            gr.dD[row] = dD_acc[ln];
            gr.dbias[row] = dbias_acc[ln];
          }
        }
      }
    }
    // d dt, dB and dC: the parts summed part 0 first, into the (B, 4, C, L) dproj.
    const int64_t tiles = (L + 255) / 256;
#pragma omp for schedule(static)
    for (int64_t job = 0; job < p.B * 4 * tiles; ++job) {
      const int64_t bk = job / tiles, b = bk / 4, k = bk % 4, l0 = (job % tiles) * 256;
      const int64_t l1 = std::min(L, l0 + 256);
      float* rows = gr.dproj + bk * Cp * L;
      for (int64_t l = l0; l < l1; ++l) {
        for (int64_t j = 0; j < Cp; ++j) {
          float acc = 0.0f;
          for (int64_t part = 0; part < parts; ++part)
            acc += partial[(b * parts + part) * part_size + (k * L + l) * Cp + j];
          rows[j * L + l] = acc;
        }
      }
    }
  }
}

Css make_css(const std::vector<int64_t>& sizes, const std::vector<uintptr_t>& ptrs,
             const std::vector<int64_t>& su, bool softplus) {
  // sizes: B, D, H, W, R, N. ptrs: u, proj, w_dt, A, Ds, delta bias. su: u's (B, D, L) strides.
  if (sizes.size() != 6 || ptrs.size() != 6 || su.size() != 3)
    throw std::invalid_argument("_cpu_cross_scan: expected 6 sizes, 6 pointers and 3 strides");
  if (sizes[5] < 1 || sizes[5] > kMaxState)
    throw std::invalid_argument("_cpu_cross_scan: the state size N must be in [1, 256]");
  Css p{};
  p.B = sizes[0];
  p.D = sizes[1];
  p.H = sizes[2];
  p.W = sizes[3];
  p.R = sizes[4];
  p.N = sizes[5];
  p.L = p.H * p.W;
  p.C = p.R + 2 * p.N;
  auto ptr = [&](int i) { return reinterpret_cast<const float*>(ptrs[i]); };
  p.u = ptr(0);
  p.proj = ptr(1);
  p.w_dt = ptr(2);
  p.A = ptr(3);
  p.Dskip = ptr(4);
  p.bias = ptr(5);
  for (int i = 0; i < 3; ++i) p.su[i] = su[i];
  p.softplus = softplus;
  make_pixel_table(p);
  return p;
}

// out: (B, D, L) fp32 with element strides so (a channel-last result is (B, L, D) seen as (B, D, L)).
void css_forward(std::vector<int64_t> sizes, std::vector<uintptr_t> ptrs, std::vector<int64_t> su, bool softplus,
                 uintptr_t out, std::vector<int64_t> so, int nthreads) {
  const Css p = make_css(sizes, ptrs, su, softplus);
  if (so.size() != 3) throw std::invalid_argument("_cpu_cross_scan: expected 3 output strides");
  css_forward_impl(p, reinterpret_cast<float*>(out), so.data(), nthreads);
}

// grads: dx, dproj, dwdt, dA, dD, dbias (layouts in CssGrads); dy (B, D, L) with strides sdy.
void css_backward(std::vector<int64_t> sizes, std::vector<uintptr_t> ptrs, std::vector<int64_t> su, bool softplus,
                  uintptr_t dy, std::vector<int64_t> sdy, std::vector<uintptr_t> grads, int nthreads) {
  const Css p = make_css(sizes, ptrs, su, softplus);
  if (sdy.size() != 3 || grads.size() != 6)
    throw std::invalid_argument("_cpu_cross_scan: expected 3 gradient strides and 6 gradient pointers");
  auto out = [&](int i) { return reinterpret_cast<float*>(grads[i]); };
  CssGrads gr{reinterpret_cast<const float*>(dy), {sdy[0], sdy[1], sdy[2]}, out(0), out(1), out(2), out(3),
              out(4), out(5)};
  css_backward_impl(p, gr, nthreads);
}

}  // namespace

PYBIND11_MODULE(_cpu_cross_scan, m) {
  m.doc() = "fastfuse cpu backend: cross scan, cross merge and the fused cross selective scan";
  m.def("cross_scan", &cross_scan, py::call_guard<py::gil_scoped_release>());
  m.def("cross_merge", &cross_merge, py::call_guard<py::gil_scoped_release>());
  m.def("css_forward", &css_forward, py::call_guard<py::gil_scoped_release>());
  m.def("css_backward", &css_backward, py::call_guard<py::gil_scoped_release>());
}
