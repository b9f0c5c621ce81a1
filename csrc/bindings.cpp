// The module fastfuse._C: every registered family's launchers, plus what the build and the CUDA
// runtime say about themselves (for `fastfuse info` and the build tests).
//
// Importing this module touches no CUDA API: the static cudart initialises on the first call
// that needs it, so the import succeeds on a machine with no GPU and no driver.
#include <algorithm>
#include <string>

#include <cuda_runtime_api.h>
#include <pybind11/stl.h>

#include "registry.h"

#ifndef FASTFUSE_CUDA_ARCH_LIST
#define FASTFUSE_CUDA_ARCH_LIST "unknown"
#endif

namespace py = pybind11;

namespace fastfuse {

std::vector<std::pair<const char*, FamilyBinder>>& family_binders() {
  static std::vector<std::pair<const char*, FamilyBinder>> binders;
  return binders;
}

namespace {

std::vector<std::string> family_names() {
  std::vector<std::string> names;
  for (const auto& entry : family_binders()) names.emplace_back(entry.first);
  std::sort(names.begin(), names.end());
  return names;
}

py::dict build_info() {
  py::dict info;
  info["cuda_archs"] = std::string(FASTFUSE_CUDA_ARCH_LIST);  // as setup.py compiled them
  info["cudart_version"] = CUDART_VERSION;                    // the static cudart linked in
  info["families"] = family_names();
  return info;
}

// Never raises: reports what the runtime says, so that callers can explain an unusable device.
py::dict runtime_status() {
  py::dict status;
  int driver = 0;
  int count = 0;
  cudaError_t err = cudaDriverGetVersion(&driver);
  status["driver_version"] = err == cudaSuccess ? driver : 0;
  err = cudaGetDeviceCount(&count);
  status["device_count"] = err == cudaSuccess ? count : 0;
  status["error"] = err == cudaSuccess ? std::string() : std::string(cudaGetErrorName(err)) + ": " +
                                                             cudaGetErrorString(err);
  cudaGetLastError();  // a failed query must not be reported later as a launch failure
  return status;
}

}  // namespace
}  // namespace fastfuse

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastfuse CUDA kernels: raw device pointers and a CUDA stream handle in, no libtorch.";
  m.def("build_info", &fastfuse::build_info, "Archs, static cudart version and op families of this build.");
  m.def("runtime_status", &fastfuse::runtime_status,
        "Driver version, visible device count and the CUDA runtime's error, if any (never raises).");
  for (const auto& entry : fastfuse::family_binders()) entry.second(m);
}
