// Launchers of the SAM map kernels (kernels/sam.cuh). Tensors are contiguous (B, C, P) with
// P = H * W; `out` and `grad` are contiguous (B, P); gx and gy have x's layout. Pointers are
// device addresses, `stream` a cudaStream_t, both as integers. They return once the kernel is
// queued on `stream` and throw (std::invalid_argument / std::runtime_error) on bad arguments or a
// failed launch.
#pragma once

#include <cstdint>

namespace fastfuse {

void sam_map_forward(std::uintptr_t x, std::uintptr_t y, std::uintptr_t out, std::int64_t batch,
                     std::int64_t channels, std::int64_t pixels, int dtype, bool degrees, double eps,
                     std::uintptr_t stream);

void sam_map_backward(std::uintptr_t grad, std::uintptr_t x, std::uintptr_t y, std::uintptr_t gx,
                      std::uintptr_t gy, std::int64_t batch, std::int64_t channels, std::int64_t pixels,
                      int dtype, bool degrees, double eps, std::uintptr_t stream);

}  // namespace fastfuse
