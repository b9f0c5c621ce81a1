// Launchers of the SSIM map kernels (kernels/ssim.cuh). x, y, dx, dy are contiguous
// (planes, height, width) with planes = B * C; out and grad are contiguous
// (planes, out_height, out_width). `adjoint` is a scratch of 4 * planes * out_height * out_width
// elements of the accumulation type (float32, float64 for float64 inputs). dx or dy may be 0 to
// skip it. padding: 0 valid, 1 zero, 2 reflect. c1 = (k1 L)^2, c2 = (k2 L)^2.
#pragma once

#include <cstdint>

namespace fastfuse {

void ssim_map_forward(std::uintptr_t x, std::uintptr_t y, std::uintptr_t out, std::int64_t planes,
                      std::int64_t height, std::int64_t width, std::int64_t out_height, std::int64_t out_width,
                      int dtype, int window_size, double sigma, double c1, double c2, int padding,
                      std::uintptr_t stream);

void ssim_map_backward(std::uintptr_t grad, std::uintptr_t x, std::uintptr_t y, std::uintptr_t dx,
                       std::uintptr_t dy, std::uintptr_t adjoint, std::int64_t planes, std::int64_t height,
                       std::int64_t width, std::int64_t out_height, std::int64_t out_width, int dtype,
                       int window_size, double sigma, double c1, double c2, int padding, std::uintptr_t stream);

}  // namespace fastfuse
