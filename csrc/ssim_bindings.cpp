// Python bindings of the SSIM launchers (csrc/ssim.h). The GIL is released while queuing work.
#include "registry.h"
#include "ssim.h"

namespace py = pybind11;

FASTFUSE_BIND_FAMILY(ssim) {
  m.def("ssim_map_forward", &fastfuse::ssim_map_forward, py::arg("x"), py::arg("y"), py::arg("out"),
        py::arg("planes"), py::arg("height"), py::arg("width"), py::arg("out_height"), py::arg("out_width"),
        py::arg("dtype"), py::arg("window_size"), py::arg("sigma"), py::arg("c1"), py::arg("c2"),
        py::arg("padding"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "SSIM map (planes, H, W) x 2 -> (planes, H', W'), queued on `stream`.");
  m.def("ssim_map_backward", &fastfuse::ssim_map_backward, py::arg("grad"), py::arg("x"), py::arg("y"),
        py::arg("dx"), py::arg("dy"), py::arg("adjoint"), py::arg("planes"), py::arg("height"), py::arg("width"),
        py::arg("out_height"), py::arg("out_width"), py::arg("dtype"), py::arg("window_size"), py::arg("sigma"),
        py::arg("c1"), py::arg("c2"), py::arg("padding"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "Gradients of the SSIM map w.r.t. x and y (either pointer may be 0), queued on `stream`.");
}
