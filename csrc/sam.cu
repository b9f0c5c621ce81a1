// Launchers for kernels/sam.cuh: argument checks, dtype dispatch, register-cached or streamed
// variant by channel count, launch error check.
#include <algorithm>
#include <string>

#include "fastfuse_ext.h"
#include "kernels/sam.cuh"
#include "sam.h"

namespace fastfuse {
namespace {

constexpr std::int64_t kMaxGridX = 2147483647;
constexpr std::int64_t kMaxGridY = 65535;

// Returns false when there is nothing to compute (an empty batch or image).
bool check_sizes(const char* fn, std::int64_t batch, std::int64_t channels, std::int64_t pixels) {
  require(batch >= 0 && pixels >= 0, fn,
          "batch and pixels must be >= 0, got " + std::to_string(batch) + " and " + std::to_string(pixels));
  require(channels >= 1, fn, "channels must be >= 1, got " + std::to_string(channels));
  if (batch == 0 || pixels == 0) return false;
  require(ceil_div(pixels, sam::kThreadsPerBlock) <= kMaxGridX, fn,
          "too many pixels per image for one launch: " + std::to_string(pixels));
  return true;
}

dim3 grid_for(std::int64_t batch, std::int64_t pixels) {
  return dim3(static_cast<unsigned>(ceil_div(pixels, sam::kThreadsPerBlock)),
              static_cast<unsigned>(std::min(batch, kMaxGridY)));
}

template <typename T>
void launch_forward(std::uintptr_t x, std::uintptr_t y, std::uintptr_t out, std::int64_t batch,
                    std::int64_t channels, std::int64_t pixels, bool degrees, double eps, cudaStream_t stream) {
  const dim3 grid = grid_for(batch, pixels);
  const auto* xp = reinterpret_cast<const T*>(x);
  const auto* yp = reinterpret_cast<const T*>(y);
  auto* op = reinterpret_cast<T*>(out);
  const auto e = static_cast<acc_t<T>>(eps);
  if (channels <= sam::kCachedChannels) {
    sam::forward_kernel<T, sam::kCachedChannels><<<grid, sam::kThreadsPerBlock, 0, stream>>>(
        xp, yp, op, batch, channels, pixels, e, degrees);
  } else {
    sam::forward_kernel<T, 0><<<grid, sam::kThreadsPerBlock, 0, stream>>>(xp, yp, op, batch, channels,
                                                                          pixels, e, degrees);
  }
}

template <typename T>
void launch_backward(std::uintptr_t grad, std::uintptr_t x, std::uintptr_t y, std::uintptr_t gx,
                     std::uintptr_t gy, std::int64_t batch, std::int64_t channels, std::int64_t pixels,
                     bool degrees, double eps, cudaStream_t stream) {
  const dim3 grid = grid_for(batch, pixels);
  const auto* gp = reinterpret_cast<const T*>(grad);
  const auto* xp = reinterpret_cast<const T*>(x);
  const auto* yp = reinterpret_cast<const T*>(y);
  auto* gxp = reinterpret_cast<T*>(gx);
  auto* gyp = reinterpret_cast<T*>(gy);
  const auto e = static_cast<acc_t<T>>(eps);
  if (channels <= sam::kCachedChannels) {
    sam::backward_kernel<T, sam::kCachedChannels><<<grid, sam::kThreadsPerBlock, 0, stream>>>(
        gp, xp, yp, gxp, gyp, batch, channels, pixels, e, degrees);
  } else {
    sam::backward_kernel<T, 0><<<grid, sam::kThreadsPerBlock, 0, stream>>>(gp, xp, yp, gxp, gyp, batch,
                                                                           channels, pixels, e, degrees);
  }
}

}  // namespace

void sam_map_forward(std::uintptr_t x, std::uintptr_t y, std::uintptr_t out, std::int64_t batch,
                     std::int64_t channels, std::int64_t pixels, int dtype, bool degrees, double eps,
                     std::uintptr_t stream) {
  constexpr const char* fn = "sam_map_forward";
  const DType type = dtype_from_code(dtype, fn);
  if (!check_sizes(fn, batch, channels, pixels)) return;
  require_pointer(x, fn, "x");
  require_pointer(y, fn, "y");
  require_pointer(out, fn, "out");
  const cudaStream_t s = as_stream(stream);
  switch (type) {
    case DType::Float32: launch_forward<float>(x, y, out, batch, channels, pixels, degrees, eps, s); break;
    case DType::Float16: launch_forward<__half>(x, y, out, batch, channels, pixels, degrees, eps, s); break;
    case DType::BFloat16: launch_forward<__nv_bfloat16>(x, y, out, batch, channels, pixels, degrees, eps, s); break;
    case DType::Float64: launch_forward<double>(x, y, out, batch, channels, pixels, degrees, eps, s); break;
  }
  check_launch(fn);
}

void sam_map_backward(std::uintptr_t grad, std::uintptr_t x, std::uintptr_t y, std::uintptr_t gx,
                      std::uintptr_t gy, std::int64_t batch, std::int64_t channels, std::int64_t pixels,
                      int dtype, bool degrees, double eps, std::uintptr_t stream) {
  constexpr const char* fn = "sam_map_backward";
  const DType type = dtype_from_code(dtype, fn);
  if (!check_sizes(fn, batch, channels, pixels)) return;
  require_pointer(grad, fn, "grad");
  require_pointer(x, fn, "x");
  require_pointer(y, fn, "y");
  require_pointer(gx, fn, "gx");
  require_pointer(gy, fn, "gy");
  const cudaStream_t s = as_stream(stream);
  switch (type) {
    case DType::Float32:
      launch_backward<float>(grad, x, y, gx, gy, batch, channels, pixels, degrees, eps, s);
      break;
    case DType::Float16:
      launch_backward<__half>(grad, x, y, gx, gy, batch, channels, pixels, degrees, eps, s);
      break;
    case DType::BFloat16:
      launch_backward<__nv_bfloat16>(grad, x, y, gx, gy, batch, channels, pixels, degrees, eps, s);
      break;
    case DType::Float64:
      launch_backward<double>(grad, x, y, gx, gy, batch, channels, pixels, degrees, eps, s);
      break;
  }
  check_launch(fn);
}

}  // namespace fastfuse
