// Launchers for kernels/ssim.cuh: argument checks, the Gaussian taps, dtype dispatch, shared
// memory sizing and launch error checks.
#include <algorithm>
#include <cmath>
#include <string>

#include "fastfuse_ext.h"
#include "kernels/ssim.cuh"
#include "ssim.h"

namespace fastfuse {
namespace {

constexpr std::int64_t kMaxGridXY = 65535;  // gridDim.y's limit; x is kept under it as well
constexpr std::int64_t kMaxGridZ = 65535;
constexpr int kDefaultSmemLimit = 48 * 1024;  // larger needs the per-kernel opt-in below

struct Shape {
  std::int64_t planes, height, width, out_height, out_width;
};

// Returns false when there is nothing to compute.
bool check_args(const char* fn, const Shape& s, int window_size, double sigma, double c1, double c2,
                int padding) {
  require(s.planes >= 0, fn, "planes must be >= 0, got " + std::to_string(s.planes));
  require(s.height >= 1 && s.width >= 1, fn,
          "height and width must be >= 1, got " + std::to_string(s.height) + " x " + std::to_string(s.width));
  require(window_size >= 1 && window_size % 2 == 1 && window_size <= ssim::kMaxWindow, fn,
          "window_size must be odd and in [1, " + std::to_string(ssim::kMaxWindow) + "], got " +
              std::to_string(window_size));
  require(padding >= 0 && padding <= 2, fn,
          "padding must be 0 (valid), 1 (zero) or 2 (reflect), got " + std::to_string(padding));
  require(sigma > 0 && std::isfinite(sigma), fn, "sigma must be a finite positive number");
  require(c1 > 0 && c2 > 0 && std::isfinite(c1) && std::isfinite(c2), fn, "c1 and c2 must be finite and positive");
  const std::int64_t shrink = padding == 0 ? window_size - 1 : 0;
  require(s.out_height == s.height - shrink && s.out_width == s.width - shrink && s.out_height >= 1 &&
              s.out_width >= 1,
          fn, "out_height x out_width " + std::to_string(s.out_height) + " x " + std::to_string(s.out_width) +
                  " does not match the input and padding");
  if (s.planes == 0) return false;
  require(ceil_div(std::max(s.height, s.out_height), ssim::kTile) <= kMaxGridXY &&
              ceil_div(std::max(s.width, s.out_width), ssim::kTile) <= kMaxGridXY,
          fn, "the image is too large for one launch (more than " + std::to_string(kMaxGridXY * ssim::kTile) +
                  " pixels per side)");
  return true;
}

dim3 grid_for(std::int64_t rows, std::int64_t cols, std::int64_t planes) {
  return dim3(static_cast<unsigned>(ceil_div(cols, ssim::kTile)), static_cast<unsigned>(ceil_div(rows, ssim::kTile)),
              static_cast<unsigned>(std::min(planes, kMaxGridZ)));
}

// float64 with a large window needs more than the default 48 KB of dynamic shared memory
// (at most 91 KB at window 31, within every target's 99 KB).
template <typename Kernel>
void allow_shared_memory(Kernel kernel, std::size_t bytes, const char* fn) {
  if (bytes <= static_cast<std::size_t>(kDefaultSmemLimit)) return;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("fastfuse._C.") + fn + ": cannot reserve " + std::to_string(bytes) +
                             " bytes of shared memory: " + cudaGetErrorString(err));
  }
}

template <typename T>
void launch_forward(std::uintptr_t x, std::uintptr_t y, std::uintptr_t out, const Shape& s, int window_size,
                    double sigma, double c1, double c2, int padding, cudaStream_t stream) {
  using A = acc_t<T>;
  const auto p =
      ssim::make_params<A>(s.height, s.width, s.out_height, s.out_width, window_size, sigma, c1, c2, padding);
  const std::size_t smem = sizeof(A) * ssim::moments_smem_elems(p.radius);
  auto kernel = ssim::moments_kernel<T, false>;
  allow_shared_memory(kernel, smem, "ssim_map_forward");
  kernel<<<grid_for(s.out_height, s.out_width, s.planes), ssim::kThreads, smem, stream>>>(
      reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(y), reinterpret_cast<T*>(out), nullptr, nullptr,
      s.planes, p);
}

template <typename T>
void launch_backward(std::uintptr_t grad, std::uintptr_t x, std::uintptr_t y, std::uintptr_t dx, std::uintptr_t dy,
                     std::uintptr_t adjoint, const Shape& s, int window_size, double sigma, double c1, double c2,
                     int padding, cudaStream_t stream) {
  using A = acc_t<T>;
  const auto p =
      ssim::make_params<A>(s.height, s.width, s.out_height, s.out_width, window_size, sigma, c1, c2, padding);
  const auto* xp = reinterpret_cast<const T*>(x);
  const auto* yp = reinterpret_cast<const T*>(y);
  auto* adj = reinterpret_cast<A*>(adjoint);

  const std::size_t smem_a = sizeof(A) * ssim::moments_smem_elems(p.radius);
  auto adjoints = ssim::moments_kernel<T, true>;
  allow_shared_memory(adjoints, smem_a, "ssim_map_backward");
  adjoints<<<grid_for(s.out_height, s.out_width, s.planes), ssim::kThreads, smem_a, stream>>>(
      xp, yp, nullptr, reinterpret_cast<const T*>(grad), adj, s.planes, p);
  check_launch("ssim_map_backward");

  const std::size_t smem_b = sizeof(A) * ssim::transposed_smem_elems(p.radius);
  auto transposed = ssim::transposed_kernel<T>;
  allow_shared_memory(transposed, smem_b, "ssim_map_backward");
  transposed<<<grid_for(s.height, s.width, s.planes), ssim::kThreads, smem_b, stream>>>(
      adj, xp, yp, reinterpret_cast<T*>(dx), reinterpret_cast<T*>(dy), s.planes, p);
}

}  // namespace

void ssim_map_forward(std::uintptr_t x, std::uintptr_t y, std::uintptr_t out, std::int64_t planes,
                      std::int64_t height, std::int64_t width, std::int64_t out_height, std::int64_t out_width,
                      int dtype, int window_size, double sigma, double c1, double c2, int padding,
                      std::uintptr_t stream) {
  constexpr const char* fn = "ssim_map_forward";
  const DType type = dtype_from_code(dtype, fn);
  const Shape s{planes, height, width, out_height, out_width};
  if (!check_args(fn, s, window_size, sigma, c1, c2, padding)) return;
  require_pointer(x, fn, "x");
  require_pointer(y, fn, "y");
  require_pointer(out, fn, "out");
  const cudaStream_t st = as_stream(stream);
  switch (type) {
    case DType::Float32: launch_forward<float>(x, y, out, s, window_size, sigma, c1, c2, padding, st); break;
    case DType::Float16: launch_forward<__half>(x, y, out, s, window_size, sigma, c1, c2, padding, st); break;
    case DType::BFloat16: launch_forward<__nv_bfloat16>(x, y, out, s, window_size, sigma, c1, c2, padding, st); break;
    case DType::Float64: launch_forward<double>(x, y, out, s, window_size, sigma, c1, c2, padding, st); break;
  }
  check_launch(fn);
}

void ssim_map_backward(std::uintptr_t grad, std::uintptr_t x, std::uintptr_t y, std::uintptr_t dx,
                       std::uintptr_t dy, std::uintptr_t adjoint, std::int64_t planes, std::int64_t height,
                       std::int64_t width, std::int64_t out_height, std::int64_t out_width, int dtype,
                       int window_size, double sigma, double c1, double c2, int padding, std::uintptr_t stream) {
  constexpr const char* fn = "ssim_map_backward";
  const DType type = dtype_from_code(dtype, fn);
  const Shape s{planes, height, width, out_height, out_width};
  if (!check_args(fn, s, window_size, sigma, c1, c2, padding) || (dx == 0 && dy == 0)) return;
  require_pointer(grad, fn, "grad");
  require_pointer(x, fn, "x");
  require_pointer(y, fn, "y");
  require_pointer(adjoint, fn, "adjoint");
  const cudaStream_t st = as_stream(stream);
  switch (type) {
    case DType::Float32:
      launch_backward<float>(grad, x, y, dx, dy, adjoint, s, window_size, sigma, c1, c2, padding, st);
      break;
    case DType::Float16:
      launch_backward<__half>(grad, x, y, dx, dy, adjoint, s, window_size, sigma, c1, c2, padding, st);
      break;
    case DType::BFloat16:
      launch_backward<__nv_bfloat16>(grad, x, y, dx, dy, adjoint, s, window_size, sigma, c1, c2, padding, st);
      break;
    case DType::Float64:
      launch_backward<double>(grad, x, y, dx, dy, adjoint, s, window_size, sigma, c1, c2, padding, st);
      break;
  }
  check_launch(fn);
}

}  // namespace fastfuse
