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

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t kChannelBlock = 16;

struct Image {  // sizes and element strides of the image side, as (B, C, H, W) whatever the layout
  int64_t B, C, H, W, sb, sc, sh, sw;
};

template <typename Bits>
void scan_impl(const Bits* x, Bits* out, const Image& g, int nthreads) {
  // out: contiguous (B, 4, C, L).
  const int64_t L = g.H * g.W, blocks = (g.C + kChannelBlock - 1) / kChannelBlock;
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

template <typename T>
void merge_impl(const T* ys, const int64_t* ss, T* out, const Image& g, bool channel_last, int nthreads) {
  // ys: (B, 4, C, L) with strides ss; out: contiguous (B, C, L), or (B, L, C) if channel_last.
  const int64_t L = g.H * g.W, blocks = (g.C + kChannelBlock - 1) / kChannelBlock;
  const int64_t so_c = channel_last ? 1 : L, so_l = channel_last ? g.C : 1;
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
          o[c * so_c + row * so_l] = first + second;
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

}  // namespace

PYBIND11_MODULE(_cpu_cross_scan, m) {
  m.doc() = "fastfuse cpu backend: cross scan and cross merge";
  m.def("cross_scan", &cross_scan, py::call_guard<py::gil_scoped_release>());
  m.def("cross_merge", &cross_merge, py::call_guard<py::gil_scoped_release>());
}
