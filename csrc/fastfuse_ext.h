// Shared by every family's launchers (csrc/<family>.cu, compiled by nvcc) and by the bindings
// (compiled by the host compiler): dtype codes, argument checks, launch error reporting.
//
// Python passes raw device pointers and the CUDA stream as integers; no libtorch types cross
// this boundary, so the extension links only pybind11 and a static cudart.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime_api.h>

namespace fastfuse {

// Must match fastfuse/cuda/__init__.py: DTYPE_CODES.
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

inline DType dtype_from_code(int code, const char* fn) {
  if (code < 0 || code > 3) {
    throw std::invalid_argument(std::string("fastfuse._C.") + fn + ": dtype code must be 0 (float32), "
                                "1 (float16), 2 (bfloat16) or 3 (float64), got " + std::to_string(code));
  }
  return static_cast<DType>(code);
}

inline void require(bool ok, const char* fn, const std::string& what) {
  if (!ok) throw std::invalid_argument(std::string("fastfuse._C.") + fn + ": " + what);
}

inline void require_pointer(std::uintptr_t ptr, const char* fn, const char* name) {
  require(ptr != 0, fn, std::string(name) + " must be a device pointer, got 0");
}

inline cudaStream_t as_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

inline std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

// A failed launch (no device, no kernel image for this arch, bad configuration) becomes a Python
// RuntimeError naming the op and CUDA's reason, instead of a crash or a silently missing result.
inline void check_launch(const char* fn) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastfuse._C.") + fn + ": CUDA kernel launch failed: " +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }
}

}  // namespace fastfuse
