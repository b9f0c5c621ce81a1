// Python bindings of the SAM launchers (csrc/sam.h). The GIL is released while queuing work.
#include "registry.h"
#include "sam.h"

namespace py = pybind11;

FASTFUSE_BIND_FAMILY(sam) {
  m.def("sam_map_forward", &fastfuse::sam_map_forward, py::arg("x"), py::arg("y"), py::arg("out"),
        py::arg("batch"), py::arg("channels"), py::arg("pixels"), py::arg("dtype"), py::arg("degrees"),
        py::arg("eps"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "Spectral angle map (B, C, P) x 2 -> (B, P), queued on `stream`.");
  m.def("sam_map_backward", &fastfuse::sam_map_backward, py::arg("grad"), py::arg("x"), py::arg("y"),
        py::arg("gx"), py::arg("gy"), py::arg("batch"), py::arg("channels"), py::arg("pixels"),
        py::arg("dtype"), py::arg("degrees"), py::arg("eps"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "Gradients of the spectral angle map w.r.t. x and y, queued on `stream`.");
}
